"""The ``k8s`` workload attestor: pod and container of the caller, from its cgroup and
the kubelet's authenticated ``/pods``.

Registered in ``custos.workload_attestors`` as ``k8s``: selectors ``k8s:ns:…``,
``sa``, ``pod-name``, ``pod-uid``, ``pod-label:<k>:<v>``, ``container-name``,
``container-image``, ``node-name``.
"""

from custos_attestors.workload.k8s.attestor import (
    DEFAULTS,
    K8sAttestorConfigError,
    K8sWorkloadAttestor,
)
from custos_attestors.workload.k8s.kubelet import KubeletClient, KubeletError, parse_pod_list

__all__ = [
    "DEFAULTS",
    "K8sAttestorConfigError",
    "K8sWorkloadAttestor",
    "KubeletClient",
    "KubeletError",
    "parse_pod_list",
]
