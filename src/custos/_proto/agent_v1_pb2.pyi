from custos._proto import types_v1_pb2 as _types_v1_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttestAgentRequest(_message.Message):
    __slots__ = ("start", "challenge_response")
    START_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    start: AttestationStart
    challenge_response: bytes
    def __init__(self, start: _Optional[_Union[AttestationStart, _Mapping]] = ..., challenge_response: _Optional[bytes] = ...) -> None: ...

class AttestationStart(_message.Message):
    __slots__ = ("attestor", "payload", "key")
    ATTESTOR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    attestor: str
    payload: bytes
    key: AgentKeyRequest
    def __init__(self, attestor: _Optional[str] = ..., payload: _Optional[bytes] = ..., key: _Optional[_Union[AgentKeyRequest, _Mapping]] = ...) -> None: ...

class AgentKeyRequest(_message.Message):
    __slots__ = ("csr", "custody")
    CSR_FIELD_NUMBER: _ClassVar[int]
    CUSTODY_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    custody: _types_v1_pb2.KeyCustody
    def __init__(self, csr: _Optional[bytes] = ..., custody: _Optional[_Union[_types_v1_pb2.KeyCustody, _Mapping]] = ...) -> None: ...

class AttestAgentResponse(_message.Message):
    __slots__ = ("challenge", "result")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    result: AgentIdentity
    def __init__(self, challenge: _Optional[bytes] = ..., result: _Optional[_Union[AgentIdentity, _Mapping]] = ...) -> None: ...

class AgentIdentity(_message.Message):
    __slots__ = ("spiffe_id", "x509_svid", "wit", "bundle", "selectors", "expires_at", "reattestable")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    X509_SVID_FIELD_NUMBER: _ClassVar[int]
    WIT_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REATTESTABLE_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    x509_svid: bytes
    wit: str
    bundle: _types_v1_pb2.Bundle
    selectors: _containers.RepeatedScalarFieldContainer[str]
    expires_at: int
    reattestable: bool
    def __init__(self, spiffe_id: _Optional[str] = ..., x509_svid: _Optional[bytes] = ..., wit: _Optional[str] = ..., bundle: _Optional[_Union[_types_v1_pb2.Bundle, _Mapping]] = ..., selectors: _Optional[_Iterable[str]] = ..., expires_at: _Optional[int] = ..., reattestable: _Optional[bool] = ...) -> None: ...

class RenewAgentRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: AgentKeyRequest
    def __init__(self, key: _Optional[_Union[AgentKeyRequest, _Mapping]] = ...) -> None: ...

class SyncEntriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EntriesUpdate(_message.Message):
    __slots__ = ("entries", "change_seq")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CHANGE_SEQ_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_types_v1_pb2.Entry]
    change_seq: int
    def __init__(self, entries: _Optional[_Iterable[_Union[_types_v1_pb2.Entry, _Mapping]]] = ..., change_seq: _Optional[int] = ...) -> None: ...

class X509SVIDParams(_message.Message):
    __slots__ = ("entry_id", "csr", "custody")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    CUSTODY_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    csr: bytes
    custody: _types_v1_pb2.KeyCustody
    def __init__(self, entry_id: _Optional[str] = ..., csr: _Optional[bytes] = ..., custody: _Optional[_Union[_types_v1_pb2.KeyCustody, _Mapping]] = ...) -> None: ...

class BatchNewX509SVIDRequest(_message.Message):
    __slots__ = ("params",)
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[X509SVIDParams]
    def __init__(self, params: _Optional[_Iterable[_Union[X509SVIDParams, _Mapping]]] = ...) -> None: ...

class X509SVIDResult(_message.Message):
    __slots__ = ("entry_id", "x509_svid", "expires_at", "error")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    X509_SVID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    x509_svid: bytes
    expires_at: int
    error: _types_v1_pb2.ItemError
    def __init__(self, entry_id: _Optional[str] = ..., x509_svid: _Optional[bytes] = ..., expires_at: _Optional[int] = ..., error: _Optional[_Union[_types_v1_pb2.ItemError, _Mapping]] = ...) -> None: ...

class BatchNewX509SVIDResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[X509SVIDResult]
    def __init__(self, results: _Optional[_Iterable[_Union[X509SVIDResult, _Mapping]]] = ...) -> None: ...

class WITParams(_message.Message):
    __slots__ = ("entry_id", "public_jwk", "custody")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_JWK_FIELD_NUMBER: _ClassVar[int]
    CUSTODY_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    public_jwk: str
    custody: _types_v1_pb2.KeyCustody
    def __init__(self, entry_id: _Optional[str] = ..., public_jwk: _Optional[str] = ..., custody: _Optional[_Union[_types_v1_pb2.KeyCustody, _Mapping]] = ...) -> None: ...

class BatchNewWITRequest(_message.Message):
    __slots__ = ("params",)
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[WITParams]
    def __init__(self, params: _Optional[_Iterable[_Union[WITParams, _Mapping]]] = ...) -> None: ...

class WITResult(_message.Message):
    __slots__ = ("entry_id", "wit", "expires_at", "error")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    WIT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    wit: str
    expires_at: int
    error: _types_v1_pb2.ItemError
    def __init__(self, entry_id: _Optional[str] = ..., wit: _Optional[str] = ..., expires_at: _Optional[int] = ..., error: _Optional[_Union[_types_v1_pb2.ItemError, _Mapping]] = ...) -> None: ...

class BatchNewWITResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[WITResult]
    def __init__(self, results: _Optional[_Iterable[_Union[WITResult, _Mapping]]] = ...) -> None: ...

class NewJWTSVIDRequest(_message.Message):
    __slots__ = ("entry_id", "audience")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entry_id: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ...) -> None: ...

class NewJWTSVIDResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class StreamBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
