"""The committed generated code matches proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from custos._proto import generate as gen

SRC = Path(gen.__file__).resolve().parent


def test_generated_code_is_up_to_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # grpcio-tools is in the dev extra; no skip: a missing one fails here.
    # grpclib's protoc plugin is a script next to the interpreter.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    gen.generate(tmp_path)
    fresh = tmp_path / "custos" / "_proto"
    made = sorted(p.name for p in fresh.iterdir())
    committed = sorted(
        p.name for p in SRC.iterdir() if p.name not in {"__init__.py", "generate.py", "__pycache__"}
    )
    assert made == committed
    for name in made:
        assert _content(fresh / name) == _content(SRC / name), f"{name} is stale"


#: The grpcio-tools release that made a ``_pb2_grpc.py`` (it moves with every patch
#: release, the code it makes does not): compared apart, below.
_GENERATOR = re.compile(rb"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", re.M)


def _content(path: Path) -> bytes:
    return _GENERATOR.sub(b"GRPC_GENERATED_VERSION = ...", path.read_bytes())


def test_generated_grpc_code_runs_on_the_installed_grpcio() -> None:
    # The generated modules refuse a grpcio older than the tools that made them.
    import grpc

    made = {
        m.group(1).decode()
        for p in SRC.glob("*_pb2_grpc.py")
        for m in [_GENERATOR.search(p.read_bytes())]
        if m is not None
    }
    assert made, "no GRPC_GENERATED_VERSION in the generated code"
    version = tuple(int(x) for x in re.findall(r"\d+", grpc.__version__)[:3])
    assert all(tuple(int(x) for x in v.split(".")) <= version for v in made), made


def test_messages_import_and_round_trip() -> None:
    from custos._proto import agent_v1_pb2, types_v1_pb2

    entry = types_v1_pb2.Entry(id="e1", spiffe_id="spiffe://td/w", selectors=["unix:uid:1"])
    req = agent_v1_pb2.EntriesUpdate(entries=[entry], change_seq=7)
    again = agent_v1_pb2.EntriesUpdate.FromString(req.SerializeToString())
    assert again.entries[0].selectors == ["unix:uid:1"] and again.change_seq == 7
