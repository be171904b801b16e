"""Asynchronous generation tasks: submit now (202 + task id, or a PAI-EAS queue put), the result later from any
instance.

Contract:
- A task is a row in the records database (handler.records.tasks): the validated request, its status (queued ->
  running -> succeeded | failed), the result in PAI-EAS's shape (`images` empty, `parameters.status` 0 and
  `image_url`, `seed`...; a failure's `status` is its HTTP status, with `error_msg`) and its images in storage,
  never in the database row or the queue. `?async=true` tasks and PAI-EAS queue entries are the same rows.
- Submitting is idempotent per (consumer, request id): the same Idempotency-Key returns the same task.
- A new task belongs to no worker. Each worker's `tasks.runners` runner threads claim the oldest queued task from
  the database (put on any instance), and run it through the normal generation path (bounded queue, batching,
  billing: one ledger row per task, charged like a synchronous request). The worker that accepted a task is woken
  at once; the others look every `tasks.poll_seconds`. A worker that is starting (warm-up) or stopping takes none.
- While the instance is full of synchronous requests (429 `busy`), a task waits its Retry-After and tries again,
  for at most `queue.timeout_seconds` (the longest a generation request may wait and run); then it fails with
  503 `timeout` and is not charged.
- Every `heartbeat_seconds` a worker marks its running tasks alive and stores where each is (its progress). Any
  instance finds tasks not marked for `stale_seconds` (their worker died) and queues them again until they have
  had `max_delivery` runs, then marks them failed. So no task stays "running" forever.
- A task whose charge was committed without an acknowledgement and could not be read back (`ChargeUnknown`) asks
  the ledger again while the database is unreachable (for `stale_seconds`): charged, it succeeded with its result;
  not charged, it failed (503 `database_unavailable`). Still unknown, it is left to be taken back as a dead worker's
  task (its failure then says whether it was charged; a re-run of a charged id fails 409 with the charge).
- A finished task that was put on a queue goes to its service's sink in the same transaction (handler.records.queue).
- With a `callback_url`, the result is POSTed there when the task ends (`callback_attempts` tries, 1 s, 2 s,
  4 s... apart); the URL must not point at loopback, private, link-local or metadata addresses unless
  `tasks.callback_allow_private` or `network.allow_hosts` allows it; it is checked at submission and at every
  try, and the POST goes to the address that was checked (handler.security.netguard).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from handler.contract.eas_queue import failed_result
from handler.contract.schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from handler.errors import Busy, ChargeUnknown, NotReady, ServiceError, Timeout
from handler.records import metering
from handler.records.db import iso_utc, unavailable
from handler.records.ledger import Ledger
from handler.records.tasks import TaskStore
from handler.security.netguard import FetchError, Guard
from handler.settings import NetworkSettings, Settings, TaskSettings

log = logging.getLogger(__name__)


class ColdStartState(Protocol):
    """Whether this process's cold start is over (a task's meter records whether it ran during it)."""

    @property
    def done(self) -> bool: ...


class TaskHost(Protocol):
    """What a `TaskRunner` uses of the service that runs its tasks (handler.runtime.service.Service)."""

    @property
    def instance_id(self) -> str: ...

    @property
    def coldstart(self) -> ColdStartState: ...

    @property
    def accepts_tasks(self) -> bool: ...  # READY or BUSY with room in its queue: it may claim a task now

    @property
    def state(self) -> str: ...  # STOPPING: a claimed task not started yet is given back

    @property
    def ledger(self) -> Ledger | None: ...

    @property
    def settings(self) -> Settings: ...  # `network` (callbacks) and `queue.timeout_seconds` (the Busy wait)

    def task_request(self, mode: str, data: dict[str, Any], task_id: str) -> GenerationRequest: ...

    def txt2img(self, req: Txt2ImgRequest, consumer: str) -> dict[str, Any]: ...

    def img2img(self, req: Img2ImgRequest, consumer: str) -> dict[str, Any]: ...

    def task_snapshot(self, task_id: str, consumer: str) -> dict[str, Any] | None: ...  # where a task running here is


def check_callback_url(url: str, *, allow_private: bool, network: NetworkSettings) -> str:
    """`url` if it is http(s) to a public address (every address its host resolves to) or one that `network`
    allow-lists (`allow_private`: any but metadata addresses), else a 422 naming `callback_url`."""
    try:
        Guard(network, allow_private=allow_private).check(url)
    except FetchError as exc:
        raise exc.for_field("callback_url") from None
    return url


class TaskRunner:
    """`settings.runners` threads per worker that claim queued tasks from the records database (this instance's
    or any other's, oldest first) and run them, and one that keeps the claimed ones alive and takes back dead
    workers' tasks. Started on first use."""

    def __init__(self, service: TaskHost, store: TaskStore, settings: TaskSettings,
                 on_finished: Callable[[], None] | None = None) -> None:
        self.service = service
        self.store = store
        self.settings = settings
        self.on_finished = on_finished  # a task's outcome is stored (the queue's watchers look at once)
        self.runner_id = f"{service.instance_id}-{uuid.uuid4().hex[:8]}"[:64]
        self._wake = threading.Condition()
        self._nudges = 0
        self._started = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running: dict[str, str] = {}  # the tasks running here -> their consumers
        self._stop_condition: Callable[[], bool] = lambda: False

    def wake(self) -> None:
        """A task was queued (here, or taken back from a dead worker): a free runner claims now rather than at its
        next poll."""
        self._ensure_started()
        with self._wake:
            self._nudges += 1
            self._wake.notify()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        for i in range(self.settings.runners):
            threading.Thread(target=self._run_loop, name=f"sdfunc-tasks-{i}", daemon=True).start()
        threading.Thread(target=self._keepalive_loop, name="sdfunc-task-heartbeat", daemon=True).start()

    def start(self) -> None:
        """Start now (worker start): queued tasks, and dead workers' tasks, are taken without a submission."""
        self._ensure_started()

    def stop(self) -> None:
        """Claim nothing more (the instance is stopping); the tasks running here finish."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()

    def stop_when(self, condition: Callable[[], bool]) -> None:
        """Also claim nothing more once `condition()` holds (the gunicorn worker is shutting down)."""
        self._stop_condition = condition

    def release_running(self) -> None:
        """Give back the tasks running here, uncounted, for another worker (this process ends now)."""
        for task_id in self.running:
            try:
                self.store.release(task_id, self.runner_id)
            except ServiceError:
                pass  # the database is unreachable: they are reaped after tasks.stale_seconds instead

    def _may_claim(self) -> bool:
        return self.service.accepts_tasks and not self._stop_condition()

    @property
    def running(self) -> set[str]:
        """The ids of the tasks this worker runs now."""
        with self._lock:
            return set(self._running)

    def _running_items(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._running.items())

    def _keepalive_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self.store.heartbeat(self.runner_id, self.running)
                for task_id, consumer in self._running_items():
                    self.store.set_progress(task_id, self.runner_id, self.service.task_snapshot(task_id, consumer))
                taken_back = self.store.reap(stale_seconds=self.settings.stale_seconds,
                                             max_delivery=self.settings.max_delivery)
                for task_id in taken_back:
                    log.warning("task %s belonged to a worker that stopped: queued again", task_id)
                if taken_back:
                    self.wake()
            except ServiceError:
                pass  # the database is unreachable: try again at the next beat
            except Exception:
                log.exception("task heartbeat failed")

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                # an instance that is starting, stopping, failed or full takes no task: others run it sooner
                task = self.store.claim(self.runner_id) if self._may_claim() else None
            except ServiceError:
                task = None  # the database is unreachable: try again at the next poll
            except Exception:
                log.exception("claiming a task failed")
                task = None
            if task is None:
                with self._wake:
                    if not self._nudges and not self._stop.is_set():
                        self._wake.wait(self.settings.poll_seconds)
                    self._nudges = max(0, self._nudges - 1)
                continue
            with self._lock:
                self._running[task["id"]] = task["consumer"]
            try:
                self._run(task)
            except Exception:
                log.exception("task %s could not be run", task["id"])
            finally:
                with self._lock:
                    self._running.pop(task["id"], None)

    def _run(self, task: dict[str, Any]) -> None:
        task_id = task["id"]
        service = self.service
        meter = metering.begin(metering.RequestMeter(
            request_id=f"task-{task_id}", instance_id=service.instance_id, method="TASK",
            route=f"/sdapi/v1/{task['mode']}", cold_start=not service.coldstart.done, consumer=task["consumer"],
            idempotency_key=task["request_id"]))
        started = time.perf_counter()
        result: dict[str, Any] | None = None
        error: str | None = None
        response: dict[str, Any] | None = None
        try:
            body = service.task_request(task["mode"], json.loads(task["request_json"]), task_id)
            generate = service.txt2img if task["mode"] == "txt2img" else service.img2img
            response = self._when_admitted(lambda: generate(body, task["consumer"]))
        except ChargeUnknown as exc:  # generated, and maybe charged: the ledger tells once it can be read
            charged = self._charged(meter)
            if charged is None:
                log.error("task %s: whether its charge landed is unknown (the records database stayed unreachable); "
                          "it is left to be taken back as a dead worker's task", task_id)
                return
            if charged:
                response = exc.result or {}
            else:
                lost = unavailable()
                meter.status, meter.error, error = lost.status, lost.code, lost.message
        except NotReady as exc:
            if self.service.state == "STOPPING" and not isinstance(exc, Timeout):  # not this instance's task now
                self.store.release(task_id, self.runner_id)
                log.info("task %s given back: this instance is stopping", task_id)
                return
            meter.status, meter.error, error = exc.status, exc.code, exc.message
        except ServiceError as exc:
            meter.status, meter.error, error = exc.status, exc.code, exc.message
        except Exception as exc:  # a pipeline error or a bug: the task fails, its message is safe to show
            meter.status, meter.error = 500, getattr(exc, "code", "internal_error")
            error = getattr(exc, "message", None) or "internal error; see the log for this task"
            if meter.error == "internal_error":
                log.exception("task %s failed", task_id)
        finally:
            metering.end()
        if response is not None:
            meter.status = 200
            result = {**response, "task_id": task_id, "tag": task["tag"], "status": "succeeded"}
        if error is not None:
            result = failed_result(task_id, task["tag"], status=meter.status or 500, error=error,
                                   seconds=time.perf_counter() - started)
            if service.ledger is not None and not meter.recorded:
                try:
                    service.ledger.record_failure(meter)
                except Exception:
                    log.exception("could not record the failed task in the ledger")
        status = "failed" if error is not None else "succeeded"
        if not self._finish(task_id, status, result, error):
            log.warning("task %s was taken over by another worker before it finished here", task_id)
            return
        log.info("task %s %s in %.2f s", task_id, status, time.perf_counter() - started)
        if self.on_finished is not None:
            self.on_finished()
        if task["callback_url"]:
            self._callback(task_id, task["callback_url"], result or {})

    def _finish(self, task_id: str, status: str, result: dict[str, Any] | None, error: str | None) -> bool:
        """Store the outcome, trying again while the database is unreachable (for `tasks.stale_seconds`); False
        when the task is no longer this runner's. If it never gets through, the task goes stale and is reaped."""
        try:
            return Retrying(retry=retry_if_exception_type(ServiceError), reraise=True,
                            stop=stop_after_delay(self.settings.stale_seconds),
                            wait=wait_exponential(multiplier=0.2, max=2))(
                self.store.finish, task_id, self.runner_id, status=status, result=result, error=error)
        except ServiceError:
            log.error("task %s: its outcome could not be stored (the database stayed unreachable)", task_id)
            return False

    def _charged(self, meter: metering.RequestMeter) -> bool | None:
        """Whether the charge of `meter`'s attempt landed (its COMMIT lost its acknowledgement), asking the ledger
        again while the database is unreachable, for `tasks.stale_seconds`; None when it never answered."""
        ledger = self.service.ledger
        if ledger is None:
            return None
        try:
            return Retrying(retry=retry_if_exception_type(ServiceError), reraise=True,
                            stop=stop_after_delay(self.settings.stale_seconds),
                            wait=wait_exponential(multiplier=0.2, max=2))(ledger.landed, meter)
        except ServiceError:
            return None

    def _when_admitted(self, generate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`generate()`, tried again while the instance answers Busy (full of synchronous requests: the task
        waits its turn, Retry-After each time, the last wait cut to the deadline), for at most
        `queue.timeout_seconds` in all; then Timeout (503 `timeout`: the task fails and is not charged)."""
        limit = self.service.settings.queue.timeout_seconds

        def retry_after(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome is not None else None  # a Busy: only it is retried
            asked = float(exc.headers.get("Retry-After", "1")) if isinstance(exc, Busy) else 1.0
            return max(0.0, min(asked, limit - (state.seconds_since_start or 0.0)))

        def gave_up(state: RetryCallState) -> dict[str, Any]:
            raise Timeout(f"the instance stayed busy with other requests for {limit:g} s (queue.timeout_seconds): "
                          "the task did not run and was not charged")

        return Retrying(retry=retry_if_exception_type(Busy), wait=retry_after, stop=stop_after_delay(limit),
                        retry_error_callback=gave_up)(generate)

    def _callback(self, task_id: str, url: str, result: dict[str, Any]) -> None:
        # Each try resolves and checks the host again and connects to the address it checked (handler.security.netguard),
        # so a name that turns private after submission is refused, and DNS rebinding cannot redirect the POST.
        guard = Guard(self.service.settings.network, allow_private=self.settings.callback_allow_private)

        def post() -> str:
            try:
                status = guard.post_json(url, result, timeout=self.settings.callback_timeout_seconds)
            except FetchError as exc:
                return f"failed ({exc.reason})"
            return f"delivered ({status})" if status < 300 else f"refused ({status})"

        # Tries 1 s, 2 s, 4 s... apart until one is delivered; after the last try its outcome is kept.
        outcome = Retrying(retry=retry_if_result(lambda outcome: not outcome.startswith("delivered")),
                           stop=stop_after_attempt(self.settings.callback_attempts),
                           wait=wait_exponential(multiplier=1, exp_base=2),
                           retry_error_callback=lambda state: state.outcome.result())(post)
        log.info("task %s callback %s", task_id, outcome)
        try:
            self.store.set_callback_status(task_id, outcome)
        except ServiceError:
            pass


def public_view(task: dict[str, Any]) -> dict[str, Any]:
    """What GET /tasks/<id> shows."""
    view = {"task_id": task["id"], "tag": task.get("tag"), "status": task["status"], "consumer": task["consumer"],
            "request_id": task["request_id"], "deliveries": task.get("deliveries", 0),
            "created_at": iso_utc(task["created_at"]), "started_at": iso_utc(task.get("started_at")),
            "finished_at": iso_utc(task.get("finished_at")), "error_msg": task.get("error") or "",
            "callback_status": task.get("callback_status"), "result": None}
    if task.get("queue"):
        view["queue"] = task["queue"]
        view["tags"] = json.loads(task["tags_json"]) if task.get("tags_json") else {}
    if task.get("result_json"):
        view["result"] = json.loads(task["result_json"])
    return view
