"""``custos keys create|list|info|public|sign|delete|uri``.

Every flag falls back to an environment variable (``CUSTOS_STORE``, ``CUSTOS_KEY_DIR``,
``CUSTOS_PKCS11_MODULE``, ``CUSTOS_PKCS11_URI``; the TCTI to ``CUSTOS_TCTI``, then
tpm2-tools' ``TPM2TOOLS_TCTI`` and ``TSS2_TCTI``).  Read-only verbs (``list``,
``info``, ``public``, ``sign``, ``uri``) never create a key directory: a directory
that does not exist holds no keys.  ``--store memory`` is refused here (decision
0014): a key made by one command would die with that command's process.
"""

from __future__ import annotations

import base64
import functools
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from custos._extras import extra_needed
from custos._files import UnreadableFileError, read_small_file
from custos.keys import KeyInfo, KeyNotFoundError, KeyStore, KeyStoreConfig, open_key_store
from custos.keys.algorithms import Algorithm
from custos.keys.config import DEFAULT_KEY_DIR
from custos.keys.signatures import raw_to_der

F = TypeVar("F", bound=Callable[..., Any])

_CONTEXT = {"help_option_names": ["-h", "--help"]}
_STORES = ["tpm", "pkcs11", "exportable", "memory"]
#: What ``keys sign --input`` reads at most: messages, not disk images.
_MAX_SIGN_INPUT = 16 << 20
#: Stores that keep their keys as files in --key-dir.
_FILE_STORES = ("tpm", "exportable")


def _refuse_memory(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value == "memory":
        raise click.BadParameter(
            "the memory store keeps keys in this process only: a key made by one 'custos "
            "keys' command is gone when the command exits. Use tpm or pkcs11 (device "
            "keys) or exportable (software keys kept in --key-dir); the memory store is "
            "for programs (custos.keys.MemoryKeyStore)",
            ctx=ctx,
            param=param,
        )
    return value


def _with_store(func: F, *, read_only: bool, pass_key_dir: bool) -> F:
    """Add the store flags to ``func`` and call it with the opened ``store``.

    A ``read_only`` verb on a file-backed store whose key directory does not exist
    does not open the store (which could create the directory): with
    ``pass_key_dir`` it gets ``store=None`` and the directory, otherwise the key is
    not found.
    """

    @click.option(
        "--store",
        "store_kind",
        required=True,
        envvar="CUSTOS_STORE",
        show_envvar=True,
        type=click.Choice(_STORES),
        callback=_refuse_memory,
        help="where the keys live: tpm, pkcs11, exportable (memory is refused here)",
    )
    @click.option(
        "--tcti",
        default=None,
        help="TPM TCTI: device, swtpm, mssim or tabrmd, e.g. swtpm:port=2321 "
        "[env CUSTOS_TCTI, then TPM2TOOLS_TCTI, then TSS2_TCTI; "
        "default device:/dev/tpmrm0]",
    )
    @click.option(
        "--key-dir",
        default=None,
        type=click.Path(path_type=Path),
        help=f"TPM key blobs / exportable keys [env CUSTOS_KEY_DIR; default {DEFAULT_KEY_DIR}]",
    )
    @click.option(
        "--pkcs11-module",
        default=None,
        help="PKCS#11 library; or module-path= / module-name= in the URI "
        "[env CUSTOS_PKCS11_MODULE]",
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
        extra = {"key_dir": config.key_dir} if pass_key_dir else {}
        if read_only and config.store in _FILE_STORES and not config.key_dir.exists():
            if config.store == "tpm":
                # A missing library is said first, as when the store is opened.
                with extra_needed("tpm"):
                    importlib.import_module("custos.keys.tpm")
            if not pass_key_dir:
                _open(None, config.key_dir, kwargs.get("name"))  # raises KeyNotFoundError
            return func(store=None, **extra, **kwargs)
        with open_key_store(config) as store:
            return func(store=store, **extra, **kwargs)

    return wrapper  # type: ignore[return-value]


def store_options(func: F) -> F:
    """The store flags for a verb outside ``custos keys`` that uses a key (``custos
    wimse sign-wpt``): ``func(store=..., **options)``; read-only, so a missing key
    directory is "key not found", never created."""
    return _with_store(func, read_only=True, pass_key_dir=False)


def _keys_options(*, read_only: bool) -> Callable[[F], F]:
    """The store flags of a ``custos keys`` verb: ``func(store=..., key_dir=..., ...)``."""
    return functools.partial(_with_store, read_only=read_only, pass_key_dir=True)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, sort_keys=True))


def _output_option(func: F) -> F:
    return click.option(
        "--output",
        "-o",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="text: one line per item; json: one JSON document",
    )(func)


def _open(store: KeyStore | None, key_dir: Path, name: str | None = None) -> KeyStore:
    """The opened store; with none (its key directory is missing), the key is not found."""
    if store is None:
        raise KeyNotFoundError(
            (f"no key {name!r}: " if name else "")
            + f"the key directory {key_dir} does not exist (nothing was created)"
        )
    return store


