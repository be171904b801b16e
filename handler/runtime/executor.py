"""The one thread that runs device work (loading and generation) in a worker.

gunicorn's gthread worker hands each request to any of its HTTP threads. If those threads ran torch
themselves, each would grow its own OpenMP pool, and on a CPU those pools fight for the cores: generation
measured 2-3x slower once a second thread had run it (bench/RESULTS.md). So HTTP threads only validate,
encode and wait; everything that touches the model runs here, one job at a time, in submission order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

T = TypeVar("T")

THREAD_NAME = "sdfunc-gpu"


class JobTimeout(Exception):
    """A device job ran out of time: `started` says whether it had begun (and was stopped) or never ran."""

    def __init__(self, *, started: bool) -> None:
        super().__init__("started" if started else "queued")
        self.started = started


class DeviceExecutor:
    """A single worker thread; `run` blocks the caller until its job is done and re-raises its exception."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        self._pending = 0
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., T], *args: object, timeout: float | None = None,
            on_timeout: Callable[[], None] | None = None, **kwargs: object) -> T:
        """Run `fn` on the device thread and return its result. With `timeout`, a job still waiting when it
        expires is dropped and JobTimeout raised; a job already running is asked to stop (`on_timeout`), waited
        for, and JobTimeout raised all the same (its result is discarded)."""
        with self._lock:
            self._pending += 1
        try:
            future = self._pool.submit(fn, *args, **kwargs)
            try:
                return future.result(timeout)
            except FutureTimeout:
                if future.cancel():
                    raise JobTimeout(started=False) from None
                if on_timeout is not None:
                    on_timeout()
                future.exception()  # wait for it to stop: the device is free again after this
                raise JobTimeout(started=True) from None
        finally:
            with self._lock:
                self._pending -= 1

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished (the running one included)."""
        with self._lock:
            return self._pending

    @property
    def queued(self) -> int:
        """Jobs waiting behind the running one."""
        with self._lock:
            return max(0, self._pending - 1)

    def drain(self) -> None:
        """Return once every job submitted before this call has finished."""
        self._pool.submit(lambda: None).result()
