"""gunicorn configuration for the function, as FC runs it: one worker (one GPU), a few HTTP threads.

Used by `sdfunc serve` (`-c` this file) and by `./gunicorn.conf.py` in the repository root, which gunicorn
loads by itself. Settings come from the one settings object (SDFUNC_* environment, YAML).

The master prepares the cold start before it forks the worker:
- `on_starting`: with `warmup.prefetch`, a process of its own reads and hashes the checkpoints the worker loads
  first (pipelines.prefetch), from the server's first second, while the imports below run; the worker waits for
  a file's read before loading it (its results pipe is inherited, `PREFETCH_FD_ENV`).
- `when_ready` (sockets bound, no worker yet): with `warmup.preimport`, `preimport` imports torch, diffusers, the
  pipeline classes of those checkpoints and the app's modules, so that a worker (the first, and every one that
  replaces a dead one) forks with them imported. Modules only: no app, no tensor, no device, no thread.

Both processes end without the interpreter's teardown (`worker_exit`, `on_exit`): collecting torch, diffusers
and the app's modules takes about 1.5 s each here, and the master waits for the worker's, so a stop took 3 s
longer than it does now. What they keep is written by then (ledger rows are committed before each response,
the hash cache is written by replace, the logs are flushed on the way out), and the exit status is gunicorn's.
"""

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pipelines  # noqa: F401  # first: turns hub access off (pipelines.offline) before huggingface_hub is imported
from handler.runtime.coldstart import MASTER_IMPORTS_ENV, STARTED_AT_ENV, import_runtime_modules, process_start_time
from handler.settings import Settings

# The workers measure their cold start from the server's start (this master process), not from their fork.
os.environ.setdefault(STARTED_AT_ENV, repr(process_start_time()))

_settings = Settings()
log = logging.getLogger("sdfunc.master")
_startup: list[Path] = []  # the checkpoint files the worker loads first
_prefetch_proc = None  # the prefetch process (gunicorn's master reaps it with its workers)

wsgi_app = "handler.app:create_app()"
bind = [f"{_settings.host}:{_settings.port}"]
workers = 1  # one worker per GPU; the worker owns the warm pipelines
worker_class = "gthread"
threads = _settings.http_threads
timeout = _settings.timeout
graceful_timeout = 120
keepalive = 5
preload_app = False  # loading or inference in the master before fork hangs the worker
control_socket_disable = True  # a second server would silently take over the first one's socket
# No gunicorn access log: the function writes one request log line itself (timings, cold start, billing),
# or none when the operator turns it off (SDFUNC_REQUEST_LOG=false).
accesslog = None
errorlog = "-"
loglevel = _settings.log_level.lower()


def startup_checkpoints(settings: Settings) -> list[Path]:
    """The single files a worker loads first: the warm-up checkpoints, else the default one, else the first found
    (names resolved without hashing: pipelines.prefetch.startup_paths)."""
    from pipelines.hashing import HashCache
    from pipelines.prefetch import startup_paths
    from pipelines.store import ModelStore

    store = ModelStore(settings.checkpoints_dir, settings.vae_dir, HashCache(None))
    return startup_paths(store.checkpoints, settings.warmup.checkpoints, settings.default_checkpoint)


def preimport(archs: Iterable[str] | None = None) -> tuple[float, set[str]]:
    """Import what a worker needs before it can load: torch, diffusers, transformers, our generation modules, the
    pipeline classes of `archs` (default: those of the startup checkpoints, read from their headers), and the
    app's modules (`handler.app`; the app itself is built in the worker). No tensor is made and no thread
    started: a process forked afterwards generates as a fresh one does. Returns the seconds it took and the
    architectures whose classes it imported."""
    started = time.perf_counter()
    import handler.app  # noqa: F401
    import pipelines.loading

    if archs is None:
        archs = {a for a in map(pipelines.loading.pipeline_arch, _startup) if a} if _startup else {"sd1", "sdxl"}
    archs = set(archs)
    import_runtime_modules(archs)
    if threading.active_count() > 1:  # a fork keeps only the calling thread: say so if an import started one
        log.warning("threads running in the gunicorn master before the fork: %s",
                    ", ".join(t.name for t in threading.enumerate()))
    return time.perf_counter() - started, archs


