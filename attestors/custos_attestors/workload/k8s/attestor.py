"""The ``k8s`` workload attestor (SPIRE's ``k8s`` WorkloadAttestor; decision 0097).

The caller's pod UID and container ID come from its ``/proc/<pid>/cgroup`` (read
through the pidfd rule: :func:`custos_attestors.workload.cgroups.read_cgroup`); the
pod from the kubelet's authenticated ``/pods`` endpoint (HTTPS, bearer token, cached
for ``cache_ttl_seconds``).  The container must be listed in that pod's statuses
(regular, init or ephemeral) with the same ID.

Selector values (the catalog stamps the type ``k8s``; SPIRE's names): ``ns:``, ``sa:``,
``pod-name:``, ``pod-uid:``, ``pod-label:<key>:<value>`` (each label),
``pod-owner:<kind>:<name>`` and ``pod-owner-uid:<kind>:<uid>`` (each owner reference),
``pod-image:`` / ``pod-init-image:`` (image and image ID of every (init) container
status), ``pod-image-count:`` / ``pod-init-image-count:``, ``container-name:``,
``container-image:`` (the matched container's status image and image ID), ``node-name:``.

No selectors (an empty answer, and a log line for the last three):

- a caller whose cgroup names no container (not containerised);
- a pod or container the kubelet does not list after ``max_poll_attempts`` fetches
  ``poll_retry_interval_seconds`` apart (the container may still be starting);
- a kubelet that cannot be reached, times out, refuses the token, or answers
  something that is not a PodList.

The caller is denied (an error) only when its own facts fail: it exited, its cgroup
file is unreadable or names two pods or containers, or (``check_cgroup_owner``) the cgroup
naming its container is not owned by root.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import ssl
import time
from collections.abc import Mapping, Sequence

from custos.errors import CustosError
from custos.identity.errors import InvalidIdentifierError
from custos.identity.selector import check_selector_value
from custos.plugin.catalog import MAX_SELECTORS_PER_CALL
from custos.plugin.protocols import CoreConfig, PeerCredentials
from custos_attestors.workload.cgroups import (
    check_runtime_owned,
    pod_and_container,
    read_cgroup,
)
from custos_attestors.workload.k8s.kubelet import KubeletClient, KubeletError, Pod

log = logging.getLogger("custos_attestors.workload.k8s")

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULTS: dict[str, object] = {
    "kubelet_host": "127.0.0.1",
    "kubelet_secure_port": 10250,
    "kubelet_ca_path": f"{SERVICE_ACCOUNT_DIR}/ca.crt",
    "skip_kubelet_verification": False,
    "token_path": f"{SERVICE_ACCOUNT_DIR}/token",
    "cache_ttl_seconds": 5.0,
    "max_poll_attempts": 5,
    "poll_retry_interval_seconds": 0.3,
    "request_timeout_seconds": 5.0,
    "max_response_bytes": 32 * 1024 * 1024,
    "check_cgroup_owner": False,
}


class K8sAttestorConfigError(CustosError):
    """A setting of the ``k8s`` workload attestor is unknown or invalid."""

    code = "k8s_attestor_config"


def _get(config: Mapping[str, object], key: str) -> object:
    return config.get(key, DEFAULTS[key])


def _str(config: Mapping[str, object], key: str) -> str:
    value = _get(config, key)
    if not isinstance(value, str) or not value or "\x00" in value:
        raise K8sAttestorConfigError(f"{key} must be a non-empty string")
    return value


def _path(config: Mapping[str, object], key: str) -> str:
    value = _str(config, key)
    if not os.path.isabs(value):
        raise K8sAttestorConfigError(f"{key} must be an absolute path")
    return value


def _bool(config: Mapping[str, object], key: str) -> bool:
    value = _get(config, key)
    if not isinstance(value, bool):
        raise K8sAttestorConfigError(f"{key} must be true or false")
    return value


def _int(config: Mapping[str, object], key: str, low: int, high: int) -> int:
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise K8sAttestorConfigError(f"{key} must be an integer from {low} to {high}")
    return value


def _seconds(config: Mapping[str, object], key: str, low: float, high: float) -> float:
    value = _get(config, key)
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise K8sAttestorConfigError(f"{key} must be a number of seconds from {low} to {high}")
    return float(value)


def selector_values(pod: Pod, container_name: str, images: Sequence[str]) -> list[str]:
    values = [
        f"ns:{pod.namespace}",
        f"sa:{pod.service_account}",
        f"pod-name:{pod.name}",
        f"pod-uid:{pod.uid}",
        *(f"pod-label:{k}:{v}" for k, v in pod.labels),
        *(f"pod-owner:{kind}:{name}" for kind, name, _ in pod.owners),
        *(f"pod-owner-uid:{kind}:{uid}" for kind, _, uid in pod.owners),
        f"pod-image-count:{pod.image_count}",
        f"pod-init-image-count:{pod.init_image_count}",
        *(f"pod-image:{i}" for i in pod.pod_images),
        *(f"pod-init-image:{i}" for i in pod.init_images),
        f"container-name:{container_name}",
        *(f"container-image:{i}" for i in images),
    ]
    if pod.node_name:
        values.append(f"node-name:{pod.node_name}")
    return values


class K8sWorkloadAttestor:
    """Entry point ``k8s`` in ``custos.workload_attestors``."""

    SETTINGS = frozenset(DEFAULTS)

    def __init__(self) -> None:
        self._client: KubeletClient | None = None
        self._attempts = 5
        self._interval = 0.3
        self._check_owner = False
        self._proc = "/proc"

    @property
    def kubelet(self) -> KubeletClient:
        if self._client is None:
            raise K8sAttestorConfigError("the k8s attestor is not configured")
        return self._client

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = sorted(str(k) for k in config if k not in self.SETTINGS)
        if unknown:
            raise K8sAttestorConfigError(
                f"unknown k8s attestor setting(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(self.SETTINGS))})"
            )
        host = _str(config, "kubelet_host")
        if any(c in host for c in "/@?#[] ") and not (host.startswith("[") and host.endswith("]")):
            raise K8sAttestorConfigError("kubelet_host must be a host name or an IP address")
        port = _int(config, "kubelet_secure_port", 1, 65535)
        token_path = _path(config, "token_path")
        ttl = _seconds(config, "cache_ttl_seconds", 0.0, 3600.0)
        self._attempts = _int(config, "max_poll_attempts", 1, 60)
        self._interval = _seconds(config, "poll_retry_interval_seconds", 0.0, 60.0)
        timeout = _seconds(config, "request_timeout_seconds", 0.1, 120.0)
        max_bytes = _int(config, "max_response_bytes", 1024, 1 << 30)
        self._check_owner = _bool(config, "check_cgroup_owner")
        skip = _bool(config, "skip_kubelet_verification")
        if skip:
            tls = ssl.create_default_context()
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
            log.warning(
                "k8s attestor: skip_kubelet_verification is true: the kubelet's certificate "
                "is not checked, anyone able to answer on %s:%d can name any pod",
                host,
                port,
            )
        else:
            ca = _path(config, "kubelet_ca_path")
            try:
                tls = ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as e:
                raise K8sAttestorConfigError(
                    f"kubelet_ca_path {ca!r} is not a readable PEM CA bundle: {e}"
                ) from None
        authority = host if ":" not in host or host.startswith("[") else f"[{host}]"
        if self._client is not None:
            self._client.close()
        self._client = KubeletClient(
            url=f"https://{authority}:{port}/pods",
            tls=tls,
            token_path=token_path,
            timeout=timeout,
            max_bytes=max_bytes,
            cache_ttl=ttl,
        )

    async def attest(self, peer: PeerCredentials) -> Sequence[str]:
        client = self.kubelet
        # read_cgroup checks the pidfd after the read: the text is the caller's.
        text = read_cgroup(peer, proc=self._proc)
        pod_uid, container_id = pod_and_container(text)
        if self._check_owner:
            # A cgroup named like a pod by a process with a delegated subtree: denied.
            check_runtime_owned(text, mountinfo=f"{self._proc}/self/mountinfo")
        if container_id is None:
            return []  # not in a container: not a Kubernetes workload
        newer_than: float | None = None
        attempt = 0
        while attempt < self._attempts:
            attempt += 1
            snap = client.cached() if newer_than is None else None
            try:
                if snap is None:  # a fetch (or a wait for one) runs in a worker thread
                    snap = await client.snapshot_async(newer_than=newer_than)
            except KubeletError as e:
                log.warning(
                    "k8s attestor: no k8s selectors for process %d: %s", peer.pid, e.args[0]
                )
                return []
            pod = snap.pods.get(pod_uid) if pod_uid is not None else None
            if pod is None and pod_uid is None:
                pod = snap.by_container.get(container_id)
            container = pod.container(container_id) if pod is not None else None
            if pod is not None and container is not None:
                return self._values(peer, pod, container.name, container.images)
            # Worth another fetch only when the answer may change soon: the pod is not
            # listed yet, or some container of the node has no ID yet (starting).
            if pod_uid is None and not any(p.starting for p in snap.pods.values()):
                break
            if pod is not None and not pod.starting:
                break
            if attempt < self._attempts:
                newer_than = time.monotonic()
                await asyncio.sleep(self._interval)
        log.warning(
            "k8s attestor: no k8s selectors for process %d: the kubelet lists no pod %s "
            "with container %s (after %d fetches)",
            peer.pid,
            pod_uid or "(any)",
            container_id,
            attempt,
        )
        return []

    def _values(
        self, peer: PeerCredentials, pod: Pod, container_name: str, images: Sequence[str]
    ) -> list[str]:
        values = []
        for value in selector_values(pod, container_name, images):
            try:
                values.append(check_selector_value(value))
            except InvalidIdentifierError as e:
                log.warning(
                    "k8s attestor: pod %s/%s: selector %r left out: %s",
                    pod.namespace,
                    pod.name,
                    value[:64],
                    e.message,
                )
        if len(values) > MAX_SELECTORS_PER_CALL:
            log.warning(
                "k8s attestor: no k8s selectors for process %d: pod %s/%s has %d selectors, "
                "more than the %d one attestation may carry",
                peer.pid,
                pod.namespace,
                pod.name,
                len(values),
                MAX_SELECTORS_PER_CALL,
            )
            return []
        return values

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


__all__ = ["DEFAULTS", "K8sAttestorConfigError", "K8sWorkloadAttestor", "selector_values"]
