"""The kubelet's authenticated ``/pods`` endpoint: a bounded HTTPS client, a defensive
reader of its PodList, and a TTL cache shared by every caller.

The kubelet answers ``GET https://<node>:10250/pods`` with a ``v1.PodList`` of the pods
on its node, to a bearer token allowed ``nodes/proxy`` (SPIRE's ``k8s`` attestor reads
the same endpoint).  Nothing in that answer is trusted for its shape: each field is
checked for type, and a pod that is not well formed is left out (logged).  A body
that is not a PodList at all is a failed fetch (logged), never a crash.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from custos._files import UnreadableFileError, read_small_text

log = logging.getLogger("custos_attestors.workload.k8s")

MAX_TOKEN_BYTES = 64 * 1024


class KubeletError(Exception):
    """A fetch of ``/pods`` failed (transport, status, size, or not a PodList)."""


@dataclass(frozen=True)
class Container:
    name: str
    #: the 64-hex ID with its runtime scheme (``containerd://``) removed; lower-case
    container_id: str
    #: its status ``image`` and ``imageID`` (SPIRE's ``container-image``); the spec's
    #: image only when the status has neither
    images: tuple[str, ...]


@dataclass(frozen=True)
class Pod:
    uid: str
    name: str
    namespace: str
    service_account: str
    node_name: str
    labels: tuple[tuple[str, str], ...]
    containers: tuple[Container, ...]
    #: statuses without a container ID yet (a container starting): worth a re-poll
    starting: bool = False
    #: ``metadata.ownerReferences``: (kind, name, uid)
    owners: tuple[tuple[str, str, str], ...] = ()
    #: image and image ID of every (init) container status, and how many statuses
    pod_images: tuple[str, ...] = ()
    init_images: tuple[str, ...] = ()
    image_count: int = 0
    init_image_count: int = 0

    def container(self, container_id: str) -> Container | None:
        for c in self.containers:
            if c.container_id == container_id:
                return c
        return None


def _str(obj: Mapping[str, object], key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def _map(obj: Mapping[str, object], key: str) -> Mapping[str, object]:
    value = obj.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} is not an object")
    return value


def _list(obj: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{key} is not a list of objects")
    return value


def _pod(item: object) -> Pod:
    if not isinstance(item, dict):
        raise ValueError("a pod is not an object")
    meta, spec, status = _map(item, "metadata"), _map(item, "spec"), _map(item, "status")
    uid = _str(meta, "uid").lower()
    if not uid:
        raise ValueError("a pod has no metadata.uid")
    labels_raw = _map(meta, "labels")
    labels: list[tuple[str, str]] = []
    for k, v in labels_raw.items():
        if not isinstance(v, str):
            raise ValueError("a label value is not a string")
        labels.append((k, v))
    spec_images: dict[str, str] = {}
    for key in ("containers", "initContainers", "ephemeralContainers"):
        for c in _list(spec, key):
            spec_images[_str(c, "name")] = _str(c, "image")
    containers: list[Container] = []
    starting = False
    pod_images: dict[str, list[str]] = {"containerStatuses": [], "initContainerStatuses": []}
    counts = {"containerStatuses": 0, "initContainerStatuses": 0}
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for s in _list(status, key):
            name, raw_id = _str(s, "name"), _str(s, "containerID")
            status_images = [i for i in (_str(s, "image"), _str(s, "imageID")) if i]
            if key in pod_images:
                pod_images[key] += status_images
                counts[key] += 1
            if not raw_id:
                starting = True
                continue
            scheme, sep, cid = raw_id.partition("://")
            if not sep or not scheme or not cid:
                raise ValueError("a containerID is not <runtime>://<id>")
            images = status_images or [i for i in (spec_images.get(name, ""),) if i]
            unique = tuple(dict.fromkeys(images))
            containers.append(Container(name=name, container_id=cid.lower(), images=unique))
    owners = []
    for ref in _list(meta, "ownerReferences"):
        owners.append((_str(ref, "kind"), _str(ref, "name"), _str(ref, "uid")))
    return Pod(
        uid=uid,
        name=_str(meta, "name"),
        namespace=_str(meta, "namespace"),
        service_account=_str(spec, "serviceAccountName"),
        node_name=_str(spec, "nodeName"),
        labels=tuple(sorted(labels)),
        containers=tuple(containers),
        starting=starting,
        owners=tuple(owners),
        pod_images=tuple(sorted(set(pod_images["containerStatuses"]))),
        init_images=tuple(sorted(set(pod_images["initContainerStatuses"]))),
        image_count=counts["containerStatuses"],
        init_image_count=counts["initContainerStatuses"],
    )


def parse_pod_list(body: bytes) -> dict[str, Pod]:
    """The pods of a PodList body, by UID.  :class:`KubeletError` when the body is not a
    PodList; a malformed pod inside one is left out with a log line."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise KubeletError("the kubelet's /pods answer is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise KubeletError("the kubelet's /pods answer is not a PodList (no items list)")
    if doc.get("kind") not in (None, "PodList"):
        raise KubeletError(f"the kubelet's /pods answer is a {str(doc.get('kind'))[:64]!r}")
    pods: dict[str, Pod] = {}
    for index, item in enumerate(doc["items"]):
        try:
            pod = _pod(item)
        except ValueError as e:
            log.warning("k8s attestor: pod %d of the kubelet's /pods answer left out: %s", index, e)
            continue
        pods[pod.uid] = pod
    return pods


