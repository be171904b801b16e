"""gunicorn configuration for the function, as FC runs it: one worker (one GPU), a few HTTP threads.

Used by `sdfunc serve` (`-c` this file) and by `./gunicorn.conf.py` in the repository root, which gunicorn
loads by itself. Settings come from the one settings object (SDFUNC_* environment, YAML).
"""

import os

import pipelines  # noqa: F401  # first: turns hub access off (pipelines.offline) before huggingface_hub is imported
from handler.runtime.coldstart import STARTED_AT_ENV, process_start_time
from handler.settings import Settings

# The workers measure their cold start from the server's start (this master process), not from their fork.
os.environ.setdefault(STARTED_AT_ENV, repr(process_start_time()))

_settings = Settings()

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


def post_fork(server, worker):
    """A worker respawned later (timeout, crash) measures its cold start from its own start, not the master's."""
    if worker.age > server.num_workers:
        os.environ[STARTED_AT_ENV] = repr(process_start_time())


def post_worker_init(worker):
    """Before the worker accepts connections: start the warm-up (`warmup.on_start`) in the background, so that
    /healthz says STARTING until the warm-up checkpoints are loaded and run; and the task runner."""
    service = worker.wsgi.extensions["sdfunc"]
    if _settings.warmup.on_start:
        service.start_warmup()
    if service.task_runner is not None:
        service.task_runner.start()  # adopt the tasks of a worker that died, without waiting for a submission


def child_exit(server, worker):
    """prometheus_client multiprocess mode: drop the dead worker's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
