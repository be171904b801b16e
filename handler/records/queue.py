"""The PAI-EAS queue service's records: input queues and sinks over the `tasks` table (one task mechanism).

Contract:
- An input queue `<service>/<path>` holds the tasks put on it (`queue_inputs`, created with the task by
  handler.records.tasks.TaskStore.create); taking work from it is `TaskStore.claim`, by any instance.
- A sink `<service>/sink` holds finished queued tasks' results in the order they finished (`queue_sink.idx`, which
  only grows), each uncommitted until a client commits, deletes or truncates it. Results stay in the `tasks` row
  (`result_json`); the sink row is only their place and state.
- Every call is scoped to a consumer, or to all consumers (`consumer=None`: an admin or the service token), so
  a consumer never sees, commits or deletes another's entries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.sql.elements import ColumnElement

from handler.records.db import Database, queue_inputs, queue_sink, tasks, utcnow

DELETED = "deleted from its input queue before it ran; it was not charged"


@dataclass
class Entry:
    """A queue entry: its index, its tags, and its data (the request on an input queue, the result on a sink)."""

    index: int
    task_id: str
    tags: dict[str, str]
    data: bytes
    status: str

    def matches(self, tags: dict[str, str] | None) -> bool:
        """Whether it carries every tag of `tags` (a watch's or get's filter; none: every entry)."""
        return not tags or all(self.tags.get(k) == v for k, v in tags.items())


class QueueStore:
    """Input queues and sinks. Thread-safe; database failures surface as `DatabaseUnavailable`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # sinks ------------------------------------------------------------------------------------------------
    def _sink_scope(self, sink: str, consumer: str | None) -> list[ColumnElement[bool]]:
        return [queue_sink.c.queue == sink] + ([queue_sink.c.consumer == consumer] if consumer is not None else [])

    def pending(self, sink: str, consumer: str | None, *, start: int, limit: int,
                skip: Sequence[int] = (), tags: dict[str, str] | None = None) -> list[Entry]:
        """Up to `limit` uncommitted results on `sink` from index `start` on, in index order, leaving out `skip`
        (delivered and not yet committed) and, with `tags`, those whose tags do not all match."""
        if limit <= 0:
            return []
        where = [*self._sink_scope(sink, consumer), queue_sink.c.committed.is_(False), queue_sink.c.idx >= start]
        if skip:
            where.append(queue_sink.c.idx.not_in(list(skip)))
        query = (select(queue_sink.c.idx, tasks.c.id, tasks.c.tags_json, tasks.c.result_json, tasks.c.status)
                 .join(tasks, tasks.c.id == queue_sink.c.task_id).where(*where).order_by(queue_sink.c.idx))
        entries: list[Entry] = []
        with self.db.connect() as conn:
            # tag filters are matched here (tags are a JSON column): read in pages until `limit` match
            offset = 0
            while len(entries) < limit:
                rows = conn.execute(query.limit(limit if not tags else 100).offset(offset)).all()
                for row in rows:
                    entry = _entry(row.idx, row.id, row.tags_json, (row.result_json or "{}").encode(), row.status)
                    if entry.matches(tags):
                        entries.append(entry)
                if not tags or len(rows) < 100:
                    break
                offset += len(rows)
        return entries[:limit]

    def committed(self, sink: str, indexes: Sequence[int]) -> set[int]:
        """Which of `indexes` are committed (or gone)."""
        if not indexes:
            return set()
        with self.db.connect() as conn:
            open_ = {r.idx for r in conn.execute(select(queue_sink.c.idx).where(
                queue_sink.c.queue == sink, queue_sink.c.idx.in_(list(indexes)), queue_sink.c.committed.is_(False)))}
        return set(indexes) - open_

    def commit(self, sink: str, consumer: str | None, indexes: Sequence[int]) -> list[int]:
        """Commit results (a committed one is never delivered again); returns the indexes that are not on this
        sink for this consumer (the caller refuses the call then, and commits nothing)."""
        with self.db.begin() as conn:
            found = {r.idx for r in conn.execute(select(queue_sink.c.idx).where(
                *self._sink_scope(sink, consumer), queue_sink.c.idx.in_(list(indexes))))}
            unknown = [i for i in indexes if i not in found]
            if not unknown:
                conn.execute(update(queue_sink).where(queue_sink.c.idx.in_(list(found))).values(committed=True))
        return unknown

    def truncate_sink(self, sink: str, consumer: str | None, before: int) -> int:
        """Commit every result with an index below `before`; returns how many were open."""
        with self.db.begin() as conn:
            return conn.execute(update(queue_sink).where(
                *self._sink_scope(sink, consumer), queue_sink.c.idx < before, queue_sink.c.committed.is_(False),
            ).values(committed=True)).rowcount

    # input queues -------------------------------------------------------------------------------------------
    def _input_scope(self, queue: str, consumer: str | None) -> list[ColumnElement[bool]]:
        return [queue_inputs.c.queue == queue] + ([tasks.c.consumer == consumer] if consumer is not None else [])

    def cancel(self, queue: str, consumer: str | None, *, indexes: Sequence[int] | None = None,
               before: int | None = None) -> tuple[int, list[int]]:
        """Delete entries from an input queue: those of `indexes`, or all below `before`. Only entries no worker
        has taken are removed (their task fails, not charged); returns (how many, the unknown indexes)."""
        where = self._input_scope(queue, consumer)
        where.append(queue_inputs.c.idx.in_(list(indexes)) if indexes is not None else queue_inputs.c.idx < (before or 0))
        with self.db.begin() as conn:
            rows = conn.execute(select(queue_inputs.c.idx, queue_inputs.c.task_id)
                                .join(tasks, tasks.c.id == queue_inputs.c.task_id).where(*where)).all()
            unknown = [i for i in indexes or () if i not in {r.idx for r in rows}]
            if unknown:
                return 0, unknown
            removed = conn.execute(update(tasks).where(
                tasks.c.id.in_([r.task_id for r in rows]), tasks.c.status == "queued", tasks.c.runner.is_(None),
            ).values(status="failed", finished_at=utcnow(), error=DELETED)).rowcount if rows else 0
        return removed, []

    def inputs(self, queue: str, consumer: str | None, *, start: int, limit: int,
               tags: dict[str, str] | None = None) -> list[Entry]:
        """Entries of an input queue still waiting for a worker, from index `start` on (their data: the request):
        of the first `limit`, those that carry `tags`."""
        where = [*self._input_scope(queue, consumer), queue_inputs.c.idx >= start, tasks.c.status == "queued",
                 tasks.c.runner.is_(None)]
        with self.db.connect() as conn:
            rows = conn.execute(select(queue_inputs.c.idx, tasks.c.id, tasks.c.tags_json, tasks.c.request_json,
                                       tasks.c.status)
                                .join(tasks, tasks.c.id == queue_inputs.c.task_id).where(*where)
                                .order_by(queue_inputs.c.idx).limit(limit)).all()
        entries = [_entry(r.idx, r.id, r.tags_json, r.request_json.encode(), r.status) for r in rows]
        return [e for e in entries if e.matches(tags)]

    # both ---------------------------------------------------------------------------------------------------
    def find(self, queue: str, consumer: str | None, index: int, *, sink: bool) -> dict[str, Any] | None:
        """An entry's task (its id, status, position data) by index, or None."""
        table = queue_sink if sink else queue_inputs
        where = [table.c.queue == queue, table.c.idx == index]
        if consumer is not None:
            where.append(tasks.c.consumer == consumer)
        with self.db.connect() as conn:
            row = conn.execute(select(tasks.c.id, tasks.c.status, tasks.c.runner, tasks.c.created_at,
                                      *([queue_sink.c.committed] if sink else []))
                               .join(tasks, tasks.c.id == table.c.task_id).where(*where)).first()
        return dict(row._mapping) if row is not None else None

    def attributes(self, queue: str, consumer: str | None, *, sink: bool) -> dict[str, str]:
        """The queue's counters, as PAI-EAS's `_attrs_` answers them (strings): its name, how many entries are
        open (uncommitted results; requests no worker took), the first and last open index."""
        table = queue_sink if sink else queue_inputs
        where: list[ColumnElement[bool]] = [table.c.queue == queue]
        if sink:
            where.append(queue_sink.c.committed.is_(False))
        else:
            where.append(and_(tasks.c.status == "queued", tasks.c.runner.is_(None)))
        if consumer is not None:
            where.append(tasks.c.consumer == consumer)
        with self.db.connect() as conn:
            row = conn.execute(select(func.count(), func.min(table.c.idx), func.max(table.c.idx))
                               .select_from(table.join(tasks, tasks.c.id == table.c.task_id)).where(*where)).one()
            last = conn.execute(select(func.max(table.c.idx)).where(table.c.queue == queue)).scalar()
        return {"meta.name": queue, "meta.type": "sink" if sink else "input", "stream.length": str(row[0]),
                "stream.firstEntry": str(row[1] or 0), "stream.lastEntry": str(row[2] or 0),
                "stream.lastIndex": str(last or 0)}


def _entry(index: int, task_id: str, tags_json: str | None, data: bytes, status: str) -> Entry:
    return Entry(index=int(index), task_id=task_id, tags=json.loads(tags_json) if tags_json else {}, data=data,
                 status=status)
