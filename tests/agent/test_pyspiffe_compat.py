"""Wire compatibility of our workload.proto with py-spiffe's (the `spiffe`
package, unmodified), in the same process: both modules import side by side,
and every message py-spiffe knows has our field names, numbers and types."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor

spiffe_pb2 = pytest.importorskip("spiffe._proto.workload_pb2")

from custos._proto import workload_pb2  # noqa: E402 -- after the importorskip


def _shape(message: Descriptor) -> list[tuple[str, int, int, bool, str]]:
    """Field name, number, type, repeated, and the shape of a map entry's value."""
    out = []
    for f in message.fields:
        sub = ""
        if f.message_type is not None:
            sub = f.message_type.name if not f.message_type.GetOptions().map_entry else (
                "map:" + ",".join(f"{g.name}={g.type}" for g in f.message_type.fields)
            )
        out.append((f.name, f.number, f.type, f.is_repeated, sub))
    return out


def test_both_modules_import_side_by_side() -> None:
    assert spiffe_pb2.X509SVIDResponse.DESCRIPTOR.full_name == "X509SVIDResponse"
    assert workload_pb2.X509SVIDResponse.DESCRIPTOR.full_name == (
        "custos.spiffe.workload.X509SVIDResponse"
    )


@pytest.mark.parametrize("name", sorted(spiffe_pb2.DESCRIPTOR.message_types_by_name))
def test_every_pyspiffe_message_has_our_wire_shape(name: str) -> None:
    theirs = spiffe_pb2.DESCRIPTOR.message_types_by_name[name]
    ours = workload_pb2.DESCRIPTOR.message_types_by_name[name]
    assert _shape(ours) == _shape(theirs)


def test_service_methods_match_and_add_the_wit_calls() -> None:
    theirs = spiffe_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
    ours = workload_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
    shape = {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in ours.methods
    }
    for m in theirs.methods:
        assert shape.pop(m.name) == (m.input_type.name, m.output_type.name, m.server_streaming)
    assert shape == {
        "FetchWITSVID": ("WITSVIDRequest", "WITSVIDResponse", True),
        "FetchWITBundles": ("WITBundlesRequest", "WITBundlesResponse", True),
    }


def test_wit_messages_are_the_standard_ones() -> None:
    # spiffe/spiffe standards/workloadapi.proto (WIT-SVID profile).
    by = workload_pb2.DESCRIPTOR.message_types_by_name
    string, repeated = 9, True
    assert _shape(by["WITSVIDRequest"]) == [("spiffe_id", 1, string, False, "")]
    assert _shape(by["WITSVIDResponse"]) == [("svids", 1, 11, repeated, "WITSVID")]
    assert _shape(by["WITSVID"]) == [
        ("spiffe_id", 1, string, False, ""),
        ("wit_svid", 2, string, False, ""),
        ("wit_svid_key", 3, string, False, ""),
        ("hint", 4, string, False, ""),
    ]
    assert _shape(by["WITBundlesRequest"]) == []
    assert _shape(by["WITBundlesResponse"]) == [
        ("bundles", 1, 11, repeated, "map:key=9,value=9")
    ]


def test_a_pyspiffe_message_parses_as_ours_and_back() -> None:
    theirs = spiffe_pb2.X509SVIDResponse(
        svids=[spiffe_pb2.X509SVID(spiffe_id="spiffe://td/w", x509_svid=b"c", hint="h")],
        federated_bundles={"spiffe://other": b"b"},
    )
    ours = workload_pb2.X509SVIDResponse.FromString(theirs.SerializeToString())
    assert ours.svids[0].spiffe_id == "spiffe://td/w" and ours.svids[0].hint == "h"
    assert spiffe_pb2.X509SVIDResponse.FromString(ours.SerializeToString()) == theirs
