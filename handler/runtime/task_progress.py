"""Where a task is, for POST /internal/progress (A1111's answer) and GET /tasks/<id> (the view's `progress`).

This process's registry answers first (handler.runtime.progress: the requests it admitted, by their ids), then
the task's database row (handler.records.tasks), so that any instance answers for a task that waits for a worker
or runs on another: queued -> its place among the tasks no worker has taken yet (`TaskStore.position`) of how
many wait; running -> the snapshot its runner keeps in `progress_json`; succeeded or failed -> completed.

A task is shown to its consumer and to admins only: for anyone else it is unknown, the answer A1111 gives for an
id it never saw, so its existence does not leak either.
"""

from __future__ import annotations

import json
from typing import Any

from handler.records.tasks import TaskStore
from handler.runtime.progress import WAITING, Progress

TASK_ID_LENGTH = 32  # an asynchronous task's id (the `tasks.id` column); longer ids are never rows


class TaskProgress:
    """Reads a task's progress from the registry, else from its row. `consumer` None means an admin (any
    consumer's task); database failures surface as `DatabaseUnavailable` (503)."""

    def __init__(self, progress: Progress, store: TaskStore | None) -> None:
        self.progress = progress
        self.store = store

    def state(self, id_task: str | None, consumer: str | None) -> dict[str, Any] | None:
        """The task's state (`Progress.task_state`'s keys), or None when it is unknown to `consumer`."""
        if not id_task:
            return None
        local = self.progress.task_state(id_task, consumer)
        if local is not None or self.store is None or len(id_task) > TASK_ID_LENGTH:
            return local
        row = self.store.get(id_task, consumer=consumer)
        return self.row_state(row) if row is not None else None

    def row_state(self, row: dict[str, Any]) -> dict[str, Any]:
        """The state a task's database row tells (`Progress.task_state`'s keys)."""
        status = row["status"]
        state: dict[str, Any] = {"active": status == "running", "queued": status == "queued",
                                 "completed": status in ("succeeded", "failed"), "position": None, "waiting": None,
                                 "step": None, "steps": None, "progress": None, "eta": None, "textinfo": WAITING,
                                 "owner": row["consumer"]}
        if status == "queued" and self.store is not None:
            position = self.store.position(row["id"])  # None: a worker holds it and has not started it yet
            if position is not None:
                waiting = max(position, self.store.waiting())
                state.update(position=position, waiting=waiting, textinfo=f"In queue: {position}/{waiting}")
        elif status == "running":
            snapshot = json.loads(row["progress_json"]) if row.get("progress_json") else None
            state.update(progress=0.0, textinfo=None)  # its runner has not written where it is yet
            if isinstance(snapshot, dict):
                state.update({key: snapshot.get(key) for key in ("step", "steps", "eta")},
                             progress=float(snapshot.get("progress") or 0.0))
        return state

    def internal_progress(self, id_task: str | None, consumer: str | None, id_live_preview: int = -1
                          ) -> dict[str, Any]:
        """POST /internal/progress, as A1111 v1.10.1's `progressapi` answers it: not active -> progress and ETA
        null, `id_live_preview` -1, textinfo "In queue: i/n" or "Waiting..." (an unknown id: all false);
        active -> progress and ETA (null before the first step), the caller's `id_live_preview`, textinfo
        null. `live_preview` is always null: no previews are made."""
        state = self.state(id_task, consumer)
        if state is None or not state["active"]:
            return {"active": False, "queued": bool(state and state["queued"]),
                    "completed": bool(state and state["completed"]), "progress": None, "eta": None,
                    "live_preview": None, "id_live_preview": -1,
                    "textinfo": state["textinfo"] if state is not None else WAITING}
        return {"active": True, "queued": False, "completed": False, "progress": state["progress"],
                "eta": state["eta"], "live_preview": None, "id_live_preview": id_live_preview, "textinfo": None}

    def task_view(self, row: dict[str, Any]) -> dict[str, Any]:
        """The `progress` of GET /tasks/<id> for a task row its caller may see: the registry's entry for it (its
        runner here), else what the row tells. Progress is a number: 0 while queued, 1 once completed."""
        state = self.progress.task_state(row["id"], row["consumer"]) or self.row_state(row)
        completed = state["completed"]
        return {"active": state["active"], "queued": state["queued"], "completed": completed,
                "position": state["position"], "step": state["step"], "steps": state["steps"],
                "progress": 1.0 if completed else state["progress"] or 0.0,
                "eta": 0.0 if completed else state["eta"], "textinfo": state["textinfo"]}
