# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Chunk(_message.Message):
    __slots__ = ("seq", "kind", "round", "total_bytes", "index", "last", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: str
    round: int
    total_bytes: int
    index: int
    last: bool
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[str] = ..., round: _Optional[int] = ..., total_bytes: _Optional[int] = ..., index: _Optional[int] = ..., last: _Optional[bool] = ..., data: _Optional[bytes] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("client_id", "cut", "num_samples", "codec", "mode", "tail")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    cut: int
    num_samples: int
    codec: str
    mode: str
    tail: int
    def __init__(self, client_id: _Optional[int] = ..., cut: _Optional[int] = ..., num_samples: _Optional[int] = ..., codec: _Optional[str] = ..., mode: _Optional[str] = ..., tail: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("round", "steps", "interval", "mode", "cut")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    round: int
    steps: int
    interval: int
    mode: str
    cut: int
    def __init__(self, round: _Optional[int] = ..., steps: _Optional[int] = ..., interval: _Optional[int] = ..., mode: _Optional[str] = ..., cut: _Optional[int] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("kind", "round", "message")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DONE: _ClassVar[Control.Kind]
        REFUSED: _ClassVar[Control.Kind]
    DONE: Control.Kind
    REFUSED: Control.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: Control.Kind
    round: int
    message: str
    def __init__(self, kind: _Optional[_Union[Control.Kind, str]] = ..., round: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ClientFrame(_message.Message):
    __slots__ = ("hello", "chunk")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    chunk: Chunk
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("welcome", "chunk", "control")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    chunk: Chunk
    control: Control
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., control: _Optional[_Union[Control, _Mapping]] = ...) -> None: ...

class RoundOpen(_message.Message):
    __slots__ = ("round", "client_ids")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    client_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., client_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LatestRequest(_message.Message):
    __slots__ = ("min_round", "wait_s")
    MIN_ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    min_round: int
    wait_s: float
    def __init__(self, min_round: _Optional[int] = ..., wait_s: _Optional[float] = ...) -> None: ...
