"""File hashes as A1111 computes them, cached so that a file is read once.

`sha256` of the whole file (A1111's model hash is its first 10 hex digits) and the legacy 8-hex "model hash"
(sha256 of 64 KiB at offset 1 MiB). The cache is a JSON file keyed by absolute path and invalidated by
size and mtime; it is written by replace, so a crash never leaves it half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """Full-file sha256 as lower-case hex, read sequentially in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def addnet_hash(path: Path) -> str:
    """kohya's "addnet" sha256 of a .safetensors file: the bytes after its header (A1111's LoRA hash), so that
    editing a LoRA's metadata does not change it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + header_len)
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def legacy_model_hash(path: Path) -> str:
    """A1111's pre-1.0 8-hex hash: sha256 of the 64 KiB at offset 0x100000 (still accepted as a name)."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


class HashCache:
    """Thread-safe hash cache backed by a JSON file (`None` path = memory only). `compute` is the hash
    function (whole-file sha256 by default; `addnet_hash` for LoRAs)."""

    def __init__(self, cache_file: Path | None, compute: Callable[[Path], str] = sha256_file) -> None:
        self._file = cache_file
        self._hash = compute
        self._lock = threading.Lock()
        self._path_locks: dict[str, threading.Lock] = {}
        self._entries: dict[str, dict] = {}
        self._loaded_stamp: tuple[int, int] | None = None  # the file's (size, mtime) when last read
        with self._lock:
            self._reload_locked()

    def _reload_locked(self) -> None:
        """Merge in what other processes wrote to the file since it was last read (theirs fill gaps; an entry
        this process holds for the same file and stamp is the same hash). Cheap when the file did not move."""
        if self._file is None:
            return
        try:
            stamp = self._stamp(self._file)
        except OSError:
            return
        if stamp == self._loaded_stamp:
            return
        try:
            on_disk = json.loads(self._file.read_text())
        except (OSError, ValueError):
            log.warning("hash cache %s unreadable; keeping what this process knows", self._file)
            return
        self._loaded_stamp = stamp
        if not isinstance(on_disk, dict):
            return
        for key, theirs in on_disk.items():  # for a file both know, the entry of its newer version wins
            mine = self._entries.get(key)
            if mine is None or (isinstance(theirs, dict) and theirs.get("mtime_ns", 0) > mine.get("mtime_ns", 0)):
                self._entries[key] = theirs

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def peek(self, path: Path) -> str | None:
        """The cached sha256 if still valid, without reading the file (another process's entry included)."""
        try:
            size, mtime = self._stamp(path)
        except OSError:
            return None
        key = str(path)
        for reload in (False, True):
            with self._lock:
                if reload:
                    self._reload_locked()
                entry = self._entries.get(key)
            if entry and entry.get("size") == size and entry.get("mtime_ns") == mtime:
                return entry.get("sha256")
        return None

    def sha256(self, path: Path) -> str:
        """The file's sha256, computing and persisting it on a miss. Concurrent callers for one file wait for
        a single read of it."""
        cached = self.peek(path)
        if cached:
            return cached
        with self._lock:
            path_lock = self._path_locks.setdefault(str(path), threading.Lock())
        with path_lock:
            return self.peek(path) or self._compute(path)

    def _compute(self, path: Path) -> str:
        stamp = self._stamp(path)
        log.info("hashing %s (%.1f MB)", path.name, stamp[0] / 1e6)
        value = self._hash(path)
        self.record(path, value, stamp)
        return value

    def record(self, path: Path, value: str, stamp: tuple[int, int]) -> None:
        """Keep `value` as the hash of `path` as it was at `stamp` (size, mtime_ns): a hash computed elsewhere
        (the prefetch reads and hashes in one pass). A stale stamp is harmless: `peek` compares it."""
        size, mtime = stamp
        with self._lock:
            self._entries[str(path)] = {"size": size, "mtime_ns": mtime, "sha256": value}
            self._save_locked()

    def _save_locked(self) -> None:
        if self._file is None:
            return
        self._reload_locked()  # never drop what another process wrote meanwhile
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._file.parent, prefix=".sha256-", suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(self._entries, fh, indent=0, sort_keys=True)
            os.replace(tmp, self._file)
            self._loaded_stamp = self._stamp(self._file)
        except OSError:
            log.warning("could not persist hash cache to %s", self._file)