@dataclass
class Snapshot:
    pods: dict[str, Pod]
    #: time.monotonic() when the fetch that produced it *started*
    fetched_at: float
    #: container ID -> its pod; ``None`` when two pods list the same ID (ambiguous)
    by_container: dict[str, Pod | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pod in self.pods.values():
            for c in pod.containers:
                if c.container_id not in self.by_container:
                    self.by_container[c.container_id] = pod
                    continue
                other = self.by_container[c.container_id]
                if other is not None and other.uid != pod.uid:
                    log.warning(
                        "k8s attestor: the kubelet lists container %s in two pods (%s, %s): "
                        "its ID alone names neither",
                        c.container_id,
                        other.uid,
                        pod.uid,
                    )
                    self.by_container[c.container_id] = None


class KubeletClient:
    """``GET /pods`` with a bearer token (read from ``token_path`` at every fetch: a
    projected token rotates), a total deadline and a body size cap; one fetch at a
    time on one worker thread, and callers that wait for it share its result (or its
    failure)."""

    def __init__(
        self,
        *,
        url: str,
        tls: ssl.SSLContext,
        token_path: str,
        timeout: float,
        max_bytes: int,
        cache_ttl: float,
    ) -> None:
        self.url = url
        self.token_path = token_path
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.cache_ttl = cache_ttl
        self._client = httpx.Client(verify=tls, timeout=timeout, trust_env=False)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="custos-kubelet")
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        #: the last failed fetch: when it ended, and its error (shared with the callers
        #: that were waiting for it)
        self._failure: tuple[float, KubeletError] | None = None
        #: fetches made / failed (for tests and the benchmark)
        self.fetches = 0
        self.failures = 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def invalidate(self) -> None:
        with self._lock:
            self._snapshot = None

    def cached(self) -> Snapshot | None:
        """The snapshot, if it is within the TTL (no lock, no I/O: the fast path)."""
        snap = self._snapshot
        if snap is not None and time.monotonic() - snap.fetched_at <= self.cache_ttl:
            return snap
        return None

    async def snapshot_async(self, *, newer_than: float | None = None) -> Snapshot:
        """:meth:`snapshot` on the client's own single worker thread: fetches queue there,
        not on the event loop's default executor (a hanging kubelet then holds one thread,
        never the pool the rest of the agent uses)."""
        requested = time.monotonic()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor,
            functools.partial(self.snapshot, newer_than=newer_than, requested=requested),
        )

    def snapshot(
        self, *, newer_than: float | None = None, requested: float | None = None
    ) -> Snapshot:
        """A snapshot no older than the TTL and, with ``newer_than``, one whose fetch
        started after that time (runs in a worker thread; blocks while another fetch
        runs, then reuses its result when it is new enough, or its failure: callers
        queued behind a kubelet that hangs wait one timeout, not one each)."""
        if requested is None:
            requested = time.monotonic()
        with self._lock:
            now = time.monotonic()
            snap = self._snapshot
            if snap is not None and now - snap.fetched_at <= self.cache_ttl:
                if newer_than is None or snap.fetched_at >= newer_than:
                    return snap
            if self._failure is not None and self._failure[0] >= requested:
                raise self._failure[1]
            started = time.monotonic()
            self.fetches += 1
            try:
                pods = parse_pod_list(self._get())
            except KubeletError as e:
                self.failures += 1
                self._failure = (time.monotonic(), e)  # when it *ended*
                raise
            self._snapshot = Snapshot(pods=pods, fetched_at=started)
            return self._snapshot

    def _token(self) -> str:
        try:
            token = read_small_text(
                self.token_path, max_bytes=MAX_TOKEN_BYTES, what="kubelet token"
            ).strip()
        except UnreadableFileError as e:
            raise KubeletError(e.message) from None
        if not token:
            raise KubeletError(f"the kubelet token file {self.token_path!r} is empty")
        return token

    def _get(self) -> bytes:
        headers = {
            "Authorization": f"Bearer {self._token()}",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
        }
        deadline = time.monotonic() + self.timeout
        try:
            with self._client.stream("GET", self.url, headers=headers) as response:
                if response.status_code != 200:
                    raise KubeletError(
                        f"the kubelet answered {self.url} with HTTP {response.status_code}"
                    )
                chunks: list[bytes] = []
                total = 0
                for chunk in response.iter_raw():
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise KubeletError(
                            f"the kubelet's /pods answer is over {self.max_bytes} bytes"
                        )
                    if time.monotonic() > deadline:
                        raise KubeletError(f"the kubelet's /pods answer took over {self.timeout} s")
                    chunks.append(chunk)
                if response.headers.get("content-encoding", "identity") not in ("identity", ""):
                    raise KubeletError("the kubelet's /pods answer is encoded")
                return b"".join(chunks)
        except httpx.TimeoutException:
            raise KubeletError(
                f"the kubelet at {self.url} did not answer in {self.timeout} s"
            ) from None
        except httpx.HTTPError as e:
            raise KubeletError(f"cannot fetch {self.url}: {type(e).__name__}: {e}") from None


__all__ = [
    "Container",
    "KubeletClient",
    "KubeletError",
    "Pod",
    "Snapshot",
    "parse_pod_list",
]
