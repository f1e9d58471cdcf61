"""Agent half of ``k8s_psat``: sends the projected service-account token and the cluster.

The token file is read at every attestation (the kubelet rotates it), through
:func:`custos._files.read_small_file` (a regular file, at most 16 KiB). Settings:
``cluster`` (required: the name the server's ``clusters`` table knows) and
``token_path`` (default :data:`DEFAULT_TOKEN_PATH`, where the DaemonSet mounts a
projected volume whose audience is the server's).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Mapping

from custos._files import UnreadableFileError, read_small_file
from custos.errors import CustosError
from custos.plugin.protocols import CoreConfig
from custos_attestors.node.k8s_psat import wire

DEFAULT_TOKEN_PATH = "/var/run/secrets/tokens/custos-agent"  # noqa: S105 (a path)


class K8sPsatAgentConfigError(CustosError, ValueError):
    code = "k8s_psat_config"


class K8sPsatAgentError(CustosError):
    """The projected token could not be read or is not a token."""

    code = "k8s_psat_token_unreadable"


class K8sPsatAgentAttestor:
    def __init__(self) -> None:
        self._cluster: str | None = None
        self._token_path = DEFAULT_TOKEN_PATH

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = set(config) - {"cluster", "token_path"}
        if unknown:
            raise K8sPsatAgentConfigError(
                f"unknown k8s_psat settings: {', '.join(sorted(unknown))}"
            )
        try:
            cluster = wire.check_cluster(config.get("cluster"))
        except wire.K8sPsatEvidenceError as e:
            raise K8sPsatAgentConfigError(f"k8s_psat needs a 'cluster' setting: {e}") from None
        path = config.get("token_path", DEFAULT_TOKEN_PATH)
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            raise K8sPsatAgentConfigError("token_path must be an absolute file path")
        self._cluster, self._token_path = cluster, path

    def read_token(self) -> str:
        try:
            raw = read_small_file(
                self._token_path, max_bytes=wire.MAX_TOKEN_CHARS + 2, what="projected token"
            )
            return wire.check_token(raw.decode("ascii").strip())
        except UnreadableFileError as e:
            raise K8sPsatAgentError(e.message) from None
        except (UnicodeDecodeError, wire.K8sPsatEvidenceError):
            raise K8sPsatAgentError(
                f"the projected token {self._token_path!r} is not a service-account token"
            ) from None

    async def attestation_flow(self) -> AsyncGenerator[bytes, bytes]:
        if self._cluster is None:
            raise RuntimeError("k8s_psat is not configured")
        token = await asyncio.to_thread(self.read_token)
        # No challenge: the server decides on the token and what the cluster says of it.
        yield wire.encode(self._cluster, token)

    def close(self) -> None:
        self._cluster = None


__all__ = [
    "DEFAULT_TOKEN_PATH",
    "K8sPsatAgentAttestor",
    "K8sPsatAgentConfigError",
    "K8sPsatAgentError",
]