def on_starting(server):
    """Find the checkpoints the worker loads first and, with `warmup.prefetch`, start reading them."""
    global _prefetch_proc
    try:
        _startup[:] = startup_checkpoints(_settings)
    except OSError:
        log.exception("cannot list the checkpoints to prefetch")
        return
    if not (_settings.warmup.prefetch and _startup):
        return
    from pipelines.prefetch import PREFETCH_FD_ENV, spawn

    cache = _settings.cache
    try:
        _prefetch_proc, read_fd = spawn(_startup, hash_file=_settings.cache_dir / "sha256.json",
                                        local_dir=cache.resolved_local_dir if cache.copy_to_local else None,
                                        local_max_bytes=cache.local_max_bytes if cache.copy_to_local else None)
    except OSError:
        log.exception("cannot start the prefetch; the worker reads the checkpoints itself")
        return
    os.environ[PREFETCH_FD_ENV] = str(read_fd)  # the workers, forked from here, inherit the descriptor


def when_ready(server):
    """With `warmup.preimport`, import the heavy modules once, here, before any worker is forked."""
    if not _settings.warmup.preimport:
        return
    seconds, archs = preimport()
    os.environ[MASTER_IMPORTS_ENV] = repr(seconds)
    server.log.info("imported the runtime (%s) in %.2f s before forking the worker", ", ".join(sorted(archs)),
                    seconds)


def post_fork(server, worker):
    """A worker respawned later (timeout, crash) measures its cold start from its own start, not the master's,
    and the master's imports are not part of it."""
    if worker.age > server.num_workers:
        os.environ[STARTED_AT_ENV] = repr(process_start_time())
        os.environ.pop(MASTER_IMPORTS_ENV, None)


def post_worker_init(worker):
    """Before the worker accepts connections: start the warm-up (`warmup.on_start`) in the background, so that
    /healthz says STARTING until the warm-up checkpoints are loaded and run; and the task runner. Sink watchers
    end when the worker stops."""
    service = worker.wsgi.extensions["sdfunc"]
    if _settings.warmup.on_start:
        service.start_warmup()
    if service.task_runner is not None:
        service.task_runner.stop_when(lambda: not worker.alive)  # SIGTERM: claim nothing more
        service.task_runner.start()  # adopt the tasks of a worker that died, without waiting for a submission
    if service.queues is not None:  # SIGTERM (gunicorn's graceful stop) ends the sink watchers at their next look
        service.queues.end_watchers_when(lambda: not worker.alive)


def _exit_now(status: object) -> None:
    """Flush the logs and end the process with `status` (a `sys.exit` argument) without the interpreter's
    teardown. Daemon threads (task runners, watchers) end as they would at a normal exit."""
    from handler.logs import flush_logs

    flush_logs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    code = 0 if status is None else status if isinstance(status, int) else 1
    os._exit(code & 0xFF)


def worker_exit(server, worker):
    """The worker ends here: gunicorn calls this on its way out of the worker process, with the `SystemExit` it
    is raising in flight (its status is kept). Tasks still running here are given back to the queue first."""
    exc = sys.exc_info()[1]
    service = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("sdfunc")
    if service is not None and service.task_runner is not None:
        service.task_runner.release_running()
    if isinstance(exc, SystemExit):
        _exit_now(exc.code)


def on_exit(server):
    """The master ends here: after `halt`, which exits 0 unless it handles a `HaltServer` (then its status)."""
    from gunicorn.errors import HaltServer

    exc = sys.exc_info()[1]
    _exit_now(exc.exit_status if isinstance(exc, HaltServer) else 0)


def child_exit(server, worker):
    """prometheus_client multiprocess mode: drop the dead worker's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
