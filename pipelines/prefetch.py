"""Read checkpoints' bytes ahead of their load, in a process of its own, while the server imports its modules.

A cold start is serial without this: the heavy imports (CPU, seconds) and then reading a multi-GB checkpoint (I/O,
seconds, more on a NAS). This module reads the files the worker will load first (the warm-up checkpoints, else
the default) from the moment the server starts, so that the load finds them in the page cache (or, with
`cache.copy_to_local`, as a fresh local copy), and hashes them on the way (A1111's `Model hash` needs the
file's sha256, which would otherwise be one more full read before the load).

- `python -m pipelines.prefetch --hash-cache FILE [--local-dir D] [--local-max-bytes N] PATH...` reads each file
  sequentially in large chunks (one stream: safe on a NAS), hashes it unless its hash is already cached, stores
  the hash in the hash cache file (pipelines.hashing, shared with the worker) only when the file's size and mtime
  were the same before and after the read, and writes one JSON line per file to stdout (`PrefetchResult`).
  Standard library only: it never imports torch, so it costs no CPU the imports need.
- `spawn(...)` starts that process with its stdout on a pipe and returns the read end; the gunicorn master calls
  it at start, and its workers inherit the descriptor (`PREFETCH_FD_ENV`).
- `PrefetchWatch` reads the results in a worker: `wait(path)` blocks until that file is read (or the process
  ended), so a load never starts on a file that is still being read; a file that changed while it was read is
  reported `changed` and the worker loads it as if there had been no prefetch.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import mmap
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.hashing import HashCache
from pipelines.local_copy import COPY_CHUNK_BYTES, local_copy
from pipelines.store import CheckpointEntry

log = logging.getLogger(__name__)

PREFETCH_FD_ENV = "SDFUNC_PREFETCH_FD"  # the read end of the results pipe, inherited by the workers
FULLY_RESIDENT = 0.999  # a file this much in the page cache (and hashed) is not read again


@dataclass
class PrefetchResult:
    """One file's prefetch: `status` is `read` (bytes in the page cache or the local copy, hash cached),
    `changed` (size or mtime moved during the read: nothing cached), `missing` or `error` (`error` says why).
    `started` / `ended` are epoch seconds."""

    path: str
    status: str
    bytes: int = 0
    started: float = 0.0
    ended: float = 0.0
    hashed: bool = False  # the hash was computed by this read (False: it was cached already, or not read)
    resident: bool = False  # the file was in the page cache already and its hash known: nothing was read
    error: str = ""

    @property
    def seconds(self) -> float:
        return max(0.0, self.ended - self.started)


def resident_share(path: Path) -> float | None:
    """The share of `path`'s pages in the page cache now (mincore on a read-only mapping, which reads nothing);
    None where that cannot be asked (not Linux, an empty file)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # this process's libc: no library search
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        size = Path(path).stat().st_size
        if size == 0:
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                pages = -(-size // mmap.PAGESIZE)
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                return round(1 - bytes(vec).count(0) / pages, 4)
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    except (OSError, AttributeError, TypeError):
        return None


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


def _read_hashing(path: Path, hashing: bool, chunk_bytes: int, after_chunk: Callable[[int], None] | None) -> str | None:
    """Read `path` start to end in `chunk_bytes` reads; its sha256 when `hashing`."""
    digest = hashlib.sha256() if hashing else None
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    done = 0
    with open(path, "rb", buffering=0) as fh:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
        while n := fh.readinto(view):
            if digest is not None:
                digest.update(view[:n])  # releases the GIL: the hash runs beside the reads
            done += n
            if after_chunk is not None:
                after_chunk(done)
    return digest.hexdigest() if digest is not None else None


def prefetch_file(path: Path, hashes: HashCache, *, local_dir: Path | None = None, local_max_bytes: int | None = None,
                  chunk_bytes: int = COPY_CHUNK_BYTES,
                  after_chunk: Callable[[int], None] | None = None) -> PrefetchResult:
    """Read `path` into the page cache (or its local copy into `local_dir`), hashing it into `hashes` unless the
    hash is cached. The hash is kept only when size and mtime did not move during the read. `after_chunk(bytes
    read so far)` runs after each chunk (tests replace the file there)."""
    path = Path(path)
    started = time.time()
    try:
        before = path.stat()
    except FileNotFoundError:
        return PrefetchResult(str(path), "missing", started=started, ended=time.time())
    known = hashes.peek(path) is not None
    if known and local_dir is None and (resident_share(path) or 0.0) >= FULLY_RESIDENT:
        # Nothing to do: reading it again would only take CPU from the imports beside this process.
        return PrefetchResult(str(path), "read", before.st_size, started, time.time(), resident=True)
    try:
        if local_dir is not None:
            copy, _ = local_copy(path, Path(local_dir), max_bytes=local_max_bytes)  # checks size and mtime itself
            sha = None if known else _read_hashing(copy, True, chunk_bytes, after_chunk)  # the copy: page cache
        else:
            sha = _read_hashing(path, not known, chunk_bytes, after_chunk)
        after = path.stat()
    except FileNotFoundError:
        return PrefetchResult(str(path), "missing", started=started, ended=time.time())
    except Exception as e:  # noqa: BLE001 - a prefetch never fails the server; the load reports the file's fault
        try:
            moved = _stamp(path.stat()) != _stamp(before)
        except OSError:
            moved = True
        if moved:  # e.g. local_copy's own check: the file changed while it was copied
            return PrefetchResult(str(path), "changed", before.st_size, started, time.time())
        return PrefetchResult(str(path), "error", started=started, ended=time.time(),
                              error=f"{type(e).__name__}: {e}"[:300])
    ended = time.time()
    if _stamp(after) != _stamp(before):
        return PrefetchResult(str(path), "changed", before.st_size, started, ended)
    if sha is not None:
        hashes.record(path, sha, _stamp(before))
    return PrefetchResult(str(path), "read", before.st_size, started, ended, hashed=sha is not None)


def startup_paths(checkpoints: Iterable[CheckpointEntry], names: Sequence[str], default: str | None) -> list[Path]:
    """The single files a worker loads first: those `names` match (else `default`, else the first checkpoint).

    `checkpoints` in the store's order. Matching is by name, model name or stem (a `name [hash]` title by its
    name part); hash-only names are skipped here, because resolving them means hashing, which is the prefetch's
    own work. Diffusers folders are skipped (many small files)."""
    entries = list(checkpoints)
    wanted = list(names) or ([default] if default else [])
    chosen: list[CheckpointEntry] = [] if wanted else entries[:1]
    for name in wanted:
        bare = name.strip().partition(" [")[0]
        match = next((e for e in entries if bare in (e.name, e.model_name, e.stem)), None)
        if match is not None and match not in chosen:
            chosen.append(match)
    return [e.path for e in chosen if not e.is_dir]


def run(paths: Sequence[Path], hashes: HashCache, out, *, local_dir: Path | None = None,
        local_max_bytes: int | None = None) -> list[PrefetchResult]:
    """Prefetch `paths` in order: first one JSON line `{"planned": [path, ...]}`, then each result as one JSON line
    to `out` as soon as it is known."""
    out.write(json.dumps({"planned": [str(p) for p in paths]}) + "\n")
    out.flush()
    results = []
    for path in paths:
        result = prefetch_file(path, hashes, local_dir=local_dir, local_max_bytes=local_max_bytes)
        out.write(json.dumps(asdict(result)) + "\n")
        out.flush()
        results.append(result)
    return results


def spawn(paths: Sequence[Path], *, hash_file: Path, local_dir: Path | None = None,
          local_max_bytes: int | None = None) -> tuple[subprocess.Popen, int]:
    """Start `python -m pipelines.prefetch` on `paths`; (the process, the read end of its results pipe). The
    caller keeps the read end open for its future children (a forked worker reads it); the write end lives only
    in the prefetch process, so the pipe reaches end of file when that process ends."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, True)
    argv = [sys.executable, "-m", "pipelines.prefetch", "--hash-cache", str(hash_file)]
    if local_dir is not None:
        argv += ["--local-dir", str(local_dir)]
        if local_max_bytes is not None:
            argv += ["--local-max-bytes", str(local_max_bytes)]
    try:
        proc = subprocess.Popen([*argv, "--", *map(str, paths)], stdin=subprocess.DEVNULL, stdout=write_fd)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return proc, read_fd


class PrefetchWatch:
    """A worker's view of the prefetch process: reads its result lines from `fd` on a thread.

    `wait(path, timeout)` returns that file's result once it is known; None at once when the file is not one the
    process plans to read, and None when the process ended without reporting it (or `timeout` passed: the caller
    then loads anyway)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._planned: set[str] | None = None  # known from the process's first line
        self._results: dict[str, PrefetchResult] = {}
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name="sdfunc-prefetch-watch", daemon=True).start()

    @classmethod
    def from_env(cls) -> PrefetchWatch | None:
        """The watch over `PREFETCH_FD_ENV`'s descriptor, or None when there is none (no prefetch, no gunicorn)."""
        value = os.environ.get(PREFETCH_FD_ENV)
        if not value:
            return None
        try:
            fd = int(value)
            os.fstat(fd)
        except (ValueError, OSError):
            return None
        return cls(fd)

    def _read(self) -> None:
        try:
            with os.fdopen(self._fd, "r", encoding="utf-8", closefd=True) as stream:
                for line in stream:
                    try:
                        record = json.loads(line)
                        if "planned" in record:
                            with self._changed:
                                self._planned = set(record["planned"])
                                self._changed.notify_all()
                            continue
                        result = PrefetchResult(**record)
                    except (ValueError, TypeError):
                        continue
                    self._report(result)
                    with self._changed:
                        self._results[result.path] = result
                        self._changed.notify_all()
        except OSError:
            pass
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    @staticmethod
    def _report(result: PrefetchResult) -> None:
        name = Path(result.path).name
        if result.status == "read" and result.resident:
            log.info("prefetched %s: in the page cache already, hash known; nothing read", name)
        elif result.status == "read":
            log.info("prefetched %s (%.0f MiB in %.2f s%s)", name, result.bytes / 2**20, result.seconds,
                     ", hashed" if result.hashed else "")
        elif result.status == "changed":
            log.warning("prefetch of %s: the file changed while it was read; it loads from the mount", name)
        else:
            log.warning("prefetch of %s: %s%s", name, result.status, f" ({result.error})" if result.error else "")

    @property
    def ended(self) -> bool:
        with self._changed:
            return self._ended

    def results(self) -> list[PrefetchResult]:
        with self._changed:
            return list(self._results.values())

    def wait(self, path: Path, timeout: float) -> PrefetchResult | None:
        key = str(path)

        def known() -> bool:
            planned = self._planned
            return key in self._results or self._ended or (planned is not None and key not in planned)

        with self._changed:
            self._changed.wait_for(known, timeout=timeout)
            return self._results.get(key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.prefetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--hash-cache", type=Path, required=True, help="the hash cache file (pipelines.hashing)")
    p.add_argument("--local-dir", type=Path, help="copy each file here (cache.copy_to_local) instead of reading it")
    p.add_argument("--local-max-bytes", type=int, help="budget of the local copies")
    p.add_argument("paths", nargs="*", type=Path)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if hasattr(os, "nice"):
        os.nice(10)  # where it competes for a core with the imports beside it (small machines), the imports win
    run(a.paths, HashCache(a.hash_cache), sys.stdout, local_dir=a.local_dir, local_max_bytes=a.local_max_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
