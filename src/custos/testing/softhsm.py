"""A real SoftHSM2 token for tests and demos: a private config, its own token directory,
fresh tokens.

This module does not import pytest (``custos.demo`` uses it); the ``softhsm`` and
``softhsm_session`` fixtures built on it live in :mod:`custos.testing.plugin`.
:func:`write_config` writes a private ``softhsm2.conf`` with its own token
directory; :func:`init_token` runs ``softhsm2-util --init-token --free`` under it.
SoftHSM reads ``SOFTHSM2_CONF`` once, at ``C_Initialize``, so a process (and its
children) points that variable at one config and makes every further token in it.

SoftHSM only sees the tokens that existed when it was initialized: a token
made with :meth:`SoftHSMToken.new_token` after a process loaded the library
appears there after ``C_Finalize``/``C_Initialize``, which
:class:`custos.keys.pkcs11.Pkcs11KeyStore` does by itself when it cannot find
its token.

Needs the Debian/Ubuntu package ``softhsm2`` (``apt-get install softhsm2``;
Fedora: ``softhsm``; Homebrew: ``softhsm``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from custos.errors import CustosError

_INSTALL_HINT = (
    "install SoftHSM2: 'apt-get install softhsm2' (Debian/Ubuntu), "
    "'dnf install softhsm' (Fedora), 'brew install softhsm' (macOS)"
)


class SoftHSMRigError(CustosError):
    """SoftHSM2 is missing or a token could not be created."""

    code = "softhsm_rig"


def find_module() -> str:
    """Path of libsofthsm2.so: ``SOFTHSM2_MODULE`` if set, else the usual places."""
    explicit = os.environ.get("SOFTHSM2_MODULE")
    if explicit:
        if not os.path.isfile(explicit):
            raise SoftHSMRigError(f"SOFTHSM2_MODULE={explicit!r} does not exist")
        return explicit
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    candidates = [
        "/usr/lib/softhsm/libsofthsm2.so",  # Debian/Ubuntu (a symlink to the multiarch one)
        f"/usr/lib/{multiarch}/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",  # Fedora/RHEL
        "/usr/lib/pkcs11/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
        "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise SoftHSMRigError("libsofthsm2.so not found; " + _INSTALL_HINT)


def _util() -> str:
    path = shutil.which("softhsm2-util")
    if path is None:
        raise SoftHSMRigError("softhsm2-util not found on PATH; " + _INSTALL_HINT)
    return path


def write_config(directory: Path) -> Path:
    """A private softhsm2.conf with its own token directory under ``directory``."""
    tokendir = directory / "tokens"
    tokendir.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    return conf


@dataclass(frozen=True)
class SoftHSMToken:
    """One initialized SoftHSM2 token and everything needed to open it."""

    module: str
    token_label: str
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)
    conf: Path
    token_dir: Path  # this token's own directory inside the config's tokendir

    @property
    def uri(self) -> str:
        """RFC 7512 URI with the PIN in the query part (fine for tests only)."""
        label, pin = quote(self.token_label, safe=""), quote(self.pin, safe="")
        return f"pkcs11:token={label}?pin-value={pin}"

    @property
    def env(self) -> dict[str, str]:
        """Environment a child process needs to see the same tokens."""
        return {"SOFTHSM2_CONF": str(self.conf)}

    def new_token(self, label: str) -> SoftHSMToken:
        """Another fresh token in the same token directory (same config)."""
        return init_token(self.module, self.conf, label)

    @contextmanager
    def unplugged(self) -> Iterator[None]:
        """Take the token away (move its directory out of the tokendir) and put it back.

        With the file backend this is what SoftHSM sees when a token's storage
        vanishes: calls fail (CKR_GENERAL_ERROR, invalid handles) and the token
        is gone from a re-initialized library until the directory returns.
        """
        parked = self.conf.parent / f"unplugged-{self.token_dir.name}"
        self.token_dir.rename(parked)
        try:
            yield
        finally:
            parked.rename(self.token_dir)


def init_token(module: str, conf: Path, label: str) -> SoftHSMToken:
    """``softhsm2-util --init-token --free`` under ``conf``; returns the new token."""
    tokendir = _tokendir_of(conf)
    before = {p.name for p in tokendir.iterdir()}
    pin = secrets.token_hex(8)
    so_pin = secrets.token_hex(8)
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    done = subprocess.run(
        [_util(), "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise SoftHSMRigError(
            f"softhsm2-util --init-token failed ({done.returncode}): {done.stderr.strip()[:500]}"
        )
    created = [p for p in tokendir.iterdir() if p.name not in before and p.is_dir()]
    if len(created) != 1:
        raise SoftHSMRigError(f"expected one new token directory in {tokendir}, got {created}")
    return SoftHSMToken(module, label, pin, so_pin, conf, created[0])


def _tokendir_of(conf: Path) -> Path:
    for line in conf.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "directories.tokendir":
            return Path(value.strip())
    raise SoftHSMRigError(f"{conf} has no directories.tokendir")
