"""An example custos workload attestor: the caller's process name (``comm``).

It shows the three things every workload attestor does:

1. check its configuration table in ``configure`` and refuse unknown keys;
2. read facts about the caller through the PID the kernel reported, then prove
   with the *pidfd* that the process it read is still the caller (a PID can be
   recycled between the read and the answer; a pidfd cannot);
3. return selector *values* only: custos adds the type (this plugin's entry-point
   name), so the values cannot pose as another plugin's selectors.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence

from custos._files import read_small_text
from custos.plugin import CoreConfig, PeerCredentials

#: ``/proc/<pid>/comm`` holds at most 16 bytes (TASK_COMM_LEN); allow a margin.
_MAX_COMM_BYTES = 64


class CallerGoneError(Exception):
    """The caller exited (or its PID was reused) while it was being attested."""


class ProcessNameAttestor:
    """Selectors ``comm:<name>`` (and ``uid:<uid>`` when ``report_uid`` is true)."""

    def __init__(self) -> None:
        self._report_uid = False
        self._proc = "/proc"

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = set(config) - {"report_uid"}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        report_uid = config.get("report_uid", False)
        if not isinstance(report_uid, bool):
            raise ValueError("report_uid must be true or false")
        self._report_uid = report_uid

    async def attest(self, peer: PeerCredentials) -> Sequence[str]:
        comm = read_small_text(
            f"{self._proc}/{peer.pid}/comm", max_bytes=_MAX_COMM_BYTES, what="process name"
        ).rstrip("\n")
        try:
            # Signal 0 checks only that the pidfd's process still exists: if it
            # does, /proc/<pid> above was that process, not a successor.
            signal.pidfd_send_signal(peer.pidfd, 0)
        except ProcessLookupError:
            raise CallerGoneError(f"process {peer.pid} exited during attestation") from None
        values = [f"comm:{comm}"]
        if self._report_uid:
            values.append(f"uid:{peer.uid}")
        return values

    def close(self) -> None:
        pass  # nothing held
