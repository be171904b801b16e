"""The download manager: fetches model files into the models folder in the background and keeps their states
(the routes, `POST /models/download` and `GET /models/download/<id>`, are handler.api.downloads).

Contract:
- Sources: https URLs (http with `downloads.allow_http`), fetched through handler.security.netguard (addresses
  checked, connection pinned, redirects re-checked), or `oss://bucket/key` through oss2 with the environment's
  credentials.
- The type names the folder: CHECKPOINT models/Stable-diffusion, LORA models/Lora, VAE models/VAE,
  EMBEDDING embeddings, CONTROLNET models/ControlNet, OTHER models/<folder>. A folder never leaves the models
  root (resolved, symlinks followed); a file name has no `/`, `\\`, `..`, NUL or leading dot.
- Checkpoints, LoRAs, VAEs, embeddings (and anything placed in their folders) must be `.safetensors`, and every
  `.safetensors` file must parse as one (8-byte little-endian header length, JSON header, offsets inside the
  file). With `sha256` the digest must match.
- The file streams into `.download-<id>.part` beside its target (dot files are not scanned as models) and is
  renamed into place only when complete and checked; an existing file is never replaced unless `overwrite`.
  A failed download leaves nothing behind; part files of dead workers (untouched for `STALE_PART_SECONDS`) are
  removed at start and before each download.
- `downloads.workers` run at once and `downloads.max_queued` wait; one more is a 429. On success the model
  store is rescanned, so listings (`/sdapi/v1/sd-models`, `/sd-vae`, `/loras`) show the file.
- Status lives in this worker's memory: another instance answers 404 for the id.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from handler.contract.downloads import SAFETENSORS_ONLY, DownloadRequest, DownloadView
from handler.errors import Busy, Conflict, InvalidRequest
from handler.security.netguard import CHUNK, FetchError, FetchFailed, Guard, pump
from handler.settings import Settings
from pipelines.safetensors_header import HeaderError, read_header

log = logging.getLogger(__name__)

PART_PREFIX, PART_SUFFIX = ".download-", ".part"
STALE_PART_SECONDS = 300.0  # a live download writes at least every network.timeout_seconds, or fails and cleans up
KEPT_FINISHED = 200  # finished downloads whose status is kept (the oldest forgotten first)


class FileExists(Conflict):
    """409: the target file exists (without `overwrite`) or is being downloaded."""

    code = "file_exists"


class DownloadError(Exception):
    """A download failed for a reason that is safe to show."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Download:
    """One download and its state; its fields change on the worker thread that runs it."""

    id: str
    request: DownloadRequest
    target: Path
    status: str = "queued"
    bytes_done: int = 0
    bytes_total: int | None = None
    sha256: str | None = None
    error: str | None = None
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    finished_at: str | None = None

    @property
    def part(self) -> Path:
        return self.target.parent / f"{PART_PREFIX}{self.id}{PART_SUFFIX}"

    def view(self, data_dir: Path) -> dict[str, Any]:
        parts = urlsplit(self.request.source)
        try:
            path = self.target.relative_to(data_dir.resolve()).as_posix()
        except ValueError:
            path = self.target.as_posix()
        return DownloadView(
            id=self.id, status=self.status, type=self.request.type,
            source=f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}", path=path,
            bytes_done=self.bytes_done, bytes_total=self.bytes_total, sha256=self.sha256, error=self.error,
            created_at=self.created_at, started_at=self.started_at, finished_at=self.finished_at,
        ).model_dump(mode="json")


def check_safetensors(path: Path) -> int:
    """The number of tensors in a well-formed safetensors file; DownloadError otherwise."""
    try:
        return len(read_header(path, check_offsets=True).tensors)
    except HeaderError as exc:
        raise DownloadError(str(exc)) from None


