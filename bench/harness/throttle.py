"""The page cache and the read speed under a benchmark.

`drop_cache(path)` evicts a file's pages from the page cache (clean pages only, hence the fsync first). A slow
mount on a fast disk: cap the read bandwidth of this process and its children with the kernel's block I/O
throttle, so that a benchmark reads a checkpoint as it would from a NAS (FC's NAS gives an instance a few hundred
MB/s) while everything else stays the same.

Contract: `read_throttle(path, mb_s)` is a context manager that moves this process into a fresh cgroup whose
reads from the block device holding `path` are capped at `mb_s` (decimal MB/s): cgroup v1
`blkio.throttle.read_bps_device`, or v2 `io.max rbps`. Children started inside it inherit the cap (a server, the
bare script). On exit the process moves back and the cgroup is removed. Needs root and a mounted blkio / io
controller; otherwise `ThrottleUnavailable` says why. Only data not in the page cache is throttled: drop the
file's pages first (`--drop-cache`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

V1 = Path("/sys/fs/cgroup/blkio")
V2 = Path("/sys/fs/cgroup")


class ThrottleUnavailable(RuntimeError):
    """The machine offers no block I/O throttle to this process."""


def _disk_of(path: Path) -> str:
    """`major:minor` of the whole disk under `path` (a partition's parent: the throttle applies per disk)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    sysfs = Path(f"/sys/dev/block/{major}:{minor}")
    if (sysfs / "partition").exists():
        return (sysfs.resolve().parent / "dev").read_text().strip()
    if not sysfs.exists():
        raise ThrottleUnavailable(f"{path} is not on a block device ({major}:{minor}: overlay, tmpfs or network)")
    return f"{major}:{minor}"


def _procs_file(group: Path) -> Path:
    return group / "cgroup.procs"


@contextmanager
def read_throttle(path: Path, mb_s: float) -> Iterator[str]:
    """Cap this process's (and its future children's) reads from `path`'s disk at `mb_s`; yields a description."""
    disk = _disk_of(Path(path))
    rate = int(mb_s * 1e6)
    name = f"sdfunc-bench-{uuid.uuid4().hex[:8]}"
    if (V1 / "blkio.throttle.read_bps_device").exists():
        group, limit, value, parent = V1 / name, "blkio.throttle.read_bps_device", f"{disk} {rate}", V1
    elif (V2 / "cgroup.controllers").exists() and "io" in (V2 / "cgroup.controllers").read_text().split():
        group, limit, value, parent = V2 / name, "io.max", f"{disk} rbps={rate}", V2
    else:
        raise ThrottleUnavailable("no cgroup blkio (v1) or io (v2) controller is mounted")
    try:
        group.mkdir()
        (group / limit).write_text(value)
        _procs_file(group).write_text(str(os.getpid()))
    except OSError as e:
        if group.exists():
            group.rmdir()
        raise ThrottleUnavailable(f"cannot set a read throttle ({e}); it needs root") from e
    try:
        yield f"reads from disk {disk} capped at {mb_s:g} MB/s ({limit})"
    finally:
        _procs_file(parent).write_text(str(os.getpid()))
        with suppress(OSError):  # still busy only if a child outlived the benchmark; the group is harmless
            group.rmdir()


def drop_cache(path: Path) -> None:
    """Evict `path`'s pages from the page cache (clean pages only, hence the fsync first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
