"""The `tasks` table: asynchronous generations as database rows (running them is handler.runtime.tasks).

Contract:
- A task row holds the validated request, its status (queued -> running -> succeeded | failed), the runner that
  owns it, its deliveries (runs so far), its heartbeat, the EAS-shaped result and the callback's outcome; its
  images are in storage, never in the row.
- `create` is idempotent per (consumer, request id): the second submission gets the first one's row. A new task
  belongs to no worker: any instance sharing the database `claim`s it (the oldest first), so work put on any
  instance is spread over all of them.
- Every state change is one conditional UPDATE on (id, runner, status), so a runner that was thought dead and
  whose task was adopted by another cannot overwrite the adopter's outcome.
- `reap` takes back the claimed tasks whose heartbeat is older than `stale_seconds` (a runner marks only the tasks
  it still holds): queued again for any worker while they have runs left, failed once they have had
  `max_delivery` runs (a queued one's failed result goes to its sink, so its watcher learns of it); that failure
  says whether its request id was charged (the ledger has its row: the worker stopped, or lost the database, after
  the charge's COMMIT).
- A task put on a PAI-EAS input queue has a `queue_inputs` row (its index); when it finishes, its result gets a
  `queue_sink` row in the same transaction (handler/records/queue.py serves the sink).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from handler.contract.eas_queue import failed_result
from handler.records.db import Database, ledger, queue_inputs, queue_locks, queue_sink, tasks, utcnow

REAPED = ("the worker running this task stopped before it finished; a generation that was not answered is not "
          "charged")
REAPED_CHARGED = ("the worker running this task stopped after its generation was charged, before it stored the "
                  "result; its images: GET /images?request_id={request_id}")


class TaskStore:
    """The `tasks` table. Thread-safe (every call is its own connection or transaction); database failures
    surface as `DatabaseUnavailable` (handler.records.db)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, *, consumer: str, request_id: str, mode: str, tag: str | None, request_json: str,
               callback_url: str | None, queue: str | None = None,
               tags: dict[str, str] | None = None) -> tuple[dict[str, Any], bool]:
        """Insert a queued task that no worker has taken yet (`claim` takes it), with its input-queue entry when
        it was put on a PAI-EAS queue (`queue`, the put's `tags`; its index is the row's `index`); the existing
        one (and False) when this consumer already submitted this id."""
        now = utcnow()
        row = {"id": uuid.uuid4().hex, "consumer": consumer, "request_id": request_id, "mode": mode, "tag": tag,
               "status": "queued", "request_json": request_json, "callback_url": callback_url, "deliveries": 0,
               "runner": None, "created_at": now, "heartbeat_at": now, "queue": queue,
               "tags_json": json.dumps(tags, ensure_ascii=False) if tags is not None else None}
        try:
            with self.db.begin() as conn:
                conn.execute(insert(tasks).values(**row))
                if queue is not None:
                    row["index"] = conn.execute(insert(queue_inputs).values(
                        task_id=row["id"], queue=queue, created_at=now)).inserted_primary_key[0]
            return row, True
        except IntegrityError:
            with self.db.connect() as conn:
                found = conn.execute(select(tasks, queue_inputs.c.idx.label("index")).outerjoin(
                    queue_inputs, queue_inputs.c.task_id == tasks.c.id).where(
                    tasks.c.consumer == consumer, tasks.c.request_id == request_id)).one()
            return dict(found._mapping), False

    def get(self, task_id: str, *, consumer: str | None) -> dict[str, Any] | None:
        """The task's row (only if it is `consumer`'s, unless None), or None."""
        where = [tasks.c.id == task_id] + ([tasks.c.consumer == consumer] if consumer is not None else [])
        with self.db.connect() as conn:
            row = conn.execute(select(tasks).where(*where)).first()
        return dict(row._mapping) if row is not None else None

    def claim(self, runner: str) -> dict[str, Any] | None:
        """Take the oldest queued task no worker has taken and mark it running for `runner` (one more delivery);
        None when there is none. Instances race for a task with one conditional UPDATE each: one wins."""
        for _ in range(8):  # lost races: another instance took the candidates meanwhile
            with self.db.connect() as conn:
                candidates = [r.id for r in conn.execute(
                    select(tasks.c.id).where(tasks.c.status == "queued", tasks.c.runner.is_(None))
                    .order_by(tasks.c.created_at, tasks.c.id).limit(4))]
            if not candidates:
                return None
            for task_id in candidates:
                now = utcnow()
                with self.db.begin() as conn:
                    won = conn.execute(update(tasks).where(
                        tasks.c.id == task_id, tasks.c.status == "queued", tasks.c.runner.is_(None),
                    ).values(status="running", runner=runner, started_at=now, heartbeat_at=now,
                             deliveries=tasks.c.deliveries + 1)).rowcount == 1
                if won:
                    return self.get(task_id, consumer=None)
        return None

    def release(self, task_id: str, runner: str) -> bool:
        """Give back a task `runner` claimed but could not start (its instance is stopping): queued again for any
        worker, that delivery not counted."""
        with self.db.begin() as conn:
            return conn.execute(update(tasks).where(
                tasks.c.id == task_id, tasks.c.runner == runner, tasks.c.status == "running",
            ).values(status="queued", runner=None, started_at=None, progress_json=None, heartbeat_at=utcnow(),
                     deliveries=tasks.c.deliveries - 1)).rowcount == 1

    def finish(self, task_id: str, runner: str, *, status: str, result: dict[str, Any] | None,
               error: str | None) -> bool:
        """Record the outcome, and put a queued task's result on its service's sink (`<service>/sink`) in the same
        transaction; False if the task was taken from this runner meanwhile (it was thought dead)."""
        with self.db.begin() as conn:
            done = conn.execute(update(tasks).where(
                tasks.c.id == task_id, tasks.c.runner == runner, tasks.c.status == "running",
            ).values(status=status, finished_at=utcnow(), heartbeat_at=utcnow(), error=error, progress_json=None,
                     result_json=json.dumps(result, ensure_ascii=False) if result is not None else None)).rowcount
            if done != 1:
                return False
            row = conn.execute(select(tasks.c.queue, tasks.c.consumer).where(tasks.c.id == task_id)).one()
            if row.queue is not None:
                _to_sink(conn, task_id, row.queue, row.consumer)
        return True

    def set_callback_status(self, task_id: str, status: str) -> None:
        """Keep the callback's outcome (cut to the column's 64 characters)."""
        with self.db.begin() as conn:
            conn.execute(update(tasks).where(tasks.c.id == task_id).values(callback_status=status[:64]))

    def position(self, task_id: str) -> int | None:
        """A queued task's place among the queued tasks no worker has taken yet (1: the next to be taken), in
        submission order; None when it is not waiting (taken, running or finished) or unknown."""
        with self.db.connect() as conn:
            row = conn.execute(select(tasks.c.created_at, tasks.c.id).where(
                tasks.c.id == task_id, tasks.c.status == "queued", tasks.c.runner.is_(None))).first()
            if row is None:
                return None
            ahead = conn.execute(select(func.count()).select_from(tasks).where(
                tasks.c.status == "queued", tasks.c.runner.is_(None),
                or_(tasks.c.created_at < row.created_at,
                    and_(tasks.c.created_at == row.created_at, tasks.c.id < row.id)))).scalar_one()
        return int(ahead) + 1

    def waiting(self) -> int:
        """How many queued tasks no worker has taken yet (the `n` of a queued task's place `position` of n)."""
        with self.db.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(tasks).where(
                tasks.c.status == "queued", tasks.c.runner.is_(None))).scalar_one())

    def set_progress(self, task_id: str, runner: str, progress: dict[str, Any] | None) -> None:
        """Keep where a running task is (shown by any instance while it runs); only its runner writes it."""
        with self.db.begin() as conn:
            conn.execute(update(tasks).where(tasks.c.id == task_id, tasks.c.runner == runner,
                                             tasks.c.status == "running")
                         .values(progress_json=json.dumps(progress) if progress is not None else None))

    def heartbeat(self, runner: str, task_ids: Iterable[str]) -> None:
        """Mark the tasks `runner` holds now alive (only those: a task it lost track of goes stale and is reaped)."""
        ids = list(task_ids)
        if not ids:
            return
        with self.db.begin() as conn:
            conn.execute(update(tasks).where(tasks.c.runner == runner, tasks.c.id.in_(ids),
                                             tasks.c.status.in_(("queued", "running")))
                         .values(heartbeat_at=utcnow()))

    def reap(self, *, stale_seconds: float, max_delivery: int) -> list[str]:
        """Take back the tasks of dead workers (taken, not marked alive for `stale_seconds`): queued again for any
        worker to claim while they have runs left (returned), failed after `max_delivery` runs, with a failed
        result that also goes to its queue's sink."""
        cutoff = utcnow() - dt.timedelta(seconds=stale_seconds)
        stale = and_(tasks.c.status.in_(("queued", "running")), tasks.c.runner.is_not(None),
                     tasks.c.heartbeat_at < cutoff)
        charged = and_(ledger.c.consumer == tasks.c.consumer, ledger.c.request_id == tasks.c.request_id,
                       ledger.c.status == "succeeded")
        with self.db.begin() as conn:
            spent = conn.execute(select(tasks.c.id, tasks.c.tag, tasks.c.queue, tasks.c.consumer, tasks.c.started_at,
                                        tasks.c.request_id, ledger.c.id.label("charge"))
                                 .outerjoin(ledger, charged)
                                 .where(stale, tasks.c.status == "running", tasks.c.deliveries >= max_delivery)).all()
            now = utcnow()
            for row in spent:
                seconds = (now - row.started_at).total_seconds() if row.started_at else 0.0
                error = REAPED if row.charge is None else REAPED_CHARGED.format(request_id=row.request_id)
                result = failed_result(row.id, row.tag, status=503, error=error, seconds=seconds)
                if conn.execute(update(tasks).where(tasks.c.id == row.id, stale).values(
                        status="failed", finished_at=now, progress_json=None, error=error,
                        result_json=json.dumps(result, ensure_ascii=False))).rowcount == 1 and row.queue is not None:
                    _to_sink(conn, row.id, row.queue, row.consumer)
            ids = [r.id for r in conn.execute(select(tasks.c.id).where(
                stale, or_(tasks.c.status == "queued", tasks.c.deliveries < max_delivery)))]
            if ids:
                conn.execute(update(tasks).where(tasks.c.id.in_(ids), stale).values(
                    status="queued", runner=None, progress_json=None, heartbeat_at=utcnow()))
        return ids


def _to_sink(conn: Connection, task_id: str, queue: str, consumer: str) -> None:
    """Put a finished task on its queue's sink (in the caller's transaction). Sink entries must become visible
    in index order: the `sink` lock row serializes their inserts until the transaction commits."""
    if conn.execute(update(queue_locks).where(queue_locks.c.name == "sink")
                    .values(taken=queue_locks.c.taken + 1)).rowcount != 1:
        conn.execute(insert(queue_locks).values(name="sink", taken=1))
    conn.execute(insert(queue_sink).values(task_id=task_id, queue=sink_of(queue), consumer=consumer,
                                           committed=False, created_at=utcnow()))


def sink_of(queue: str) -> str:
    """The sink a queue's results go to: `<service>/sink` for an input queue `<service>/<path>`."""
    return f"{queue.split('/', 1)[0]}/sink"
