"""Key-store configuration (pydantic) and the one factory that opens a store.

Settings come from explicit values, then ``CUSTOS_*`` environment variables,
then defaults — the same precedence the CLI flags use.  The TPM transport also
honours tpm2-tools' variables after ``CUSTOS_TCTI`` (``TPM2TOOLS_TCTI``, then
``TSS2_TCTI``), and is checked against the allowlist of
:mod:`custos.tpm.tcti` (device, swtpm, mssim, tabrmd) wherever it comes from.

Backends are imported inside :func:`open_key_store` only: ``import custos.keys``
needs neither tpm2-pytss nor python-pkcs11 (a relying party installs neither).

``pkcs11_uri`` may carry the token PIN (``pin-value=``).  It is kept as given
(``config.pkcs11_uri``, ``model_dump()``) but never shown: ``repr()``/``str()``
and ``model_dump_json()`` print it with the PIN replaced by ``REDACTED`` (as
pydantic does for ``SecretStr``), and validation errors carry no input values
at all (not in ``str()``, nor in ``errors()`` / ``json()``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from custos._extras import extra_needed
from custos.keys.base import KeyStore
from custos.keys.errors import StoreConfigError
from custos.keys.pkcs11_uri import redact
from custos.tpm.tcti import DEFAULT_TCTI, resolve_tcti, validate_tcti

StoreKind = Literal["tpm", "pkcs11", "memory", "exportable"]

DEFAULT_KEY_DIR = Path("/var/lib/custos/keys")


class KeyStoreConfig(BaseModel):
    # hide_input_in_errors: str(ValidationError) would otherwise quote inputs, and a
    # "field required" error quotes the whole input, PKCS#11 URI (and PIN) included.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    store: StoreKind
    tcti: str = Field(default=DEFAULT_TCTI, description="TPM TCTI: device:, swtpm:, tabrmd:")
    key_dir: Path = Field(default=DEFAULT_KEY_DIR, description="TPM key blobs / exportable PEMs")
    pkcs11_module: str | None = Field(
        default=None,
        description="path of the PKCS#11 library (or module-path= / module-name= in the URI)",
    )
    pkcs11_uri: str | None = Field(default=None, description="RFC 7512 pkcs11: URI of the token")
    tpm_loaded_keys: int = Field(
        default=1,
        ge=0,
        le=16,
        description="signing keys the TPM store keeps loaded between calls (0: load per call)",
    )

    @field_validator("key_dir", "pkcs11_module")
    @classmethod
    def _no_nul(cls, value: Path | str | None) -> Path | str | None:
        # The OS cannot take a path with a NUL: say so here, not as ValueError later.
        if value is not None and "\0" in str(value):
            raise PydanticCustomError("nul_in_path", "a path must not contain a NUL character")
        return value

    @field_validator("tcti")
    @classmethod
    def _allowed_tcti(cls, value: str) -> str:
        try:
            return validate_tcti(value)
        except StoreConfigError as e:
            # As a pydantic error, so that it is reported like every other field's.
            raise PydanticCustomError("tcti_not_allowed", e.message) from None

    @model_validator(mode="wrap")
    @classmethod
    def _no_inputs_in_errors(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Strip the inputs from errors(): hide_input_in_errors only hides them from str()."""
        try:
            return handler(data)
        except ValidationError as e:
            raise _without_inputs(e) from None

    @field_serializer("pkcs11_uri", when_used="json")
    def _uri_for_json(self, uri: str | None) -> str | None:
        return None if uri is None else redact(uri)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # Used by both repr() and str() of a pydantic model.
        for name, value in super().__repr_args__():
            if name == "pkcs11_uri" and isinstance(value, str):
                value = redact(value)
            yield name, value

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Any:
        """As pydantic's, but a JSON syntax error (raised before any validator
        runs, with the raw document as its input) carries no input either."""
        try:
            return super().model_validate_json(json_data, **kwargs)
        except ValidationError as e:
            clean = _without_inputs(e)
        # Raised outside the except block, so the original error (which holds
        # the document) is not even kept as the suppressed __context__.
        raise clean

    @classmethod
    def from_env(cls, store: str, **explicit: object) -> KeyStoreConfig:
        """Explicit (non-None) values win over ``CUSTOS_*`` variables.

        The TCTI is looked up (explicit, ``CUSTOS_TCTI``, ``TPM2TOOLS_TCTI``,
        ``TSS2_TCTI``) only for the ``tpm`` store: a shell set up for another TPM
        tool does not concern a PKCS#11 or software store.
        """
        explicit_tcti = explicit.pop("tcti", None)
        if explicit_tcti is not None and not isinstance(explicit_tcti, str):
            raise StoreConfigError("invalid key store configuration: tcti must be a string")
        tcti = explicit_tcti
        if store == "tpm":
            tcti = resolve_tcti(explicit_tcti, explicit_source="tcti")
        elif explicit_tcti is not None:
            validate_tcti(explicit_tcti, source="tcti")
        env = {
            "tcti": tcti,
            "key_dir": os.environ.get("CUSTOS_KEY_DIR"),
            "pkcs11_module": os.environ.get("CUSTOS_PKCS11_MODULE"),
            "pkcs11_uri": os.environ.get("CUSTOS_PKCS11_URI"),
            "tpm_loaded_keys": os.environ.get("CUSTOS_TPM_LOADED_KEYS"),
        }
        values: dict[str, object] = {k: v for k, v in env.items() if v}
        values.update({k: v for k, v in explicit.items() if v is not None})
        try:
            return cls(store=store, **values)  # type: ignore[arg-type]
        except ValidationError as e:
            raise StoreConfigError(f"invalid key store configuration: {e}") from e


