"""Regenerate this package from ``proto/`` (``make proto``; the freshness test uses it).

Kept: ``*_pb2`` (+ ``.pyi``) for every file; grpcio stubs (``*_pb2_grpc``) for the
Agent API, which the server serves with grpcio over TLS; grpclib stubs
(``*_grpc``) for the admin API, served with grpclib on a Unix socket, and for the
Agent API's client in the agent (decision 0126: the agent runs no grpcio).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[3] / "proto"
SOURCES = (
    "types_v1.proto", "agent_v1.proto", "admin_v1.proto", "workload.proto", "wimse_v1.proto"
)
#: Generated files nobody imports: messages-only files get no stubs, and each
#: API is served by one gRPC stack only. The WIMSE signing API keeps both: the
#: agent serves it with grpclib, workloads may call it with grpcio. workload.proto
#: gets no stubs: its service lives at upstream's package-less paths
#: (``/SpiffeWorkloadAPI/<Method>``), which generated stubs would get wrong.
UNUSED = (
    "types_v1_grpc.py", "types_v1_pb2_grpc.py", "admin_v1_pb2_grpc.py",
    "workload_grpc.py", "workload_pb2_grpc.py",
)


def generate(out: Path) -> None:
    files = [f"custos/_proto/{name}" for name in SOURCES]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}",
         f"--pyi_out={out}", f"--grpc_python_out={out}", f"--grpclib_python_out={out}", *files],
        check=True,
        cwd=PROTO_ROOT,
    )
    for name in UNUSED:
        (out / "custos" / "_proto" / name).unlink()


if __name__ == "__main__":
    generate(Path(sys.argv[1]).resolve())
