"""Which TPM transport (TCTI) custos talks to: an allowlist, and where the value comes from.

A TCTI string ``name[:config]`` makes libtss2 ``dlopen`` ``libtss2-tcti-<name>.so``
and hand it ``config``.  Some TCTIs do far more than talk to a TPM: ``cmd:`` runs
a shell command, ``libtpms`` keeps a software TPM's state in a file, and a name
that is a path loads any shared library.  A TCTI is configuration (a config file,
an environment variable), so it is checked against the four transports custos
supports before libtss2 ever sees it: see docs/decisions/0011-tcti-allowlist.md.

This module imports nothing from tpm2-pytss and nothing from :mod:`custos.keys`
at import time: ``custos.keys.config`` imports it, and must stay importable
without the TPM libraries.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NoReturn

#: The transports custos accepts, as tpm2-tools spells them.
ALLOWED_TCTIS: tuple[str, ...] = ("device", "swtpm", "mssim", "tabrmd")

#: The kernel's resource manager: what tpm2-tools uses by default too.
DEFAULT_TCTI = "device:/dev/tpmrm0"

#: Where a TCTI is looked up when none is given, first match wins: custos' own
#: variable, then tpm2-tools', then tpm2-tss' (so a shell set up for tpm2-tools
#: talks to the same TPM with custos).
TCTI_ENV_VARS: tuple[str, ...] = ("CUSTOS_TCTI", "TPM2TOOLS_TCTI", "TSS2_TCTI")

#: Far longer than any real TCTI (``swtpm:host=<253-char name>,port=65535``).
MAX_TCTI_LENGTH = 512


def _refuse(message: str) -> NoReturn:
    # Imported here: custos.keys (via its config module) imports this module.
    from custos.keys.errors import StoreConfigError

    raise StoreConfigError(message)


def validate_tcti(value: str, *, source: str = "tcti") -> str:
    """Return ``value`` if it names an allowed TCTI, else raise ``StoreConfigError``.

    ``value`` is ``name`` or ``name:config`` with ``name`` one of
    :data:`ALLOWED_TCTIS`; the config part is passed through to the TCTI as is
    (it reports a malformed one when connecting).  ``source`` names where the
    value came from in the error ("--tcti", "CUSTOS_TCTI", ...).  The error
    never repeats a value that has control characters or is over-long.
    """
    if not isinstance(value, str):
        _refuse(f"{source}: a TPM TCTI is a string, not {type(value).__name__}")
    allowed = ", ".join(ALLOWED_TCTIS)
    if len(value) > MAX_TCTI_LENGTH:
        _refuse(f"{source}: the TPM TCTI is longer than {MAX_TCTI_LENGTH} characters")
    if not value.isprintable():
        _refuse(f"{source}: the TPM TCTI contains control characters")
    name, _, _config = value.partition(":")
    if name not in ALLOWED_TCTIS:
        _refuse(
            f"{source}: TPM TCTI {name!r} is not allowed; custos talks to a TPM only "
            f"through one of: {allowed} (e.g. device:/dev/tpmrm0, swtpm:port=2321)"
        )
    return value


def resolve_tcti(
    explicit: str | None,
    environ: Mapping[str, str] | None = None,
    *,
    explicit_source: str = "tcti",
) -> str:
    """The TCTI to use, validated: ``explicit``, else the first set of
    :data:`TCTI_ENV_VARS`, else :data:`DEFAULT_TCTI`.

    An environment variable set to the empty string counts as unset (as in
    tpm2-tools); an explicit empty string is refused.  ``explicit_source`` names
    the explicit value in errors ("--tcti", "tcti").
    """
    if explicit is not None:
        return validate_tcti(explicit, source=explicit_source)
    env = os.environ if environ is None else environ
    for var in TCTI_ENV_VARS:
        value = env.get(var)
        if value:
            return validate_tcti(value, source=var)
    return DEFAULT_TCTI


__all__ = [
    "ALLOWED_TCTIS",
    "DEFAULT_TCTI",
    "MAX_TCTI_LENGTH",
    "TCTI_ENV_VARS",
    "resolve_tcti",
    "validate_tcti",
]
