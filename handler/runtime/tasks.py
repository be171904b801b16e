"""Asynchronous generation tasks: submit now (202 + task id), fetch the result later from any instance.

Contract:
- A task is a row in the records database (`tasks`): the validated request, its status (queued -> running ->
  succeeded | failed), the EAS-shaped result (`parameters.image_url`, `seed`, `status`, `error_msg`,
  `total_time`) and its images in storage, never in the database row or the queue.
- Submitting is idempotent per (consumer, request id): the same Idempotency-Key returns the same task.
- The worker that accepted a task runs it on its own runner thread through the normal generation path (bounded
  queue, batching, billing: one ledger row per task, charged like a synchronous request).
- Every `heartbeat_seconds` a worker marks its queued and running tasks alive. Any instance finds tasks not
  marked for `stale_seconds` (their worker died) and runs them again until they have had `max_delivery` runs,
  then marks them failed. So no task stays "running" forever.
- With a `callback_url`, the result is POSTed there when the task ends (retried with backoff); the URL must not
  point at loopback, private, link-local or metadata addresses unless `tasks.callback_allow_private` or
  `network.allow_hosts` allows it; it is checked at submission and at every try, and the POST goes to the
  address that was checked (handler.security.netguard).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from handler.records import metering
from handler.records.db import Database, iso_utc, tasks, utcnow
from handler.errors import Busy, ServiceError
from handler.security.netguard import FetchError, Guard
from handler.settings import NetworkSettings, TaskSettings

if TYPE_CHECKING:
    from handler.runtime.service import Service

log = logging.getLogger(__name__)


def check_callback_url(url: str, *, allow_private: bool, network: NetworkSettings) -> str:
    """`url` if it is http(s) to a public address (every address its host resolves to) or one that `network`
    allow-lists (`allow_private`: any but metadata addresses), else a 422 naming `callback_url`."""
    try:
        Guard(network, allow_private=allow_private).check(url)
    except FetchError as exc:
        raise exc.for_field("callback_url") from None
    return url


class TaskStore:
    """The `tasks` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, *, consumer: str, request_id: str, mode: str, tag: str | None, request_json: str,
               callback_url: str | None, runner: str) -> tuple[dict[str, Any], bool]:
        """Insert a queued task; the existing one (and False) when this consumer already submitted this id."""
        now = utcnow()
        row = {"id": uuid.uuid4().hex, "consumer": consumer, "request_id": request_id, "mode": mode, "tag": tag,
               "status": "queued", "request_json": request_json, "callback_url": callback_url, "deliveries": 0,
               "runner": runner, "created_at": now, "heartbeat_at": now}
        try:
            with self.db.begin() as conn:
                conn.execute(insert(tasks).values(**row))
            return row, True
        except IntegrityError:
            with self.db.connect() as conn:
                found = conn.execute(select(tasks).where(tasks.c.consumer == consumer,
                                                         tasks.c.request_id == request_id)).one()
            return dict(found._mapping), False

    def get(self, task_id: str, *, consumer: str | None) -> dict[str, Any] | None:
        where = [tasks.c.id == task_id] + ([tasks.c.consumer == consumer] if consumer is not None else [])
        with self.db.connect() as conn:
            row = conn.execute(select(tasks).where(*where)).first()
        return dict(row._mapping) if row is not None else None

    def start(self, task_id: str, runner: str) -> dict[str, Any] | None:
        """Mark a queued task running for `runner` (one more delivery); None if it is not queued for it."""
        now = utcnow()
        with self.db.begin() as conn:
            done = conn.execute(update(tasks).where(
                tasks.c.id == task_id, tasks.c.status == "queued", tasks.c.runner == runner,
            ).values(status="running", started_at=now, heartbeat_at=now, deliveries=tasks.c.deliveries + 1)).rowcount
        return self.get(task_id, consumer=None) if done == 1 else None

    def finish(self, task_id: str, runner: str, *, status: str, result: dict[str, Any] | None,
               error: str | None) -> bool:
        """Record the outcome; False if the task was taken from this runner meanwhile (it was thought dead)."""
        with self.db.begin() as conn:
            return conn.execute(update(tasks).where(
                tasks.c.id == task_id, tasks.c.runner == runner, tasks.c.status == "running",
            ).values(status=status, finished_at=utcnow(), heartbeat_at=utcnow(), error=error,
                     result_json=json.dumps(result, ensure_ascii=False) if result is not None else None)).rowcount == 1

    def set_callback_status(self, task_id: str, status: str) -> None:
        with self.db.begin() as conn:
            conn.execute(update(tasks).where(tasks.c.id == task_id).values(callback_status=status[:64]))

    def heartbeat(self, runner: str) -> None:
        with self.db.begin() as conn:
            conn.execute(update(tasks).where(tasks.c.runner == runner, tasks.c.status.in_(("queued", "running")))
                         .values(heartbeat_at=utcnow()))

    def reap(self, runner: str, *, stale_seconds: float, max_delivery: int) -> list[str]:
        """Take over the tasks of dead workers: re-queue those with runs left (for `runner`, returned), fail the
        rest."""
        cutoff = utcnow() - dt.timedelta(seconds=stale_seconds)
        stale = and_(tasks.c.status.in_(("queued", "running")), tasks.c.heartbeat_at < cutoff)
        with self.db.begin() as conn:
            conn.execute(update(tasks).where(stale, tasks.c.status == "running", tasks.c.deliveries >= max_delivery)
                         .values(status="failed", finished_at=utcnow(),
                                 error="the worker running this task stopped; it was not charged"))
            ids = [r.id for r in conn.execute(select(tasks.c.id).where(
                stale, or_(tasks.c.status == "queued", tasks.c.deliveries < max_delivery)))]
            if ids:
                conn.execute(update(tasks).where(tasks.c.id.in_(ids), stale).values(
                    status="queued", runner=runner, heartbeat_at=utcnow()))
        return ids