def _without_inputs(e: ValidationError) -> ValidationError:
    """The same errors (types, locations, messages) with every input value replaced."""
    errors = e.errors(include_url=False, include_input=False, include_context=True)
    try:
        return ValidationError.from_exception_data(
            e.title,
            [
                InitErrorDetails(type=err["type"], loc=err["loc"], input="<hidden>",
                                 ctx=err.get("ctx", {}))
                for err in errors
            ],
            hide_input=True,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError):
        # A custom error type pydantic cannot rebuild by name: keep its message.
        return ValidationError.from_exception_data(
            e.title,
            [
                InitErrorDetails(type=PydanticCustomError(err["type"], err["msg"]),
                                 loc=err["loc"], input="<hidden>")
                for err in errors
            ],
            hide_input=True,
        )  # fmt: skip


def open_key_store(config: KeyStoreConfig) -> KeyStore:
    """Open the store the configuration names. Device stores connect lazily or here."""
    if config.store == "memory":
        from custos.keys.software import MemoryKeyStore

        return MemoryKeyStore()
    if config.store == "exportable":
        from custos.keys.software import ExportableKeyStore

        return ExportableKeyStore(config.key_dir)
    if config.store == "tpm":
        with extra_needed("tpm"):
            from custos.keys.tpm import TpmKeyStore

        return TpmKeyStore(
            tcti=config.tcti, key_dir=config.key_dir, loaded_key_cache=config.tpm_loaded_keys
        )
    if config.store == "pkcs11":
        with extra_needed("pkcs11"):
            from custos.keys.pkcs11 import Pkcs11KeyStore

        if not config.pkcs11_uri:
            raise StoreConfigError(
                "the pkcs11 store needs a token URI (--pkcs11-uri / CUSTOS_PKCS11_URI) and a "
                "module (--pkcs11-module / CUSTOS_PKCS11_MODULE, or the URI's module-path= "
                "or module-name=)"
            )
        return Pkcs11KeyStore(module=config.pkcs11_module, uri=config.pkcs11_uri)
    raise StoreConfigError(f"unknown key store {config.store!r}")
