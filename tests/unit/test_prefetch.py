"""pipelines.prefetch: the master's read-ahead of the first checkpoints, and what a worker sees of it.

The prefetch must never hand a load a half-read file or a hash of other bytes: a file replaced or rewritten
while it is read is reported `changed` and its hash is not kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.hashing import HashCache, sha256_file
from pipelines.prefetch import PrefetchWatch, prefetch_file, resident_share, spawn, startup_paths
from pipelines.store import CheckpointEntry
from tests.support.waiting import wait_for

CHUNK = 4096


def _file(path: Path, size: int = 5 * CHUNK + 100, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes((i * seed + i // 7) % 251 for i in range(size)))
    return path


def test_read_hashes_once_and_shares_the_hash_through_the_cache_file(tmp_path):
    ckpt = _file(tmp_path / "a.safetensors")
    cache_file = tmp_path / "cache" / "sha256.json"
    result = prefetch_file(ckpt, HashCache(cache_file), chunk_bytes=CHUNK)
    assert (result.status, result.bytes, result.hashed) == ("read", ckpt.stat().st_size, True)
    assert result.ended >= result.started
    # Another process's cache (the worker's, made before the prefetch ended) sees the hash without reading.
    worker = HashCache(cache_file)
    assert worker.peek(ckpt) == sha256_file(ckpt)
    # A second prefetch reads the bytes again (the page cache may have dropped them) but hashes nothing.
    again = prefetch_file(ckpt, HashCache(cache_file), chunk_bytes=CHUNK)
    assert (again.status, again.hashed) == ("read", False)


def test_the_worker_saving_its_own_hash_keeps_the_prefetched_one(tmp_path):
    one, two = _file(tmp_path / "one.safetensors"), _file(tmp_path / "two.safetensors", seed=3)
    cache_file = tmp_path / "sha256.json"
    worker = HashCache(cache_file)  # made first, as the worker's is: it read an empty cache
    prefetch_file(one, HashCache(cache_file), chunk_bytes=CHUNK)
    assert worker.sha256(two) == sha256_file(two)  # computes and saves
    on_disk = json.loads(cache_file.read_text())
    assert on_disk[str(one)]["sha256"] == sha256_file(one) and on_disk[str(two)]["sha256"] == sha256_file(two)


@pytest.mark.parametrize("how", ["replaced", "rewritten in place"])
def test_a_file_that_changes_while_it_is_read_is_reported_and_not_hashed(tmp_path, how):
    ckpt = _file(tmp_path / "m.safetensors")
    cache_file = tmp_path / "sha256.json"

    def change(done: int) -> None:
        if done == CHUNK:  # after the first chunk: a new upload lands (new inode) or the file is overwritten
            if how == "replaced":
                _file(tmp_path / "new.tmp", seed=5)
                os.replace(tmp_path / "new.tmp", ckpt)
            else:
                with open(ckpt, "r+b") as fh:
                    fh.write(b"\xff" * 10)
                os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 1_000_000))

    result = prefetch_file(ckpt, HashCache(cache_file), chunk_bytes=CHUNK, after_chunk=change)
    assert result.status == "changed" and not result.hashed
    fresh = HashCache(cache_file)
    assert fresh.peek(ckpt) is None  # nothing claims a hash for either version
    assert fresh.sha256(ckpt) == sha256_file(ckpt)  # the loader's own hash is of the file as it is now


def test_a_hashed_file_already_in_the_page_cache_is_not_read_again(tmp_path):
    ckpt = _file(tmp_path / "m.safetensors")
    cache_file = tmp_path / "sha256.json"
    assert prefetch_file(ckpt, HashCache(cache_file), chunk_bytes=CHUNK).hashed  # first: read and hashed
    assert resident_share(ckpt) == 1.0  # just read: every page is in the page cache

    def read(done: int) -> None:
        raise AssertionError("a resident, hashed file was read again")

    again = prefetch_file(ckpt, HashCache(cache_file), chunk_bytes=CHUNK, after_chunk=read)
    assert (again.status, again.resident, again.hashed) == ("read", True, False)
    fd = os.open(ckpt, os.O_RDONLY)  # out of the page cache: read again (the bytes, not the hash)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    chunks: list[int] = []
    cold = prefetch_file(ckpt, HashCache(cache_file), chunk_bytes=CHUNK, after_chunk=chunks.append)
    assert (cold.status, cold.resident, cold.hashed) == ("read", False, False) and chunks[-1] == ckpt.stat().st_size


def test_missing_and_unreadable_files_are_results_not_errors(tmp_path):
    hashes = HashCache(tmp_path / "sha256.json")
    assert prefetch_file(tmp_path / "gone.safetensors", hashes).status == "missing"
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    broken = prefetch_file(folder, hashes)
    assert broken.status == "error" and "IsADirectory" in broken.error


def test_with_a_local_dir_the_prefetch_makes_the_local_copy_and_hashes_it(tmp_path):
    ckpt = _file(tmp_path / "mount" / "m.safetensors")
    local = tmp_path / "local"
    result = prefetch_file(ckpt, HashCache(tmp_path / "sha256.json"), local_dir=local, chunk_bytes=CHUNK)
    assert result.status == "read" and result.hashed
    copies = list(local.iterdir())
    assert len(copies) == 1 and copies[0].read_bytes() == ckpt.read_bytes()
    assert HashCache(tmp_path / "sha256.json").peek(ckpt) == sha256_file(ckpt)


def test_startup_paths_follow_the_warm_up_names_then_the_default_then_the_first(tmp_path):
    entries = [CheckpointEntry("a.safetensors", tmp_path / "a.safetensors", False),
               CheckpointEntry("sub/b.safetensors", tmp_path / "sub" / "b.safetensors", False),
               CheckpointEntry("folder", tmp_path / "folder", True)]
    assert startup_paths(entries, ["b", "a.safetensors [0123456789]", "nope", "b"], "a") == [entries[1].path,
                                                                                               entries[0].path]
    assert startup_paths(entries, [], "sub_b") == [entries[1].path]
    assert startup_paths(entries, [], None) == [entries[0].path]
    assert startup_paths(entries, [], "missing") == []  # the warm-up reports the unknown default, as before
    assert startup_paths(entries, ["folder"], None) == []  # diffusers folders are not prefetched
    assert startup_paths([], [], None) == []


def test_spawned_prefetch_reports_each_file_to_the_watch_and_ends(tmp_path):
    one, two = _file(tmp_path / "one.safetensors"), _file(tmp_path / "two.safetensors", seed=2)
    missing = tmp_path / "missing.safetensors"
    proc, read_fd = spawn([one, missing, two], hash_file=tmp_path / "sha256.json")
    try:
        watch = PrefetchWatch(os.dup(read_fd))
        assert watch.wait(two, timeout=60).status == "read"
        assert watch.wait(missing, timeout=60).status == "missing"
        assert watch.wait(tmp_path / "not-prefetched.safetensors", timeout=60) is None  # not planned: no wait
        assert proc.wait(timeout=60) == 0
        wait_for(lambda: watch.ended, 60, "the watch to see the end of the results")
        assert {Path(r.path).name for r in watch.results()} == {one.name, two.name, missing.name}
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            proc.kill()
    assert HashCache(tmp_path / "sha256.json").peek(one) == sha256_file(one)


def test_the_prefetch_process_does_not_import_torch(tmp_path):
    """It runs beside the imports on a CPU they need: standard library only."""
    code = ("import sys; import pipelines.prefetch as p; p.main(['--hash-cache', sys.argv[1]]);"
            "print(sorted(m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "h.json")], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip().splitlines() == ['{"planned": []}', "[]"]


def test_a_load_of_a_file_the_prefetch_does_not_plan_never_waits_for_it(tmp_path):
    """The watch knows the plan from the process's first line: another checkpoint loads at once, while the
    planned one waits for its result (here the writer is this test, so nothing ends on its own)."""
    read_fd, write_fd = os.pipe()
    watch = PrefetchWatch(read_fd)
    planned, other = tmp_path / "big.safetensors", tmp_path / "other.safetensors"
    with os.fdopen(write_fd, "w") as writer:
        writer.write(json.dumps({"planned": [str(planned)]}) + "\n")
        writer.flush()
        assert watch.wait(other, timeout=60) is None and not watch.ended
        assert watch.wait(planned, timeout=0.05) is None and not watch.ended  # still being read
        writer.write(json.dumps({"path": str(planned), "status": "read", "bytes": 5}) + "\n")
        writer.flush()
        assert watch.wait(planned, timeout=60).status == "read"
    wait_for(lambda: watch.ended, 60, "the watch to see the writer close")
    assert watch.wait(tmp_path / "x.safetensors", timeout=60) is None


def test_no_watch_without_the_masters_descriptor(monkeypatch):
    monkeypatch.delenv("SDFUNC_PREFETCH_FD", raising=False)
    assert PrefetchWatch.from_env() is None
    monkeypatch.setenv("SDFUNC_PREFETCH_FD", "987654")  # not an open descriptor
    assert PrefetchWatch.from_env() is None
