"""Optional dependencies (extras) and the error for a missing one (decision 0025).

The TPM and PKCS#11 libraries are extras, imported only by their backend modules.
Code that imports such a backend on request wraps the import in
``with extra_needed("tpm"):``: a missing library (or, for tpm2-pytss, a missing
libtss2) becomes :class:`MissingExtraError` naming the extra to install, while any
other ImportError — a bug — passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from custos.errors import CustosError

# extra -> (the top-level modules it provides, what else must be on the system)
EXTRAS: dict[str, tuple[frozenset[str], str]] = {
    "tpm": (frozenset({"tpm2_pytss"}), "the tpm2-tss libraries (Debian: libtss2-dev)"),
    "pkcs11": (frozenset({"pkcs11"}), "a PKCS#11 module for your token"),
    "httpx": (frozenset({"httpx"}), ""),
    "requests": (frozenset({"requests"}), ""),
    "redis": (frozenset({"redis"}), ""),
    "grpc": (frozenset({"grpc", "grpclib", "google"}), ""),
    "server": (
        frozenset({"sqlalchemy", "alembic", "psycopg", "prometheus_client", "grpc", "grpclib"}),
        "",
    ),
}


class MissingExtraError(CustosError):
    """A feature needs an optional dependency that is not installed."""

    code = "missing_extra"

    def __init__(self, extra: str, cause: ImportError) -> None:
        needs = EXTRAS[extra][1]
        super().__init__(
            f"this needs the '{extra}' extra: pip install 'custos[{extra}]'"
            + (f" (and {needs})" if needs else "")
            + f"; {cause}"
        )
        self.extra = extra


def _provided_by(extra: str, error: ImportError) -> bool:
    modules = EXTRAS[extra][0]
    if (error.name or "").partition(".")[0] in modules:
        return True
    # tpm2-pytss installed but libtss2 missing: its cffi module fails to load a .so.
    return extra == "tpm" and "libtss2" in str(error)


@contextmanager
def extra_needed(extra: str) -> Iterator[None]:
    """Turn the ImportError of a missing ``extra`` raised inside the block into
    :class:`MissingExtraError`; other ImportErrors pass through."""
    try:
        yield
    except ImportError as e:
        if _provided_by(extra, e):
            raise MissingExtraError(extra, e) from e
        raise
