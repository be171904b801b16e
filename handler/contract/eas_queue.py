"""PAI-EAS queue service wire formats: the protobuf messages of package `streaming` and the query parameters.

The messages, as the `eas_prediction` SDK (Python 0.36, and the Java SDK) encode them:

    message DataFrameProto     { uint64 index = 1; map<string, string> tags = 2; bytes data = 3; string message = 4; }
    message DataFrameListProto { repeated DataFrameProto index = 1; }
    message AttributesProto    { map<string, string> attributes = 1; }

Three small messages are encoded here by the protobuf wire rules (varints and length-delimited fields; a map is a
repeated entry message of key = 1, value = 2) rather than with the protobuf runtime: the SDK pins protobuf
<= 3.20.3, and a server that imported protobuf would have to match whatever version its clients' package
managers chose. `decode_frame` is the inverse of `encode_frame` (what a client does), tested against the SDK.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Query parameters the protocol reserves; every other query parameter of a put is a tag of its entry.
RESERVED = frozenset({"_index_", "_length_", "_timeout_", "_raw_", "_auto_delete_", "_watch_", "_window_",
                      "_index_only_", "_auto_commit_", "_indexes_", "_trunc_", "_attrs_", "_search_", "requestId"})
REQUEST_ID_HEADER = "X-Eas-Queueservice-Request-Id"
PROTOBUF = "application/vnd.google.protobuf"


MAX_INDEX = 2**63 - 1  # indexes are BIGINT: larger query values are refused, not sent to the database


def failed_result(task_id: str, tag: str | None, *, status: int, error: str, seconds: float) -> dict[str, Any]:
    """A failed task's result in PAI-EAS's shape: `parameters.status` is the HTTP status the synchronous call
    would have answered (never 0), `error_msg` says why; no images. sdfunc adds the task's id, tag and status."""
    return {"images": [], "parameters": {"id_task": task_id, "status": status, "image_url": "", "seed": "",
                                         "error_msg": error, "total_time": round(seconds, 3)},
            "info": "", "task_id": task_id, "tag": tag, "status": "failed"}


@dataclass
class Frame:
    """One queue entry as the protocol carries it (`DataFrameProto`)."""

    index: int
    data: bytes = b""
    tags: dict[str, str] = field(default_factory=dict)
    message: str = ""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _map(number: int, values: Mapping[str, str]) -> bytes:
    return b"".join(_field(number, _field(1, str(k).encode()) + _field(2, str(v).encode()))
                    for k, v in values.items())


def encode_frame(frame: Frame) -> bytes:
    """`DataFrameProto` bytes (proto3: fields at their default value are left out)."""
    out = bytearray()
    if frame.index:
        out += _varint(1 << 3 | 0) + _varint(frame.index)
    out += _map(2, frame.tags)
    if frame.data:
        out += _field(3, frame.data)
    if frame.message:
        out += _field(4, frame.message.encode())
    return bytes(out)


def encode_frame_list(frames: Iterable[Frame]) -> bytes:
    """`DataFrameListProto` bytes."""
    return b"".join(_field(1, encode_frame(f)) for f in frames)


def encode_attributes(attributes: Mapping[str, str]) -> bytes:
    """`AttributesProto` bytes."""
    return _map(1, attributes)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or oversized varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterable[tuple[int, int | bytes]]:
    """(field number, value) pairs of a message: varints as int, length-delimited fields as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            yield number, value
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            yield number, buf[pos:pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")


def decode_frame(buf: bytes) -> Frame:
    """A `DataFrameProto` (ValueError when the bytes are not one)."""
    frame = Frame(index=0)
    for number, value in _fields(buf):
        if number == 1 and isinstance(value, int):
            frame.index = value
        elif number == 2 and isinstance(value, bytes):
            entry = {n: v for n, v in _fields(value) if isinstance(v, bytes)}
            frame.tags[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
        elif number == 3 and isinstance(value, bytes):
            frame.data = value
        elif number == 4 and isinstance(value, bytes):
            frame.message = value.decode()
    return frame
