"""``custos server init``: a working single-machine ``server.toml`` in one command.

Like ``step ca init``: SQLite in the data directory, the CA and signing keys in the
``exportable`` file tier under it (development custody: move them to ``pkcs11`` or
``tpm`` for production), the Agent API on 127.0.0.1:8081 and the admin socket in the
data directory.  The keys themselves are made by the server on its first start; init
writes only the configuration (decision 0030).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from custos.identity import TrustDomain, coerce_trust_domain
from custos.server.config import (
    DEFAULT_AGENT_API_ADDRESS,
    ServerConfigError,
    server_config_from_toml,
)

CONFIG_NAME = "server.toml"

_TEMPLATE = """\
# custos server configuration, written by `custos server init`.
# Every key is described in docs/configuration.md ("Server").
trust_domain = {trust_domain}

[datastore]
url = {datastore_url}

[agent_api]
address = {agent_api}
# The DNS name in the server's TLS certificate; agents connect with it as server name.
dns_name = "custos-server"
max_message_bytes = 4194304

# Prometheus /metrics and /healthz over plain HTTP (off unless an address is set):
# [http]
# address = "127.0.0.1:8082"

# The SPIFFE federation bundle endpoint (https_web), with a web-PKI certificate:
# [federation]
# address = "0.0.0.0:8443"
# cert_file = "/etc/custos/federation.crt"
# key_file = "/etc/custos/federation.key"

[join_token]
default_ttl = "10m"

# Node attestors (server halves) and their settings; join_token is on by default.
[node_attestors.join_token]
enabled = true

[admin]
socket = {admin_socket}
# uids allowed on the admin socket besides root (root is always allowed)
allowed_uids = []

[x509_svid]
default_ttl = "1h"

# Development custody: the keys are PEM files under the data directory.
# For production use store = "pkcs11" (pkcs11_uri, pkcs11_module) or "tpm" (tcti).
[ca]
key_name = "custos-ca"
ttl = "24h"
# An intermediate CA under an upstream root instead of a self-signed root:
# upstream_cert = "/etc/custos/upstream-root.pem"
# upstream_key = "/etc/custos/upstream-root.key"

[ca.key_store]
store = "exportable"
key_dir = {key_dir}

[jwt_svid]
key_name = "custos-jwt-svid"
default_ttl = "5m"

[jwt_svid.key_store]
store = "exportable"
key_dir = {key_dir}

[wit]
key_name = "custos-wit"
default_ttl = "1h"

[wit.key_store]
store = "exportable"
key_dir = {key_dir}
"""


def _toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes, \\uXXXX included).
    return json.dumps(value, ensure_ascii=True)


def render_config(trust_domain: TrustDomain | str, data_dir: Path) -> str:
    """The text of a single-machine ``server.toml`` for *data_dir* (an absolute path)."""
    td = coerce_trust_domain(trust_domain)
    return _TEMPLATE.format(
        trust_domain=_toml_string(td.name),
        datastore_url=_toml_string(f"sqlite:///{data_dir / 'datastore.sqlite3'}"),
        agent_api=_toml_string(DEFAULT_AGENT_API_ADDRESS),
        admin_socket=_toml_string(str(data_dir / "admin.sock")),
        key_dir=_toml_string(str(data_dir / "keys")),
    )


def init_server(trust_domain: TrustDomain | str, data_dir: str | os.PathLike[str]) -> Path:
    """Write ``data_dir/server.toml`` and return its path.

    *data_dir* is created with mode 0700 when missing (an existing directory's mode is
    the operator's).  An existing ``server.toml`` is never overwritten: the file is
    created with ``O_EXCL``, so two inits racing cannot both write.
    """
    directory = Path(os.path.abspath(os.fspath(data_dir)))
    text = render_config(trust_domain, directory)
    # Validate before touching the disk: init never writes a file the server refuses
    # (e.g. a data directory whose admin socket path would be too long).
    config_path = directory / CONFIG_NAME
    server_config_from_toml(text, source=str(config_path))
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ServerConfigError(
            f"cannot create data directory {str(directory)!r}: {e.strerror or type(e).__name__}"
        ) from None
    try:
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ServerConfigError(
            f"{str(config_path)!r} already exists; not overwriting it "
            "(remove it, or choose another --data-dir)"
        ) from None
    except OSError as e:
        raise ServerConfigError(
            f"cannot create {str(config_path)!r}: {e.strerror or type(e).__name__}"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return config_path


__all__ = ["CONFIG_NAME", "init_server", "render_config"]
