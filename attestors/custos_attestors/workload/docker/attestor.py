"""The ``docker`` workload attestor (SPIRE's ``docker`` WorkloadAttestor, with a pidfd).

Selector values (the catalog stamps the type ``docker``):

- ``label:<key>:<value>``: each label of the container (``Config.Labels``);
- ``image_id:<image>``: the image as the container was run (``Config.Image``, what
  SPIRE's ``image_id`` is: ``debian:bookworm``, ``repo@sha256:...``) and also the
  content-addressed image ID the engine resolved it to (``Image``, ``sha256:<hex>``),
  so an entry can pin the exact image (decision 0101);
- ``env:<NAME>=<value>``: only for the names listed in ``env_allowlist`` (SPIRE emits
  every variable; environments hold secrets, which must not become selectors that
  the server stores and lists).

How: the container ID comes from ``/proc/<pid>/cgroup`` (read through the caller's
pidfd: :func:`custos_attestors.workload.cgroups.read_cgroup` checks the pidfd after
reading), then ``GET /containers/<id>/json`` on the engine's Unix socket (bounded in
time and size), cached per container ID for ``cache_ttl`` seconds.

The caller must also be in the container's mount namespace (``/proc/<pid>/ns/mnt`` is
the one of the container's process ``State.Pid``): a cgroup path is only a name, and a
process that can make or join cgroups (root, a delegated subtree) could otherwise put
itself in a cgroup named like a container and take its selectors. ``docker exec``
processes join the namespace and pass. The agent must see the engine's PID namespace
(``--pid=host`` when the agent itself runs in a container) or set
``check_mount_namespace = false``.

A caller in no container gets no selectors. An engine that cannot be reached, knows
no such container or answers garbage: no ``docker`` selectors and one log line per
call (an entry that needs them does not match: fail closed), never an exception that
would deny the caller's other attestors' selectors.

Settings: ``docker_socket_path`` (``unix:///var/run/docker.sock``), ``env_allowlist``
(list of names, default none), ``cache_ttl`` (seconds, default 30, 0 = no cache),
``cache_entries`` (default 1024), ``api_timeout`` (seconds, default 2),
``max_response_bytes`` (default 1 MiB), ``check_mount_namespace`` (default true).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from custos.errors import CustosError
from custos.identity.errors import InvalidIdentifierError
from custos.identity.selector import check_selector_value
from custos.plugin.catalog import MAX_SELECTORS_PER_CALL
from custos.plugin.protocols import CoreConfig, PeerCredentials
from custos_attestors.workload import cgroups
from custos_attestors.workload.docker.api import (
    DEFAULT_API_TIMEOUT,
    DEFAULT_MAX_RESPONSE_BYTES,
    ContainerLookupError,
    ContainerNotFoundError,
    DockerApi,
)

log = logging.getLogger(__name__)

DEFAULT_DOCKER_SOCKET = "unix:///var/run/docker.sock"
DEFAULT_CACHE_TTL = 30.0
DEFAULT_CACHE_ENTRIES = 1024
MAX_CACHE_ENTRIES = 1 << 20
MAX_TTL = 24 * 3600.0
MAX_API_TIMEOUT = 60.0
MAX_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: POSIX portable environment names (what docker run -e accepts in practice).
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class DockerAttestorConfigError(CustosError):
    """A setting of the ``docker`` workload attestor is unknown or invalid."""

    code = "docker_attestor_config"


def _number(
    config: Mapping[str, object], key: str, default: float, low: float, high: float
) -> float:
    value = config.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise DockerAttestorConfigError(f"{key} must be a number of seconds")
    if not low <= value <= high:
        raise DockerAttestorConfigError(f"{key} must be from {low:g} to {high:g}")
    return float(value)


def _int(config: Mapping[str, object], key: str, default: int, high: int) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DockerAttestorConfigError(f"{key} must be an integer")
    if not 1 <= value <= high:
        raise DockerAttestorConfigError(f"{key} must be from 1 to {high}")
    return value


def _socket_path(config: Mapping[str, object]) -> str:
    value = config.get("docker_socket_path", DEFAULT_DOCKER_SOCKET)
    if not isinstance(value, str):
        raise DockerAttestorConfigError("docker_socket_path must be a string")
    path = value.removeprefix("unix://")
    if not path.startswith("/") or "\x00" in path:
        raise DockerAttestorConfigError(
            "docker_socket_path must be unix:///<absolute path> or an absolute path "
            "(TCP engines are not supported: the engine's socket is root's)"
        )
    return path


def _allowlist(config: Mapping[str, object]) -> frozenset[str]:
    value = config.get("env_allowlist", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DockerAttestorConfigError("env_allowlist must be a list of variable names")
    bad = [v for v in value if not _ENV_NAME.match(v)]
    if bad:
        raise DockerAttestorConfigError(f"env_allowlist: not a variable name: {bad[0]!r}")
    return frozenset(value)


def _str_map(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ContainerLookupError(f"the container's {what} are not a map of strings")
    return value


def _str_list(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ContainerLookupError(f"the container's {what} is not a list of strings")
    return value


def _opt_str(value: object, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ContainerLookupError(f"the container's {what} is not a string")
    return value


def selectors_from_inspect(
    doc: Mapping[str, object], container_id: str, env_allowlist: frozenset[str]
) -> list[str]:
    """Selector values from a ``GET /containers/<id>/json`` document; raises
    :class:`ContainerLookupError` on a document that is not one, or that describes
    another container."""
    got_id = doc.get("Id")
    if got_id != container_id:
        raise ContainerLookupError(
            f"the Docker engine described container {str(got_id)[:80]!r}, not {container_id}"
        )
    config = doc.get("Config")
    if not isinstance(config, dict):
        raise ContainerLookupError("the container document has no Config object")
    labels = _str_map(config.get("Labels"), "labels")
    env = _str_list(config.get("Env"), "environment")
    image = _opt_str(config.get("Image"), "Config.Image")
    image_id = _opt_str(doc.get("Image"), "Image")
    values: list[str] = [f"label:{k}:{v}" for k, v in sorted(labels.items())]
    for image_value in dict.fromkeys(v for v in (image, image_id) if v is not None):
        values.append(f"image_id:{image_value}")
    if env_allowlist:
        for entry in env:
            name, sep, _ = entry.partition("=")
            if sep and name in env_allowlist:
                values.append(f"env:{entry}")
    checked: list[str] = []
    for value in values:
        try:
            checked.append(check_selector_value(value))
        except InvalidIdentifierError as e:
            # A value custos cannot compare safely (control characters, over 1 KiB):
            # leaving it out can only make an entry not match.
            log.warning(
                "docker attestor: container %s: a %s selector left out: %s",
                container_id[:12],
                value.partition(":")[0],
                e.message,
            )
    if len(checked) > MAX_SELECTORS_PER_CALL:
        raise ContainerLookupError(
            f"container {container_id[:12]} has {len(checked)} labels/variables: more "
            f"selectors than the {MAX_SELECTORS_PER_CALL} one attestation may carry"
        )
    return checked


#: What names one mount namespace: (device, inode) of ``/proc/<pid>/ns/mnt``.
NsKey = tuple[int, int]


class _TtlCache:
    """container ID -> (selector values, the container's mount namespace), for ``ttl``
    seconds, at most ``entries`` (LRU)."""

    def __init__(self, ttl: float, entries: int) -> None:
        self.ttl = ttl
        self.entries = entries
        self._data: OrderedDict[str, tuple[float, tuple[tuple[str, ...], NsKey | None]]] = (
            OrderedDict()
        )
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[tuple[str, ...], NsKey | None] | None:
        found = self._data.get(key)
        if found is None or found[0] <= time.monotonic():
            if found is not None:
                del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return found[1]

    def put(self, key: str, values: Sequence[str], ns: NsKey | None) -> None:
        if self.ttl <= 0:
            return
        self._data[key] = (time.monotonic() + self.ttl, (tuple(values), ns))
        self._data.move_to_end(key)
        while len(self._data) > self.entries:
            self._data.popitem(last=False)

    def drop(self, key: str) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


def _ns_key(path: str) -> NsKey:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


class DockerWorkloadAttestor:
    """Entry point ``docker`` in ``custos.workload_attestors``."""

    SETTINGS = frozenset(
        {
            "docker_socket_path",
            "env_allowlist",
            "cache_ttl",
            "cache_entries",
            "api_timeout",
            "max_response_bytes",
            "check_mount_namespace",
        }
    )

    def __init__(self) -> None:
        self._api: DockerApi | None = None
        self._allow: frozenset[str] = frozenset()
        self._check_ns = True
        #: container ID -> the lookup in flight: callers of one new container share it
        self._inflight: dict[str, asyncio.Task[tuple[tuple[str, ...], NsKey | None]]] = {}
        self._cache = _TtlCache(DEFAULT_CACHE_TTL, DEFAULT_CACHE_ENTRIES)
        #: /proc root, for tests of the cgroup path only (not a setting)
        self.proc = "/proc"

    @property
    def cache(self) -> _TtlCache:
        return self._cache

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = sorted(str(k) for k in config if k not in self.SETTINGS)
        if unknown:
            raise DockerAttestorConfigError(
                f"unknown docker attestor setting(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(self.SETTINGS))})"
            )
        socket_path = _socket_path(config)
        self._allow = _allowlist(config)
        ttl = _number(config, "cache_ttl", DEFAULT_CACHE_TTL, 0.0, MAX_TTL)
        entries = _int(config, "cache_entries", DEFAULT_CACHE_ENTRIES, MAX_CACHE_ENTRIES)
        timeout = _number(config, "api_timeout", DEFAULT_API_TIMEOUT, 0.01, MAX_API_TIMEOUT)
        max_bytes = _int(
            config, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES, MAX_MAX_RESPONSE_BYTES
        )
        check_ns = config.get("check_mount_namespace", True)
        if not isinstance(check_ns, bool):
            raise DockerAttestorConfigError("check_mount_namespace must be true or false")
        self._check_ns = check_ns
        self._cache = _TtlCache(ttl, entries)
        self._api = DockerApi(socket_path, timeout=timeout, max_response_bytes=max_bytes)

    async def attest(self, peer: PeerCredentials) -> Sequence[str]:
        if self._api is None:
            raise DockerAttestorConfigError("the docker attestor is not configured")
        # read_cgroup checks the pidfd after reading: the file was the caller's.
        text = cgroups.read_cgroup(peer, proc=self.proc)
        container = cgroups.container_id(text)
        if container is None:
            return []
        cached = self._cache.get(container)
        fresh = cached is None
        while True:
            if cached is None:
                try:
                    cached = await self._shared_lookup(container)
                except ContainerNotFoundError as e:
                    log.info(
                        "docker attestor: process %d: %s: no docker selectors", peer.pid, e.message
                    )
                    return []
                except ContainerLookupError as e:
                    log.warning(
                        "docker attestor: process %d in container %s: %s: no docker selectors",
                        peer.pid,
                        container[:12],
                        e.message,
                    )
                    return []
                self._cache.put(container, cached[0], cached[1])
            values, ns = cached
            if ns is None:
                break
            caller_ns = self._caller_ns(peer)
            if caller_ns is None:
                return []  # logged: it cannot be checked, so it is not trusted
            if caller_ns == ns:
                break
            self._cache.drop(container)
            if fresh:
                log.warning(
                    "docker attestor: process %d is in the cgroup of container %s but not in "
                    "its mount namespace (a cgroup named like a container?): no docker selectors",
                    peer.pid,
                    container[:12],
                )
                return []
            # The cached namespace may be stale (the container restarted): ask once more.
            cached, fresh = None, True
        # Last: the caller was alive after every read of its /proc entries.
        cgroups.ensure_alive(peer)
        return list(values)

    async def _shared_lookup(self, container: str) -> tuple[tuple[str, ...], NsKey | None]:
        """One Engine API call for all the callers of a container that ask at once (a
        container starting many workers must not become as many calls)."""
        loop = asyncio.get_running_loop()
        task = self._inflight.get(container)
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(self._lookup(container))
            self._inflight[container] = task

            def done(t: asyncio.Task[tuple[tuple[str, ...], NsKey | None]]) -> None:
                if self._inflight.get(container) is t:
                    del self._inflight[container]
                if not t.cancelled():
                    t.exception()  # retrieved: every waiter may have been cancelled

            task.add_done_callback(done)
        # shield: one caller giving up does not cancel the others' lookup
        return await asyncio.shield(task)

    async def _lookup(self, container: str) -> tuple[tuple[str, ...], NsKey | None]:
        assert self._api is not None
        doc = await self._api.inspect(container)
        values = selectors_from_inspect(doc, container, self._allow)
        if not self._check_ns:
            return tuple(values), None
        state = doc.get("State")
        pid = state.get("Pid") if isinstance(state, dict) else None
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ContainerLookupError(f"container {container[:12]} has no running process")
        try:
            return tuple(values), _ns_key(f"{self.proc}/{pid}/ns/mnt")
        except OSError as e:
            raise ContainerLookupError(
                f"cannot read the mount namespace of container {container[:12]}'s process "
                f"{pid}: {e.strerror or type(e).__name__} (does the agent share the engine's "
                "PID namespace?)"
            ) from None

    def _caller_ns(self, peer: PeerCredentials) -> NsKey | None:
        try:
            return _ns_key(f"{self.proc}/{peer.pid}/ns/mnt")
        except FileNotFoundError:
            raise cgroups.CgroupCallerGoneError(
                f"process {peer.pid} exited before it was attested"
            ) from None
        except OSError as e:
            log.warning(
                "docker attestor: cannot read the mount namespace of process %d: %s: "
                "no docker selectors",
                peer.pid,
                e.strerror or type(e).__name__,
            )
            return None

    def close(self) -> None:
        if self._api is not None:
            self._api.drop()
        self._api = None


__all__ = [
    "DEFAULT_CACHE_ENTRIES",
    "DEFAULT_CACHE_TTL",
    "DEFAULT_DOCKER_SOCKET",
    "DockerAttestorConfigError",
    "DockerWorkloadAttestor",
    "selectors_from_inspect",
]
