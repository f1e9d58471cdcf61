"""Wire compatibility of our workload.proto with py-spiffe's (the `spiffe`
package, unmodified), in the same process: both modules import side by side,
and every message py-spiffe knows has our field names, numbers and types."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.descriptor import Descriptor

# py-spiffe is in the dev extra: a missing one is a failure, not a skip.
from spiffe._proto import workload_pb2 as spiffe_pb2

# The rig of test_workload_api.py (tests/agent is on sys.path: no __init__.py).
from test_workload_api import Rig, make_rig, plugin_site  # noqa: F401 -- a fixture

from custos._proto import workload_pb2


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


# -- py-spiffe's own client against our agent ---------------------------------------------

from spiffe.workloadapi import workload_api_client as workloadapi  # noqa: E402


@pytest.fixture
def client_rig(plugin_site: Path, tmp_path: Path) -> Iterator[tuple[Rig, object]]:  # noqa: F811
    with make_rig(tmp_path) as rig:
        client = workloadapi.WorkloadApiClient(f"unix://{rig.socket}", default_timeout=10)
        try:
            yield rig, client
        finally:
            client.close()


def test_pyspiffe_fetches_an_exportable_x509_svid_and_bundles(
    client_rig: tuple[Rig, object],
) -> None:
    rig, client = client_rig
    served = rig.serve("e1", "spiffe://example.org/web", hint="internal")
    rig.publish(served, rig.serve("e0", "spiffe://example.org/dev", custody="memory"))
    svid = client.fetch_x509_svid()  # type: ignore[attr-defined]
    assert str(svid.spiffe_id) == "spiffe://example.org/web"
    assert svid.leaf.public_bytes(Encoding.DER) == served.x509_svid[0].public_bytes(Encoding.DER)
    assert svid.private_key.public_key() == served.key.public_key()
    svids = client.fetch_x509_svids()  # type: ignore[attr-defined]
    assert [str(s.spiffe_id) for s in svids] == ["spiffe://example.org/web"]
    bundles = client.fetch_x509_bundles()  # type: ignore[attr-defined]
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert [c.public_bytes(Encoding.DER) for c in bundle.x509_authorities] == [
        rig.authority.ca.root.public_bytes(Encoding.DER)
    ]


def test_pyspiffe_fetches_and_validates_a_jwt_svid(client_rig: tuple[Rig, object]) -> None:
    rig, client = client_rig
    # JWT-SVIDs are signed by the server: a device-held identity gets one too.
    rig.publish(rig.serve("e1", "spiffe://example.org/api", custody="memory"))
    jwt = client.fetch_jwt_svid(audience={"https://rp.example"})  # type: ignore[attr-defined]
    assert str(jwt.spiffe_id) == "spiffe://example.org/api"
    jwt_bundles = client.fetch_jwt_bundles()  # type: ignore[attr-defined]
    bundle = jwt_bundles.get_bundle_for_trust_domain(jwt.spiffe_id.trust_domain)
    assert set(bundle.jwt_authorities) == {"jwt-1"}
    checked = client.validate_jwt_svid(jwt.token, "https://rp.example")  # type: ignore[attr-defined]
    assert str(checked.spiffe_id) == "spiffe://example.org/api"
    assert checked.audience == {"https://rp.example"}
    # Another audience is refused by our ValidateJWTSVID, through py-spiffe's error type.
    from spiffe.workloadapi.errors import ValidateJwtSvidError

    with pytest.raises(ValidateJwtSvidError):
        client.validate_jwt_svid(jwt.token, "https://other.example")  # type: ignore[attr-defined]


def test_pyspiffe_sees_a_device_held_caller_refused(client_rig: tuple[Rig, object]) -> None:
    rig, client = client_rig
    rig.publish(rig.serve("e1", "spiffe://example.org/dev", custody="memory"))
    from spiffe.workloadapi.errors import FetchX509SvidError

    with pytest.raises(FetchX509SvidError, match="FetchX509Chain"):
        client.fetch_x509_svid()  # type: ignore[attr-defined]
