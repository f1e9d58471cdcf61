"""`make demo`: the main job of custos, end to end, on the embedded defaults.

1. provision a software TPM (with EK + platform certificates) and a SoftHSM2 token;
2. in each device: create an ES256 key, sign a JWS through it with joserfc, verify
   it, and show that exporting the private key is refused;
3. WIMSE: an issuer key in the HSM mints a WIT for a workload whose key is in the
   TPM; the workload signs a WPT for an HTTP request through the TPM; a relying
   party verifies the request, then refuses a tampered and a replayed copy.

Everything lives under ``./demo-state`` (recreated on each run, so running twice is safe).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.jwk import import_key

STATE = Path(os.environ.get("CUSTOS_DEMO_STATE", "demo-state")).absolute()
TRUST_DOMAIN = "demo.custos.example"
WORKLOAD = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web"
RP = "https://payments.demo.custos.example"


def say(title: str) -> None:
    print(f"\n== {title}")


def show(label: str, value: Any) -> None:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    print(f"   {label:<28} {text}")


def device_round(store: Any, label: str) -> None:
    from cryptography.hazmat.primitives import serialization

    from custos.keys import ExportRefusedError
    from custos.keys.jose import joserfc_key

    say(f"{label}: create an ES256 key inside the device")
    store.create("demo-key", "ES256")
    jwk = store.public_jwk("demo-key")
    show("public JWK", {k: jwk[k] for k in ("kty", "crv", "alg", "kid")})

    say(f"{label}: sign a JWS through the device with joserfc, verify it")
    payload = json.dumps({"hello": label}).encode()
    token = jws.serialize_compact(
        {"alg": "ES256", "kid": jwk["kid"]},
        payload,
        joserfc_key(store.get("demo-key")),
        algorithms=["ES256"],
    )
    show("JWS", token[:60] + "…")
    verified = jws.deserialize_compact(token, import_key(jwk), algorithms=["ES256"])
    show("verified payload", verified.payload.decode())

    say(f"{label}: ask for the private key")
    try:
        store.get("demo-key").private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        raise SystemExit("BUG: the private key was exported")
    except ExportRefusedError as e:
        show("refused", f"[{e.code}] {e.message}")


def main() -> int:
    from custos._extras import MissingExtraError, extra_needed
    from custos.testing import softhsm as hsm_rig
    from custos.testing import swtpm as tpm_rig

    try:
        # The demo drives both devices: it needs custos[tpm,pkcs11] (`make demo` installs them).
        with extra_needed("tpm"):
            from custos.keys.tpm import TpmKeyStore
            from custos.tpm.info import tpm_info
        with extra_needed("pkcs11"):
            from custos.keys.pkcs11 import Pkcs11KeyStore
    except MissingExtraError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return 1

    os.environ.setdefault("TSS2_LOG", "esys+none,tcti+none")
    if STATE.exists():
        shutil.rmtree(STATE)
    STATE.mkdir(parents=True)

    say("provision a software TPM with EK and platform certificates")
    state = tpm_rig.provision(STATE / "tpm")
    tpm = tpm_rig.start_instance(state.root)
    show("TCTI", tpm.tcti)
    info = tpm_info(tpm.tcti)
    for key in ("manufacturer", "firmware_version", "pcr_banks"):
        if key in info:
            show(key, info[key])
    for key in sorted(k for k in info if k.startswith("ek")):
        show(key, info[key])

    say("provision a fresh SoftHSM2 token (private SOFTHSM2_CONF)")
    conf = hsm_rig.write_config(STATE / "softhsm")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by SoftHSM at C_Initialize
    token = hsm_rig.init_token(hsm_rig.find_module(), conf, "custos-demo")
    show("module", token.module)
    show("token", token.token_label)

    try:
        tpm_store = TpmKeyStore(tcti=tpm.tcti, key_dir=STATE / "tpm-keys")
        hsm_store = Pkcs11KeyStore(module=token.module, uri=token.uri)
        device_round(tpm_store, "TPM")
        attrs = tpm_store.key_attributes("demo-key")
        show("TPM key attributes", str(attrs))
        device_round(hsm_store, "PKCS#11")
        wimse_round(tpm_store, hsm_store)
        tpm_store.close()
        hsm_store.close()
    finally:
        tpm.stop()
    say("done: every signature above was made inside the TPM or the HSM")
    return 0


def wimse_round(tpm_store: Any, hsm_store: Any) -> None:
    from custos.bundle import BundleSet, JwtAuthority, TrustBundle
    from custos.identity import SpiffeId, TrustDomain
    from custos.integrations.problem import http_status
    from custos.keys.jose import joserfc_key
    from custos.wimse.errors import WimseError
    from custos.wimse.http.message import HttpMessage
    from custos.wimse.replay import MemoryReplayCache
    from custos.wimse.wit import mint_wit
    from custos.wimse.wpt import WptVerifier, create_wpt, wpt_headers

    say("WIMSE: the issuer (key in the HSM) mints a WIT for a workload key held in the TPM")
    hsm_store.create("demo-issuer", "ES256")
    tpm_store.create("demo-workload", "ES256")
    issuer_jwk = hsm_store.public_jwk("demo-issuer")
    wit = mint_wit(
        joserfc_key(hsm_store.get("demo-issuer")),
        "ES256",
        issuer_jwk["kid"],
        SpiffeId.parse(WORKLOAD),
        tpm_store.public_jwk("demo-workload"),
        timedelta(hours=1),
        issuer=f"https://{TRUST_DOMAIN}",
    )
    show("WIT sub", WORKLOAD)
    show("WIT (signed in the HSM)", wit[:60] + "…")

    say("the workload signs a WPT for POST /pay through the TPM")
    wpt = create_wpt(joserfc_key(tpm_store.get("demo-workload")), wit, f"{RP}/pay")
    headers = wpt_headers(wit, wpt)
    for name, value in headers:
        show(name, value[:60] + "…")

    say("the relying party verifies the request")
    td = TrustDomain.parse(TRUST_DOMAIN)
    bundle = TrustBundle(
        td,
        (),
        (JwtAuthority(issuer_jwk["kid"], hsm_store.public_key("demo-issuer"), None, "ES256"),),
        None,
        None,
    )
    verifier = WptVerifier(BundleSet([bundle]), audiences=[RP], replay=MemoryReplayCache())
    request = HttpMessage.request("POST", "/pay", headers, b'{"amount": 10}')
    caller = verifier.verify(request)
    show("authenticated caller", str(caller.subject))
    show("wire form", caller.wire)

    for label, bad in (
        ("replayed request", request),
        ("proof sent to /payroll", HttpMessage.request("POST", "/payroll", headers)),
    ):
        try:
            verifier.verify(bad)
            raise SystemExit(f"BUG: {label} was accepted")
        except WimseError as e:
            show(f"{label}", f"refused: {http_status(e)} [{e.code}]")

    say("the same workload signs the request instead (RFC 9421, httpsig-08), through the TPM")
    from custos.wimse.httpsig import HttpSignatureVerifier, sign_request
    from custos.wimse.wit import WitVerifier

    plain = HttpMessage.request(
        "POST", "/pay", [("Content-Type", "application/json")], b'{"amount": 10}'
    )
    signed = sign_request(
        plain, signer=tpm_store.get("demo-workload"), wit=wit, audience=f"{RP}/pay"
    )
    for name in ("Content-Digest", "Signature-Input", "Signature"):
        show(name, (signed.get(name) or "")[:60] + "…")
    sig_verifier = HttpSignatureVerifier(
        WitVerifier(BundleSet([bundle])), MemoryReplayCache(), [RP]
    )
    checked = sig_verifier.verify_request(signed)
    show("authenticated caller", str(checked.subject))
    tampered = HttpMessage.request("POST", "/pay", signed.headers, b'{"amount": 10000}')
    try:
        HttpSignatureVerifier(
            WitVerifier(BundleSet([bundle])), MemoryReplayCache(), [RP]
        ).verify_request(tampered)
        raise SystemExit("BUG: a tampered body was accepted")
    except WimseError as e:
        show("body changed in transit", f"refused: {http_status(e)} [{e.code}]")


if __name__ == "__main__":
    sys.exit(main())
