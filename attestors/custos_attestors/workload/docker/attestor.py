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

A caller in no container gets no selectors. An engine that cannot be reached, knows
no such container or answers garbage: no ``docker`` selectors and one log line per
call (an entry that needs them does not match: fail closed), never an exception that
would deny the caller's other attestors' selectors.

Settings: ``docker_socket_path`` (``unix:///var/run/docker.sock``), ``env_allowlist``
(list of names, default none), ``cache_ttl`` (seconds, default 30, 0 = no cache),
``cache_entries`` (default 1024), ``api_timeout`` (seconds, default 2),
``max_response_bytes`` (default 1 MiB).
"""

from __future__ import annotations

import logging
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


class _TtlCache:
    """container ID -> selector values, for ``ttl`` seconds, at most ``entries`` (LRU)."""

    def __init__(self, ttl: float, entries: int) -> None:
        self.ttl = ttl
        self.entries = entries
        self._data: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[str, ...] | None:
        found = self._data.get(key)
        if found is None or found[0] <= time.monotonic():
            if found is not None:
                del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return found[1]

    def put(self, key: str, values: Sequence[str]) -> None:
        if self.ttl <= 0:
            return
        self._data[key] = (time.monotonic() + self.ttl, tuple(values))
        self._data.move_to_end(key)
        while len(self._data) > self.entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


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
        }
    )

    def __init__(self) -> None:
        self._api: DockerApi | None = None
        self._allow: frozenset[str] = frozenset()
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
        if cached is not None:
            return list(cached)
        try:
            doc = await self._api.inspect(container)
            values = selectors_from_inspect(doc, container, self._allow)
        except ContainerNotFoundError as e:
            log.info("docker attestor: process %d: %s: no docker selectors", peer.pid, e.message)
            return []
        except ContainerLookupError as e:
            log.warning(
                "docker attestor: process %d in container %s: %s: no docker selectors",
                peer.pid,
                container[:12],
                e.message,
            )
            return []
        # Still the caller? (The container's facts are the container's either way, but
        # a caller that died meanwhile gets nothing.)
        cgroups.ensure_alive(peer)
        self._cache.put(container, values)
        return values

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
