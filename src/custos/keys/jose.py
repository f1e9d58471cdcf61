"""joserfc keys that sign through a custos store.

joserfc builds a key's JWK form by reading private numbers, which a device key
refuses; handing it the public JWK as the key's dict value lets it sign through
:meth:`DevicePrivateKey.sign` without ever asking for private material.
"""

from __future__ import annotations

from collections.abc import Callable

from joserfc.jwk import ECKey, OKPKey, RSAKey

from custos.keys.base import StoreKey
from custos.keys.cryptography_keys import (
    DeviceECPrivateKey,
    DeviceEd25519PrivateKey,
    DeviceRSAPrivateKey,
    device_private_key,
)

JoseKey = ECKey | OKPKey | RSAKey


def joserfc_key(key: StoreKey) -> JoseKey:
    """A joserfc private key object for ``key`` (signing only)."""
    device = device_private_key(key)
    jwk = key.public_jwk()
    if isinstance(device, DeviceECPrivateKey):
        return ECKey(device, jwk)
    if isinstance(device, DeviceEd25519PrivateKey):
        return OKPKey(device, jwk)
    assert isinstance(device, DeviceRSAPrivateKey)
    return RSAKey(device, jwk)


def signing_key_with_defaults(
    key: JoseKey | StoreKey,
    alg: str | None = None,
    kid: str | None = None,
    *,
    error: Callable[[str], Exception],
) -> tuple[JoseKey, str, str]:
    """``key`` as a joserfc key, with ``alg`` and ``kid`` taken from its JWK where
    the caller gave none.  Where neither the caller nor the JWK has one, raises
    ``error(message)`` (the caller's own error class).  A store key's JWK always
    carries both."""
    jose_key = joserfc_key(key) if isinstance(key, StoreKey) else key
    if alg is None and isinstance(jose_key.alg, str):
        alg = jose_key.alg
    if kid is None and isinstance(jose_key.kid, str):
        kid = jose_key.kid
    if alg is None:
        raise error("give alg=: the signing key's JWK has no alg")
    if kid is None:
        raise error("give kid=: the signing key's JWK has no kid")
    return jose_key, alg, kid
