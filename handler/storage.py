"""Where generated images go: `put(key, bytes) -> url`.

`LocalStorage` writes under a root folder (the local data folder or a NAS/OSS mount). Keys are relative,
unique per request, and can never leave the root; files appear atomically (temp file + rename).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol


class Storage(Protocol):
    def put(self, key: str, data: bytes) -> str: ...


class LocalStorage:
    """A folder. `put` returns the absolute path of the written file."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path_for(self, key: str) -> Path:
        """The file a key maps to; ValueError when it would escape the root."""
        target = (self.root / key).resolve()
        if target == self.root or self.root not in target.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return target

    def put(self, key: str, data: bytes) -> str:
        target = self.path_for(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".put-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(target)
