from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FetchWITRequest(_message.Message):
    __slots__ = ("spiffe_id",)
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    def __init__(self, spiffe_id: _Optional[str] = ...) -> None: ...

class FetchWITResponse(_message.Message):
    __slots__ = ("spiffe_id", "wit", "hint", "expires_at")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    WIT_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    wit: str
    hint: str
    expires_at: int
    def __init__(self, spiffe_id: _Optional[str] = ..., wit: _Optional[str] = ..., hint: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class SignWPTRequest(_message.Message):
    __slots__ = ("spiffe_id", "audience", "txn_token", "other_tokens", "ttl_seconds", "wire")
    class OtherTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    TXN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OTHER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WIRE_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    audience: str
    txn_token: str
    other_tokens: _containers.ScalarMap[str, str]
    ttl_seconds: int
    wire: str
    def __init__(self, spiffe_id: _Optional[str] = ..., audience: _Optional[str] = ..., txn_token: _Optional[str] = ..., other_tokens: _Optional[_Mapping[str, str]] = ..., ttl_seconds: _Optional[int] = ..., wire: _Optional[str] = ...) -> None: ...

class SignWPTResponse(_message.Message):
    __slots__ = ("spiffe_id", "wit", "wpt")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    WIT_FIELD_NUMBER: _ClassVar[int]
    WPT_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    wit: str
    wpt: str
    def __init__(self, spiffe_id: _Optional[str] = ..., wit: _Optional[str] = ..., wpt: _Optional[str] = ...) -> None: ...

class HttpField(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class HttpRequest(_message.Message):
    __slots__ = ("method", "target", "headers", "body")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    method: str
    target: str
    headers: _containers.RepeatedCompositeFieldContainer[HttpField]
    body: bytes
    def __init__(self, method: _Optional[str] = ..., target: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[HttpField, _Mapping]]] = ..., body: _Optional[bytes] = ...) -> None: ...

class SignHttpRequestRequest(_message.Message):
    __slots__ = ("spiffe_id", "request", "audience", "sign_response", "ttl_seconds", "txn_token", "form")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SIGN_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TXN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    request: HttpRequest
    audience: str
    sign_response: bool
    ttl_seconds: int
    txn_token: str
    form: str
    def __init__(self, spiffe_id: _Optional[str] = ..., request: _Optional[_Union[HttpRequest, _Mapping]] = ..., audience: _Optional[str] = ..., sign_response: _Optional[bool] = ..., ttl_seconds: _Optional[int] = ..., txn_token: _Optional[str] = ..., form: _Optional[str] = ...) -> None: ...

class SignHttpResponseRequest(_message.Message):
    __slots__ = ("spiffe_id", "status", "headers", "body", "request", "request_nonce", "ttl_seconds")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_NONCE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    status: int
    headers: _containers.RepeatedCompositeFieldContainer[HttpField]
    body: bytes
    request: HttpRequest
    request_nonce: str
    ttl_seconds: int
    def __init__(self, spiffe_id: _Optional[str] = ..., status: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[HttpField, _Mapping]]] = ..., body: _Optional[bytes] = ..., request: _Optional[_Union[HttpRequest, _Mapping]] = ..., request_nonce: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class SignedHttpMessage(_message.Message):
    __slots__ = ("spiffe_id", "headers")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    headers: _containers.RepeatedCompositeFieldContainer[HttpField]
    def __init__(self, spiffe_id: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[HttpField, _Mapping]]] = ...) -> None: ...

class FetchX509ChainRequest(_message.Message):
    __slots__ = ("spiffe_id",)
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    def __init__(self, spiffe_id: _Optional[str] = ...) -> None: ...

class FetchX509ChainResponse(_message.Message):
    __slots__ = ("spiffe_id", "x509_svid", "bundle", "hint", "expires_at")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    X509_SVID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    x509_svid: bytes
    bundle: bytes
    hint: str
    expires_at: int
    def __init__(self, spiffe_id: _Optional[str] = ..., x509_svid: _Optional[bytes] = ..., bundle: _Optional[bytes] = ..., hint: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
