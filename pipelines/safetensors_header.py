"""The header of a `.safetensors` file, read without torch and without touching the tensor bytes.

Layout: an 8-byte little-endian header length, that many bytes of JSON (tensor name -> `dtype`, `shape`,
`data_offsets`, plus an optional `__metadata__` of strings), then the tensor data. Everything that reads a
header (checkpoint loading, LoRA and embedding scans, the download checks) goes through `read_header`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference implementation's own limit


class HeaderError(ValueError):
    """Not a well-formed safetensors file; the message says why (no path in it: callers name the file)."""


@dataclass(frozen=True)
class Header:
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    length: int  # bytes of JSON after the 8-byte length; the data starts at 8 + length

    def shapes(self) -> dict[str, tuple[str, list[int]]]:
        """Tensor name -> (dtype, shape)."""
        return {name: (str(info["dtype"]), [int(s) for s in info["shape"]]) for name, info in self.tensors.items()}


def read_header(path: Path, *, check_offsets: bool = False) -> Header:
    """Parse the header of `path`. HeaderError when it is not one: too short, a header length past the file or
    the limit, JSON that is not an object, a tensor entry without a dtype or a list shape, and (with
    `check_offsets`) data offsets outside the file or no tensor at all. OSError (FileNotFoundError...) as
    raised by the file system."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise HeaderError("not a safetensors file (too short)")
        length = int.from_bytes(head, "little")
        size = os.fstat(fh.fileno()).st_size
        if length < 2 or length > MAX_HEADER_BYTES or length + 8 > size:
            raise HeaderError("not a safetensors file (bad header length)")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HeaderError("not a safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise HeaderError("not a safetensors file (the header is not a JSON object)")
    meta = header.pop("__metadata__", None)
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    data = size - 8 - length
    for name, info in header.items():
        if not isinstance(info, dict) or "dtype" not in info or not isinstance(info.get("shape"), list):
            raise HeaderError(f"malformed safetensors header (tensor {name[:80]!r})")
        if check_offsets:
            offsets = info.get("data_offsets")
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1] <= data):
                raise HeaderError(f"malformed safetensors header (tensor {name[:80]!r} lies outside the file)")
    if check_offsets and not header:
        raise HeaderError("the safetensors file holds no tensors")
    return Header(tensors=header, metadata=metadata, length=length)


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file; empty when it has none or is not readable as one."""
    try:
        return read_header(path).metadata
    except (OSError, HeaderError):
        return {}
