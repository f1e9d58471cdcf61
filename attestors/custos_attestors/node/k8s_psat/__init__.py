"""The ``k8s_psat`` node attestor: a projected service-account token, reviewed by Kubernetes.

The agent half (:mod:`.agent`) reads the token the kubelet projects into its pod (its
audience is the server's) and sends it with the cluster's name; the server half
(:mod:`.server`) asks that cluster's API server to review it (TokenReview, through the
official ``kubernetes`` client), checks the service account against an allow list, and
reads the pod and its node for selectors. The agent ID is
``spiffe://<td>/custos/agent/k8s_psat/<cluster>/<node uid>`` (SPIRE's shape). The
halves live in separate modules so a server imports only its own.
"""
