"""``custos keys create|list|public|sign|delete``."""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from custos.keys import KeyStore, KeyStoreConfig, open_key_store
from custos.keys.algorithms import Algorithm
from custos.keys.signatures import raw_to_der

F = TypeVar("F", bound=Callable[..., Any])


def store_options(func: F) -> F:
    """The flags every verb takes; each falls back to its CUSTOS_* variable."""

    @click.option(
        "--store",
        "store_kind",
        required=True,
        type=click.Choice(["tpm", "pkcs11", "memory", "exportable"]),
        help="where the key lives",
    )
    @click.option(
        "--tcti", default=None, help="TPM TCTI [env CUSTOS_TCTI; default device:/dev/tpmrm0]"
    )
    @click.option(
        "--key-dir",
        default=None,
        type=click.Path(path_type=Path),
        help="TPM key blobs / exportable keys [env CUSTOS_KEY_DIR]",
    )
    @click.option(
        "--pkcs11-module", default=None, help="PKCS#11 library [env CUSTOS_PKCS11_MODULE]"
    )
    @click.option(
        "--pkcs11-uri",
        default=None,
        help="RFC 7512 token URI, e.g. 'pkcs11:token=custos?pin-source=file:/etc/pin' "
        "[env CUSTOS_PKCS11_URI]",
    )
    @functools.wraps(func)
    def wrapper(
        store_kind: str,
        tcti: str | None,
        key_dir: Path | None,
        pkcs11_module: str | None,
        pkcs11_uri: str | None,
        **kwargs: Any,
    ) -> Any:
        config = KeyStoreConfig.from_env(
            store_kind,
            tcti=tcti,
            key_dir=key_dir,
            pkcs11_module=pkcs11_module,
            pkcs11_uri=pkcs11_uri,
        )
        with open_key_store(config) as store:
            return func(store=store, **kwargs)

    return wrapper  # type: ignore[return-value]


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, sort_keys=True))


@click.group()
def keys() -> None:
    """Create and use keys held in a TPM, a PKCS#11 token or software."""


@keys.command()
@store_options
@click.option("--name", required=True)
@click.option(
    "--alg", default="ES256", show_default=True, type=click.Choice([a.value for a in Algorithm])
)
def create(store: KeyStore, name: str, alg: str) -> None:
    """Generate a key in the store; print its public JWK."""
    store.create(name, alg)
    _print_json(store.public_jwk(name))


@keys.command("list")
@store_options
def list_(store: KeyStore) -> None:
    """One line per key: name and algorithm."""
    for info in store.list():
        click.echo(f"{info.name}\t{info.alg.value}")


@keys.command()
@store_options
@click.option("--name", required=True)
def public(store: KeyStore, name: str) -> None:
    """Print the public JWK."""
    _print_json(store.public_jwk(name))


@keys.command()
@store_options
@click.option("--name", required=True)
@click.option(
    "--input", "input_", required=True, type=click.File("rb"), help="file to sign ('-' for stdin)"
)
@click.option(
    "--format",
    "fmt",
    default="jose",
    type=click.Choice(["jose", "der"]),
    show_default=True,
    help="jose: base64url raw r||s; der: base64 DER (ECDSA)",
)
def sign(store: KeyStore, name: str, input_: Any, fmt: str) -> None:
    """Sign the file's bytes (SHA-256 for ES256) and print the signature."""
    info = store.info(name)
    sig = store.sign(name, input_.read())
    if fmt == "der":
        if info.alg.spec.family != "ec":
            raise click.UsageError("--format der applies to ECDSA keys")
        click.echo(base64.b64encode(raw_to_der(sig, info.alg.spec.coordinate_size)).decode())
    else:
        click.echo(base64.urlsafe_b64encode(sig).rstrip(b"=").decode())


@keys.command()
@store_options
@click.option("--name", required=True)
def delete(store: KeyStore, name: str) -> None:
    """Destroy the key."""
    store.delete(name)
    click.echo(f"deleted {name}")


@keys.command()
@store_options
@click.option("--name", required=True)
def uri(store: KeyStore, name: str) -> None:
    """Print the key's RFC 7512 URI (PKCS#11 only; no PIN) for other PKCS#11 tools."""
    from custos.keys.pkcs11 import Pkcs11KeyStore

    if not isinstance(store, Pkcs11KeyStore):
        raise click.UsageError("only PKCS#11 keys have a pkcs11: URI")
    click.echo(store.key_uri(name))