class _Hashing:
    """A file object that hashes what is written through it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.fh.write(data)


class Downloads:
    """The queue of downloads of one worker, and their states."""

    def __init__(self, settings: Settings, on_success: Callable[[Path], None]) -> None:
        self.settings = settings
        self.on_success = on_success
        self._jobs: OrderedDict[str, Download] = OrderedDict()
        self._active: set[Path] = set()
        self._queue: queue.Queue[Download] = queue.Queue()
        self._lock = threading.Lock()
        self._workers = 0

    # folders ----------------------------------------------------------------------------------------------
    def _type_folder(self, req: DownloadRequest) -> Path:
        s = self.settings
        return {"CHECKPOINT": s.checkpoints_dir, "LORA": s.lora_dir, "VAE": s.vae_dir,
                "EMBEDDING": s.data_dir / "embeddings", "CONTROLNET": s.models_dir / "ControlNet",
                "OTHER": s.models_dir / (req.folder or "")}[req.type]

    def _roots(self) -> list[Path]:
        s = self.settings
        return [s.models_dir, s.data_dir / "embeddings"]

    def target(self, req: DownloadRequest) -> Path:
        """The file `req` writes, resolved; a 422 when its folder would leave the models root."""
        folder = self._type_folder(req).resolve()
        if req.type == "OTHER":
            root = self.settings.models_dir.resolve()
            if folder != root and root not in folder.parents:
                raise InvalidRequest("folder: resolves outside <data>/models (.. or a symbolic link)", field="folder")
        target = folder / req.file_name
        if req.type not in SAFETENSORS_ONLY and not req.file_name.endswith(".safetensors"):
            strict = [self.settings.checkpoints_dir.resolve(), self.settings.lora_dir.resolve(),
                      self.settings.vae_dir.resolve()]
            if any(folder == d or d in folder.parents for d in strict):
                raise InvalidRequest("file_name: files in the checkpoint, LoRA and VAE folders must be .safetensors",
                                     field="file_name")
        return target

    def clean_stale(self, folders: list[Path] | None = None) -> int:
        """Remove part files that no live download writes to any more; how many."""
        cutoff = time.time() - STALE_PART_SECONDS
        removed = 0
        for root in folders or self._roots():
            if not root.is_dir():
                continue
            for path in root.rglob(f"{PART_PREFIX}*{PART_SUFFIX}"):
                try:
                    if path.is_file() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                        log.info("removed the stale partial download %s", path)
                except OSError:
                    pass  # gone meanwhile, or not ours to remove
        return removed

    # the queue --------------------------------------------------------------------------------------------
    def submit(self, req: DownloadRequest) -> Download:
        """Queue a download (202): 409 when the file exists (unless overwrite) or is being downloaded, 429
        when `downloads.max_queued` already wait."""
        self._check_source(req)
        target = self.target(req)
        with self._lock:
            if target in self._active:
                raise FileExists(f"file_name: {req.file_name} is being downloaded already", field="file_name")
            if os.path.lexists(target) and not req.overwrite:
                raise FileExists(f"file_name: {req.file_name} exists; set overwrite to replace it", field="file_name")
            waiting = sum(1 for j in self._jobs.values() if j.status == "queued")
            if waiting >= self.settings.downloads.max_queued:
                raise Busy(f"{waiting} download(s) already wait; retry later", headers={"Retry-After": "60"})
            job = Download(id=uuid.uuid4().hex, request=req, target=target)
            self._jobs[job.id] = job
            self._active.add(target)
            self._prune()
            if self._workers < self.settings.downloads.workers:
                self._workers += 1
                threading.Thread(target=self._work, name=f"sdfunc-download-{self._workers}", daemon=True).start()
        self._queue.put(job)
        log.info("download %s queued: %s %s", job.id, req.type, req.file_name)
        return job

    def get(self, download_id: str) -> Download | None:
        with self._lock:
            return self._jobs.get(download_id)

    def all(self) -> list[Download]:
        with self._lock:
            return list(reversed(self._jobs.values()))

    def _prune(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.status in ("succeeded", "failed")]
        for key in finished[:max(0, len(finished) - KEPT_FINISHED)]:
            del self._jobs[key]

    def _guard(self) -> Guard:
        """The fetcher: https only (redirects too) unless `downloads.allow_http`."""
        schemes = ("http", "https") if self.settings.downloads.allow_http else ("https",)
        return Guard(self.settings.network, schemes=schemes)

    def _check_source(self, req: DownloadRequest) -> None:
        scheme = urlsplit(req.source).scheme.lower()
        if scheme == "http" and not self.settings.downloads.allow_http:
            raise InvalidRequest("source: http:// is refused (downloads.allow_http); use https://", field="source")
        if scheme == "oss" and not (self.settings.downloads.oss_endpoint or self.settings.storage.oss.endpoint):
            raise InvalidRequest("source: oss:// needs downloads.oss_endpoint (or storage.oss.endpoint)",
                                 field="source")
        if scheme in ("http", "https"):
            try:  # refused now rather than failed later; checked again (and pinned) when the download runs
                self._guard().check(req.source)
            except FetchError as exc:
                raise exc.for_field("source") from None

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self._run(job)
            except Exception:  # never lose the worker thread
                log.exception("download %s crashed", job.id)

    def _run(self, job: Download) -> None:
        req = job.request
        job.status, job.started_at = "running", _now()
        started = time.monotonic()
        try:
            if self.target(req) != job.target:  # a folder was swapped for a link since the download was queued
                raise DownloadError("the target folder changed since the download was queued")
            job.target.parent.mkdir(parents=True, exist_ok=True)
            self.clean_stale([job.target.parent])
            with open(job.part, "xb") as fh:
                sink = _Hashing(fh)
                self._fetch(job, sink)
                fh.flush()
                os.fsync(fh.fileno())
            job.sha256 = sink.digest.hexdigest()
            if req.sha256 and job.sha256 != req.sha256.lower():
                raise DownloadError(f"sha256 mismatch: expected {req.sha256.lower()}, got {job.sha256}")
            if req.file_name.endswith(".safetensors"):
                check_safetensors(job.part)
            self._place(job)
        except InvalidRequest as exc:  # FetchError, or a folder that now leads outside the models root
            error = getattr(exc, "reason", None) or exc.message
        except DownloadError as exc:
            error = str(exc)
        except OSError as exc:
            log.warning("download %s: %s", job.id, exc)
            error = f"could not write the file ({exc.strerror or type(exc).__name__})"
        except Exception:
            log.exception("download %s failed", job.id)
            error = "internal error; see the log"
        else:
            error = None
            try:
                self.on_success(job.target)  # before the status says so: a client that sees it succeed finds it listed
            except Exception:
                log.exception("rescanning the models after download %s failed", job.id)
        finally:
            job.part.unlink(missing_ok=True)  # before the status is final: a finished download leaves no part
        with self._lock:
            self._active.discard(job.target)
            job.status, job.error, job.finished_at = ("failed" if error else "succeeded"), error, _now()
        if error:
            log.warning("download %s failed: %s", job.id, error)
        else:
            log.info("download %s succeeded: %s, %d bytes in %.1f s", job.id, job.target, job.bytes_done,
                     time.monotonic() - started)

    def _progress(self, job: Download) -> Callable[[int, int | None], None]:
        last = [-1]

        def report(done: int, total: int | None) -> None:
            job.bytes_done, job.bytes_total = done, total
            step = done * 10 // total if total else done // (1024**3)  # tenths, or GiB when the size is unknown
            if step > last[0]:
                last[0] = step
                if total:
                    log.info("download %s: %d%% (%d of %d bytes)", job.id, step * 10, done, total)
                elif done:
                    log.info("download %s: %d bytes", job.id, done)

        return report

    def _fetch(self, job: Download, sink: _Hashing) -> None:
        limits = self.settings.downloads
        progress = self._progress(job)
        source = job.request.source
        if urlsplit(source).scheme.lower() == "oss":
            self._fetch_oss(source, sink, progress)
            return
        self._guard().download(source, sink, max_bytes=limits.max_bytes,
                                 deadline_seconds=limits.timeout_seconds, progress=progress)

    def _fetch_oss(self, source: str, sink: _Hashing, progress: Callable[[int, int | None], None]) -> None:
        import oss2

        from handler.storage.backends import oss_bucket

        limits = self.settings.downloads
        parts = urlsplit(source)
        oss = self.settings.storage.oss
        if limits.oss_endpoint:
            oss = oss.model_copy(update={"endpoint": limits.oss_endpoint})
        deadline = time.monotonic() + limits.timeout_seconds
        try:
            result = oss_bucket(oss, parts.netloc).get_object(parts.path.lstrip("/"))
            pump(lambda: result.read(CHUNK), total=result.content_length, max_bytes=limits.max_bytes,
                 deadline=deadline, sink=sink.write, progress=progress)
        except oss2.exceptions.NoSuchKey:
            raise FetchFailed("no such OSS object") from None
        except oss2.exceptions.OssError as exc:
            raise FetchFailed(f"OSS refused the read ({exc.status} {exc.code})") from None

    def _place(self, job: Download) -> None:
        """Move the checked part file to its name; never replace an existing file unless asked to."""
        if job.request.overwrite:
            os.replace(job.part, job.target)
            return
        taken = f"{job.request.file_name} appeared meanwhile; set overwrite to replace it"
        try:
            os.link(job.part, job.target)  # fails when the name exists: no window for a race
        except FileExistsError:
            raise DownloadError(taken) from None
        except OSError:  # a file system without hard links (some network mounts)
            if os.path.lexists(job.target):
                raise DownloadError(taken) from None
            os.replace(job.part, job.target)
