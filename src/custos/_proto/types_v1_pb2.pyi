from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Entry(_message.Message):
    __slots__ = ("id", "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl", "wit_ttl", "dns_names", "key_custody", "hint", "admin", "downstream", "expires_at", "revision", "require_residency")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    X509_SVID_TTL_FIELD_NUMBER: _ClassVar[int]
    JWT_SVID_TTL_FIELD_NUMBER: _ClassVar[int]
    WIT_TTL_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    KEY_CUSTODY_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    id: str
    spiffe_id: str
    parent_id: str
    selectors: _containers.RepeatedScalarFieldContainer[str]
    x509_svid_ttl: int
    jwt_svid_ttl: int
    wit_ttl: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    key_custody: str
    hint: str
    admin: bool
    downstream: bool
    expires_at: int
    revision: int
    require_residency: bool
    def __init__(self, id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., selectors: _Optional[_Iterable[str]] = ..., x509_svid_ttl: _Optional[int] = ..., jwt_svid_ttl: _Optional[int] = ..., wit_ttl: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ..., key_custody: _Optional[str] = ..., hint: _Optional[str] = ..., admin: _Optional[bool] = ..., downstream: _Optional[bool] = ..., expires_at: _Optional[int] = ..., revision: _Optional[int] = ..., require_residency: _Optional[bool] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("trust_domain", "spiffe_bundle", "sequence_number")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    spiffe_bundle: str
    sequence_number: int
    def __init__(self, trust_domain: _Optional[str] = ..., spiffe_bundle: _Optional[str] = ..., sequence_number: _Optional[int] = ...) -> None: ...

class KeyCustody(_message.Message):
    __slots__ = ("tier", "tpm_certify_info", "tpm_certify_signature", "tpm_public")
    TIER_FIELD_NUMBER: _ClassVar[int]
    TPM_CERTIFY_INFO_FIELD_NUMBER: _ClassVar[int]
    TPM_CERTIFY_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TPM_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    tier: str
    tpm_certify_info: bytes
    tpm_certify_signature: bytes
    tpm_public: bytes
    def __init__(self, tier: _Optional[str] = ..., tpm_certify_info: _Optional[bytes] = ..., tpm_certify_signature: _Optional[bytes] = ..., tpm_public: _Optional[bytes] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