def _read_input(path: str) -> bytes:
    """The bytes to sign: a bounded regular file (a FIFO or /dev/zero would hang or exhaust
    memory), or stdin with the same bound ('-', for pipes)."""
    if path != "-":
        return read_small_file(path, max_bytes=_MAX_SIGN_INPUT, what="--input")
    data = sys.stdin.buffer.read(_MAX_SIGN_INPUT + 1)
    if len(data) > _MAX_SIGN_INPUT:
        raise UnreadableFileError(
            f"--input '-' (stdin) is larger than {_MAX_SIGN_INPUT} bytes",
            path="-",
            reason="too_large",
        )
    return data


def _info_json(info: KeyInfo) -> dict[str, str]:
    return {"name": info.name, "alg": info.alg.value, "store": info.store}


@click.group(context_settings=_CONTEXT)
def keys() -> None:
    """Create and use keys held in a TPM, a PKCS#11 token or software."""


@keys.command(context_settings=_CONTEXT)
@_keys_options(read_only=False)
@click.option("--name", required=True)
@click.option(
    "--alg", default="ES256", show_default=True, type=click.Choice([a.value for a in Algorithm])
)
def create(store: KeyStore, key_dir: Path, name: str, alg: str) -> None:
    """Generate a key in the store; print its public JWK."""
    store.create(name, alg)
    _print_json(store.public_jwk(name))


@keys.command("list", context_settings=_CONTEXT)
@_keys_options(read_only=True)
@_output_option
def list_(store: KeyStore | None, key_dir: Path, output: str) -> None:
    """One line per key: name and algorithm (a missing key directory lists nothing)."""
    infos = [] if store is None else store.list()
    if output == "json":
        _print_json([_info_json(i) for i in infos])
        return
    for info in infos:
        click.echo(f"{info.name}\t{info.alg.value}")


@keys.command(context_settings=_CONTEXT)
@_keys_options(read_only=True)
@click.option("--name", required=True)
@_output_option
def info(store: KeyStore | None, key_dir: Path, name: str, output: str) -> None:
    """The key's name, algorithm and store."""
    found = _open(store, key_dir, name).info(name)
    if output == "json":
        _print_json(_info_json(found))
        return
    click.echo(f"name: {found.name}\nalg: {found.alg.value}\nstore: {found.store}")


@keys.command(context_settings=_CONTEXT)
@_keys_options(read_only=True)
@click.option("--name", required=True)
def public(store: KeyStore | None, key_dir: Path, name: str) -> None:
    """Print the public JWK."""
    _print_json(_open(store, key_dir, name).public_jwk(name))


@keys.command(context_settings=_CONTEXT)
@_keys_options(read_only=True)
@click.option("--name", required=True)
@click.option(
    "--input",
    "input_",
    required=True,
    help=f"file to sign, a regular file of at most {_MAX_SIGN_INPUT >> 20} MiB ('-': stdin)",
)
@click.option(
    "--format",
    "fmt",
    default="jose",
    type=click.Choice(["jose", "der"]),
    show_default=True,
    help="jose: base64url raw r||s; der: base64 DER (ECDSA)",
)
def sign(store: KeyStore | None, key_dir: Path, name: str, input_: str, fmt: str) -> None:
    """Sign the file's bytes (SHA-256 for ES256) and print the signature."""
    opened = _open(store, key_dir, name)
    found = opened.info(name)
    sig = opened.sign(name, _read_input(input_))
    if fmt == "der":
        if found.alg.spec.family != "ec":
            raise click.UsageError("--format der applies to ECDSA keys")
        click.echo(base64.b64encode(raw_to_der(sig, found.alg.spec.coordinate_size)).decode())
    else:
        click.echo(base64.urlsafe_b64encode(sig).rstrip(b"=").decode())


@keys.command(context_settings=_CONTEXT)
@_keys_options(read_only=False)
@click.option("--name", required=True)
def delete(store: KeyStore, key_dir: Path, name: str) -> None:
    """Destroy the key."""
    store.delete(name)
    click.echo(f"deleted {name}")


@keys.command(context_settings=_CONTEXT)
@_keys_options(read_only=True)
@click.option("--name", required=True)
def uri(store: KeyStore | None, key_dir: Path, name: str) -> None:
    """Print the key's RFC 7512 URI (PKCS#11 only; no PIN) for other PKCS#11 tools."""
    if store is None or store.kind != "pkcs11":
        raise click.UsageError("only PKCS#11 keys have a pkcs11: URI")
    # Imported only now: a PKCS#11 store is open, so the pkcs11 extra is present; before
    # the check above, a TPM user without python-pkcs11 would get an ImportError.
    from custos.keys.pkcs11 import Pkcs11KeyStore

    assert isinstance(store, Pkcs11KeyStore)
    click.echo(store.key_uri(name))
