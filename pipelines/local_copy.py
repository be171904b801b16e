"""Local copies of single-file checkpoints on slow storage (a NAS or OSS mount): standard library only, so that
the prefetch process (pipelines.prefetch) can copy without importing torch.

Mapping a file on a network mount faults it in page by page, one round trip each; a copy made with large
sequential reads and then loaded from local disk is much faster. Copies are reused while the source's size and
mtime match, written under a temporary name and renamed into place, and trimmed least-recently-used to a budget.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from pipelines.errors import CheckpointError, ModelNotFound

logger = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 16 * 1024 * 1024  # one read request per 16 MiB: few round trips on a network mount
_PART_MAX_AGE_S = 24 * 3600  # a `.part` file this old is the remains of a killed copy


def _copy_name(path: Path) -> str:
    """The local copy's file name: unique per source path, readable by its stem."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]
    return f"{digest}-{Path(path).name}"


def _matches(local: os.stat_result, source: os.stat_result) -> bool:
    return local.st_size == source.st_size and local.st_mtime_ns == source.st_mtime_ns


def local_copy(path: Path, local_dir: Path, *, max_bytes: int | None = None) -> tuple[Path, bool]:
    """A copy of the single file `path` in `local_dir`, and whether it was copied now (False: reused).

    The copy carries the source's mtime; it is reused while size and mtime match, else replaced. It is
    written under a temporary name and renamed into place, so a loaded (memory-mapped) older copy is never
    changed in place. Reads are sequential, `COPY_CHUNK_BYTES` at a time. Afterwards the least recently used
    other copies are deleted until all copies fit in `max_bytes` (None: no limit; the new copy is kept even if
    it alone is larger). A copy that would not fit on the local disk is skipped: the source is loaded instead.
    """
    path, local_dir = Path(path), Path(local_dir)
    try:
        source = path.stat()
    except FileNotFoundError as e:
        raise ModelNotFound(f"{path.name}: no such checkpoint") from e
    local_dir.mkdir(parents=True, exist_ok=True)
    local = local_dir / _copy_name(path)
    try:
        if _matches(local.stat(), source):
            os.utime(local, ns=(time.time_ns(), source.st_mtime_ns))  # atime = last use, for the clean-up
            return local, False
    except FileNotFoundError:
        pass
    if max_bytes is not None:  # make room first: old copies must not push new ones back onto the mount
        clean_local_copies(local_dir, max(0, max_bytes - source.st_size))
    if shutil.disk_usage(local_dir).free < source.st_size:
        logger.warning("not enough local disk in %s for %s: loading from the mount", local_dir, path.name)
        return path, False
    part = local_dir / f".{local.name}.{uuid.uuid4().hex[:8]}.part"
    started = time.perf_counter()
    try:
        with path.open("rb", buffering=0) as src, part.open("wb") as dst:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
            shutil.copyfileobj(src, dst, COPY_CHUNK_BYTES)
        if not _matches(path.stat(), source) or part.stat().st_size != source.st_size:
            raise CheckpointError(f"{path.name}: the file changed while it was copied to local disk")
        os.utime(part, ns=(time.time_ns(), source.st_mtime_ns))
        os.replace(part, local)
    finally:
        part.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    logger.info("copied %s to %s (%.0f MiB in %.2f s)", path.name, local_dir, source.st_size / 2**20, seconds)
    clean_local_copies(local_dir, max_bytes, keep=local)
    return local, True


def clean_local_copies(local_dir: Path, max_bytes: int | None, *, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used copies in `local_dir` (never `keep`) until the rest fit in `max_bytes`,
    and `.part` files of killed copies; returns what was deleted."""
    removed: list[Path] = []
    copies: list[tuple[float, int, Path]] = []
    now = time.time()
    for p in Path(local_dir).iterdir():
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if not p.is_file():
            continue
        if p.name.startswith("."):
            if p.name.endswith(".part") and now - st.st_mtime > _PART_MAX_AGE_S:
                p.unlink(missing_ok=True)
                removed.append(p)
            continue
        copies.append((st.st_atime, st.st_size, p))
    if max_bytes is None:
        return removed
    total = sum(size for _, size, _ in copies)
    for _, size, p in sorted(copies):
        if total <= max_bytes:
            break
        if keep is not None and p == keep:
            continue
        p.unlink(missing_ok=True)  # a pipeline still mapping it keeps its pages; the space frees when it goes
        total -= size
        removed.append(p)
        logger.info("deleted local copy %s (local copies over %d bytes)", p.name, max_bytes)
    return removed
