from custos._proto import types_v1_pb2 as _types_v1_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntryId(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ("parent_id", "spiffe_id", "selectors", "match")
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    parent_id: str
    spiffe_id: str
    selectors: _containers.RepeatedScalarFieldContainer[str]
    match: str
    def __init__(self, parent_id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., selectors: _Optional[_Iterable[str]] = ..., match: _Optional[str] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_types_v1_pb2.Entry]
    def __init__(self, entries: _Optional[_Iterable[_Union[_types_v1_pb2.Entry, _Mapping]]] = ...) -> None: ...

class DeleteEntryRequest(_message.Message):
    __slots__ = ("id", "revision")
    ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    id: str
    revision: int
    def __init__(self, id: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class DeleteEntryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CountEntriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CountEntriesResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class GenerateTokenRequest(_message.Message):
    __slots__ = ("ttl", "spiffe_id")
    TTL_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ttl: int
    spiffe_id: str
    def __init__(self, ttl: _Optional[int] = ..., spiffe_id: _Optional[str] = ...) -> None: ...

class GenerateTokenResponse(_message.Message):
    __slots__ = ("token", "token_id", "expires_at", "agent_id", "alias")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: str
    expires_at: int
    agent_id: str
    alias: _types_v1_pb2.Entry
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[str] = ..., expires_at: _Optional[int] = ..., agent_id: _Optional[str] = ..., alias: _Optional[_Union[_types_v1_pb2.Entry, _Mapping]] = ...) -> None: ...

class AgentId(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("id", "attestor", "selectors", "serial", "expires_at", "evicted", "banned", "updated_at", "attestation_key")
    ID_FIELD_NUMBER: _ClassVar[int]
    ATTESTOR_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    BANNED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_KEY_FIELD_NUMBER: _ClassVar[int]
    id: str
    attestor: str
    selectors: _containers.RepeatedScalarFieldContainer[str]
    serial: str
    expires_at: int
    evicted: bool
    banned: bool
    updated_at: int
    attestation_key: bytes
    def __init__(self, id: _Optional[str] = ..., attestor: _Optional[str] = ..., selectors: _Optional[_Iterable[str]] = ..., serial: _Optional[str] = ..., expires_at: _Optional[int] = ..., evicted: _Optional[bool] = ..., banned: _Optional[bool] = ..., updated_at: _Optional[int] = ..., attestation_key: _Optional[bytes] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ...) -> None: ...

class GetBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateKeysResponse(_message.Message):
    __slots__ = ("kids",)
    KIDS_FIELD_NUMBER: _ClassVar[int]
    kids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kids: _Optional[_Iterable[str]] = ...) -> None: ...
