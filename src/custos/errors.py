"""The root of custos' exception tree.

Every error custos raises derives from :class:`CustosError` and carries a
stable, machine-readable ``code``.  Subpackages extend the tree; third-party
errors are translated at the boundary with ``raise ... from``.
"""

from __future__ import annotations


class CustosError(Exception):
    """Base class of every custos error."""

    code: str = "custos_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code