class TaskRunner:
    """One thread per worker that runs this worker's tasks in submission order, and one that keeps them alive
    and adopts dead workers' tasks. Started on first use."""

    def __init__(self, service: Service, store: TaskStore, settings: TaskSettings) -> None:
        self.service = service
        self.store = store
        self.settings = settings
        self.runner_id = f"{service.instance_id}-{uuid.uuid4().hex[:8]}"[:64]
        self._queue: queue.Queue[str] = queue.Queue()
        self._started = False
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def submit(self, task_id: str) -> None:
        self._ensure_started()
        self._queue.put(task_id)

    def _ensure_started(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._run_loop, name="sdfunc-tasks", daemon=True).start()
        threading.Thread(target=self._keepalive_loop, name="sdfunc-task-heartbeat", daemon=True).start()

    def start(self) -> None:
        """Start now (worker start): dead workers' tasks are adopted without waiting for a submission."""
        self._ensure_started()

    def stop(self) -> None:
        self._stop.set()

    def _keepalive_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self.store.heartbeat(self.runner_id)
                for task_id in self.store.reap(self.runner_id, stale_seconds=self.settings.stale_seconds,
                                               max_delivery=self.settings.max_delivery):
                    log.warning("task %s belonged to a worker that stopped: running it again here", task_id)
                    self._queue.put(task_id)
            except ServiceError:
                pass  # the database is unreachable: try again at the next beat
            except Exception:
                log.exception("task heartbeat failed")

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                task_id = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                self._run(task_id)
            except Exception:
                log.exception("task %s could not be run", task_id)

    def _run(self, task_id: str) -> None:
        task = self.store.start(task_id, self.runner_id)
        if task is None:
            return  # not queued for this runner any more
        service = self.service
        meter = metering.begin(metering.RequestMeter(
            request_id=f"task-{task_id}", instance_id=service.instance_id, method="TASK",
            route=f"/sdapi/v1/{task['mode']}", cold_start=not service.coldstart.done, consumer=task["consumer"],
            idempotency_key=task["request_id"]))
        started = time.perf_counter()
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            body = service.task_request(task["mode"], json.loads(task["request_json"]), task_id)
            while True:
                try:
                    response = (service.txt2img if task["mode"] == "txt2img" else service.img2img)(
                        body, task["consumer"])
                    break
                except Busy as exc:  # the instance is full of synchronous requests: wait our turn
                    time.sleep(float(exc.headers.get("Retry-After", "1")))
            meter.status = 200
            result = {"task_id": task_id, "tag": task["tag"], "status": "succeeded",
                      "parameters": response["parameters"], "info": response["info"],
                      "seed": response["parameters"].get("seed"), "image_url": response["parameters"].get("image_url"),
                      "error_msg": "", "total_time": round(time.perf_counter() - started, 3)}
        except ServiceError as exc:
            meter.status, meter.error, error = exc.status, exc.code, exc.message
        except Exception as exc:  # a pipeline error or a bug: the task fails, its message is safe to show
            meter.status, meter.error = 500, getattr(exc, "code", "internal_error")
            error = getattr(exc, "message", None) or "internal error; see the log for this task"
            if meter.error == "internal_error":
                log.exception("task %s failed", task_id)
        finally:
            metering.end()
        if error is not None:
            result = {"task_id": task_id, "tag": task["tag"], "status": "failed", "parameters": {}, "seed": None,
                      "image_url": "", "error_msg": error, "total_time": round(time.perf_counter() - started, 3)}
            if service.ledger is not None and not meter.recorded:
                try:
                    service.ledger.record_failure(meter)
                except Exception:
                    log.exception("could not record the failed task in the ledger")
        status = "failed" if error is not None else "succeeded"
        if not self.store.finish(task_id, self.runner_id, status=status, result=result, error=error):
            log.warning("task %s was taken over by another worker before it finished here", task_id)
            return
        log.info("task %s %s in %.2f s", task_id, status, time.perf_counter() - started)
        if task["callback_url"]:
            self._callback(task_id, task["callback_url"], result or {})

    def _callback(self, task_id: str, url: str, result: dict[str, Any]) -> None:
        # Each try resolves and checks the host again and connects to the address it checked (handler.security.netguard),
        # so a name that turns private after submission is refused, and DNS rebinding cannot redirect the POST.
        guard = Guard(self.service.settings.network, allow_private=self.settings.callback_allow_private)
        delay = 1.0
        outcome = "failed"
        for attempt in range(1, self.settings.callback_attempts + 1):
            try:
                status = guard.post_json(url, result, timeout=self.settings.callback_timeout_seconds)
                if status < 300:
                    outcome = f"delivered ({status})"
                    break
                outcome = f"refused ({status})"
            except FetchError as exc:
                outcome = f"failed ({exc.reason})"
            if attempt < self.settings.callback_attempts:
                time.sleep(delay)
                delay *= 2
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
    if task.get("result_json"):
        view["result"] = json.loads(task["result_json"])
    return view

