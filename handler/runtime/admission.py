"""Admission: the worker's state and the work it lets in.

States: STARTING (a warm-up is scheduled or running), READY, BUSY (the device is running a job), FAILED (the
last warm-up failed), STOPPING (pre-stop was called). Work is admitted unless the worker is stopping (503 with
Retry-After); a generation request also needs a place in the queue: one running and `queue.max_waiting`
waiting, else 429 with a Retry-After estimated from the measured device time of one job. Admitted work counts
as in flight until it ends, and pre-stop waits for it.

One condition (`_work`) guards the counts; it is notified whenever admitted work ends.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

from handler.errors import Busy, NotReady, Timeout
from handler.settings import Settings


def stopping_error(retry_after: int) -> NotReady:
    """The 503 for work that arrives after pre-stop."""
    return NotReady("the function is stopping; retry on another instance", headers={"Retry-After": str(retry_after)})


class Admission:
    """The state machine and the admission counts of one worker.

    `device_busy` says whether the device thread has a job (BUSY); it is read on every `state`, so it follows
    the executor the worker uses at that moment. The warm-up (handler.runtime.warming) reports its start and end
    here; generation requests wait for it or are refused while it runs (`wait_for_warmup`).
    """

    def __init__(self, settings: Settings, device_busy: Callable[[], bool]) -> None:
        self.settings = settings
        self._device_busy = device_busy
        self._warming = False  # a warm-up is scheduled or running
        self.warm_done = threading.Event()  # set when no warm-up is scheduled or running
        self.warm_done.set()
        self._failed = False
        self._stopping = False
        self._work = threading.Condition()  # guards the counts below; notified when admitted work ends
        self._in_flight = 0  # admitted generation requests and warm-up
        self._generations = 0  # admitted generation requests: the running one and those waiting (queue.max_waiting)
        self._service_seconds: float | None = None  # moving average of one generation job's device time

    @property
    def state(self) -> str:
        if self._stopping:
            return "STOPPING"
        if self._warming:
            return "STARTING"
        if self._failed:
            return "FAILED"
        return "BUSY" if self._device_busy() else "READY"

    @property
    def in_flight(self) -> int:
        """Generation requests admitted and not yet answered."""
        with self._work:
            return self._in_flight

    @property
    def generations(self) -> int:
        """Generation requests admitted: the running one and those waiting (read without the lock, a hint)."""
        return self._generations

    @property
    def stopping(self) -> bool:
        return self._stopping

    def refuse_if_stopping(self) -> None:
        """503 once pre-stop was called."""
        if self._stopping:
            raise stopping_error(self.settings.warmup.retry_after)

    # warm-up --------------------------------------------------------------------------------------------
    def begin_warm_up(self) -> None:
        """A warm-up is scheduled or starts: the state is STARTING from here on."""
        self._warming = True
        self.warm_done.clear()

    def end_warm_up(self, ok: bool | None) -> None:
        """The warm-up ended: `ok` True (READY), False (FAILED) or None (it had already run: no change)."""
        if ok is False:
            self._failed = True
        self._warming = False
        self.warm_done.set()
        if ok:
            self._failed = False

    def wait_for_warmup(self) -> None:
        """A generation request during a warm-up: 503 when told not to wait (`warmup.requests_wait`), else wait
        for it (up to the worker timeout) so the request runs on warm models, after the warm-up's work."""
        if self._warming:
            if not self.settings.warmup.requests_wait:
                raise NotReady("the function is warming up; retry shortly",
                               headers={"Retry-After": str(self.settings.warmup.retry_after)})
            self.warm_done.wait(self.settings.timeout)

    # admission ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def admitted(self, *, generation: bool = False) -> Iterator[None]:
        """Admit work unless pre-stop was called (503) or, for a generation request, the queue is full (429:
        one running and `queue.max_waiting` waiting), and count it as in flight until it ends (pre-stop waits
        for it)."""
        with self._work:
            if self._stopping:
                raise stopping_error(self.settings.warmup.retry_after)
            limit = self.settings.queue.max_waiting + 1
            if generation and self._generations >= limit:
                wait = self.retry_after()
                raise Busy(f"the instance is busy: {limit - 1} request(s) already wait for the device; retry in "
                           f"about {wait} s", headers={"Retry-After": str(wait)})
            self._in_flight += 1
            self._generations += generation
        try:
            yield
        finally:
            with self._work:
                self._in_flight -= 1
                self._generations -= generation
                self._work.notify_all()

    def stop(self, grace_seconds: float) -> tuple[int, bool, int]:
        """Refuse new work from now on and wait up to `grace_seconds` for the admitted work: (how many were in
        flight, whether all ended, how many still run)."""
        with self._work:
            self._stopping = True  # under the lock: no request is admitted after this line
            waited_for = self._in_flight
            drained = self._work.wait_for(lambda: self._in_flight == 0, timeout=grace_seconds)
            return waited_for, drained, self._in_flight

    def observe_service_time(self, seconds: float) -> None:
        """Feed the moving average of one generation job's device time (Retry-After's estimate)."""
        previous = self._service_seconds
        self._service_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def timed_out(self, what: str, started: bool) -> Timeout:
        """The 503 for a job that waited (or, `started`, ran and was stopped) past `queue.timeout_seconds`."""
        limit = self.settings.queue.timeout_seconds
        return Timeout(f"the {what} {'was stopped after running' if started else 'waited'} past the {limit:g} s "
                       "limit (queue.timeout_seconds) and is not charged; retry later",
                       headers={"Retry-After": str(self.retry_after())})

    def retry_after(self) -> int:
        """Seconds until the device is likely to take one more request: the admitted generations times the
        measured time of one job (the warm-up's Retry-After before any job was measured), within 1..600."""
        per_job = self._service_seconds
        if per_job is None:
            return self.settings.warmup.retry_after
        return max(1, min(600, math.ceil(per_job * max(1, self._generations))))
