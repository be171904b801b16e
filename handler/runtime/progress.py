"""The worker's job state (GET /sdapi/v1/progress in A1111's shape) and the progress of each task it holds.

A task is an admitted generation request, known by its ids: an asynchronous task's id (`alwayson_scripts.id_task`,
set by the task runner) and A1111's `force_task_id`. Like A1111's modules/progress.py (pending_tasks,
current_task, finished_tasks), each is queued from admission until the device starts its job, active while the
job runs (and until its response is made), and completed after; the last `FINISHED_MEMORY` completed ids are
remembered. A task belongs to the consumer it is charged to, and ids live per consumer: one consumer's
`force_task_id` never hides or reveals another's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

FINISHED_MEMORY = 1000  # completed task ids remembered (A1111 keeps the last 16)
WAITING = "Waiting..."  # A1111's textinfo for a task that is neither running nor queued


def _idle_state() -> dict[str, Any]:
    return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}


@dataclasses.dataclass(eq=False)  # compared and hashed by identity: two requests may carry the same ids
class TaskEntry:
    """One admitted request in the registry: its task ids (maybe none: it still takes a place in the queue),
    the consumer it belongs to, and where it is (`queued`, `active`, `completed`)."""

    ids: tuple[str, ...]
    owner: str | None
    seq: int
    state: str = "queued"
    steps: int = 0  # its job's sampling steps, kept when the device is done with it


class Progress:
    """One worker runs one job at a time; this records where it is, and where each admitted task is. Thread-safe.

    Idle reports exactly `progress == 0.0` and `job_count == 0` (webuiapi's `util_wait_for_ready` loops on it)."""

    def __init__(self, finished_memory: int = FINISHED_MEMORY, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # elapsed time for the ETA
        self._lock = threading.Lock()
        self._state: dict[str, Any] = _idle_state()
        self._started = 0.0
        self._owner: str | None = None
        self._job_id: str | None = None
        # tasks: the queue in admission order, the live ones by (owner, id), the completed ones (oldest first)
        self._seq = itertools.count()
        self._queued: dict[TaskEntry, None] = {}
        self._live: dict[tuple[str | None, str], TaskEntry] = {}
        self._finished: OrderedDict[tuple[str | None, str], TaskEntry] = OrderedDict()
        self._finished_memory = finished_memory
        self._active: tuple[TaskEntry, ...] = ()  # the tasks of the device's current job

    # the job ---------------------------------------------------------------------------------------------
    def begin(self, job: str, job_count: int, sampling_steps: int, owner: str | None = None,
              job_id: str | None = None, tasks: Sequence[TaskEntry] = ()) -> None:
        """A job starts; `owner` is the consumer it is charged to (only it or an admin may interrupt it);
        `job_id` lets its own request stop it (`stop_job`) without touching a later job; `tasks` are the
        requests it serves (several for a batch), active from now on if `activate` did not make them so."""
        with self._lock:
            self._owner = owner
            self._job_id = job_id
            self._state.update(
                job=job, job_count=job_count, job_no=0, sampling_step=0, sampling_steps=sampling_steps,
                interrupted=False, skipped=False, stopping_generation=False,
                job_timestamp=time.strftime("%Y%m%d%H%M%S"),
            )
            self._started = self._clock()
            if tasks:
                self._activate(tasks)

    def step(self, step: int, total: int, job_no: int) -> bool:
        """Record a finished step; False when the job was interrupted and should stop."""
        with self._lock:
            self._state.update(sampling_step=step, sampling_steps=total, job_no=job_no)
            return not self._state["interrupted"]

    def interrupt(self, consumer: str | None = None) -> bool:
        """Ask the running job to stop after its current step: any job when `consumer` is None (an admin), else
        only that consumer's. False when another consumer's job is running (nothing is changed)."""
        with self._lock:
            if not self._state["job_count"]:
                return True
            if consumer is not None and self._owner is not None and consumer != self._owner:
                return False
            self._state["interrupted"] = True
            return True

    def stop_job(self, job_id: str) -> None:
        """Interrupt the running job if it is `job_id` (a request that ran out of time stops only itself)."""
        with self._lock:
            if self._state["job_count"] and self._job_id == job_id:
                self._state["interrupted"] = True

    def end(self) -> None:
        """The job is over: idle again; its tasks are done on the device (progress 1 until they complete)."""
        with self._lock:
            self._release(self._active)
            self._state.update(job="", job_count=0)

    def snapshot(self, consumer: str | None = None) -> dict[str, Any]:
        """GET /sdapi/v1/progress: the running job as A1111 shows it. `consumer` None (an admin) sees any job;
        a consumer sees only a job that serves it (its own, or a batch it is part of), else the idle shape."""
        with self._lock:
            state = dict(self._state)
            started = self._started
            visible = consumer is None or consumer in self._viewers()
        if not visible:
            state = _idle_state()  # nothing of another consumer's job, not even its name or timestamp
        if not state["job_count"]:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        count = state["job_count"]
        progress = 0.01 + state["job_no"] / count
        if state["sampling_steps"]:
            progress += state["sampling_step"] / state["sampling_steps"] / count
        progress = min(progress, 1.0)
        elapsed = self._clock() - started
        return {"progress": progress, "eta_relative": elapsed / progress - elapsed, "state": state,
                "current_image": None, "textinfo": None}

    def _viewers(self) -> set[str | None]:
        """The consumers the current job serves (lock held)."""
        return {self._owner, *(entry.owner for entry in self._active)}

    # the tasks -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tracking(self, task_ids: Iterable[str], owner: str | None) -> Iterator[TaskEntry]:
        """Hold an admitted request's place: queued from here, completed when the block exits (answered or
        failed). A request without ids still counts in everyone's queue position, as in A1111 (where every API
        request has an id). Yields the entry for `activate` / `begin`."""
        entry = self.enqueue(task_ids, owner)
        try:
            yield entry
        finally:
            self.complete(entry)

    def enqueue(self, task_ids: Iterable[str], owner: str | None) -> TaskEntry:
        """Register an admitted request as queued (A1111's add_task_to_queue); `complete` must follow."""
        ids = tuple(dict.fromkeys(i for i in task_ids if i))
        with self._lock:
            entry = TaskEntry(ids=ids, owner=owner, seq=next(self._seq))
            self._queued[entry] = None
            for task_id in ids:
                self._live[(owner, task_id)] = entry  # the same id sent again by its owner: the newer request
        return entry

    def activate(self, tasks: Sequence[TaskEntry]) -> None:
        """The device starts the job of `tasks` (before loading its model): they leave the queue and are active
        (A1111's start_task); progress 0 until `begin`. Tasks already completed (their request gave up) stay so."""
        with self._lock:
            self._activate(tasks)

    def _activate(self, tasks: Sequence[TaskEntry]) -> None:
        for entry in tasks:
            if entry.state == "queued":
                entry.state = "active"
                self._queued.pop(entry, None)
        self._active = tuple(entry for entry in tasks if entry.state == "active")

    def deactivate(self, tasks: Sequence[TaskEntry]) -> None:
        """The device is done with the job of `tasks`: they stay active (progress 1) until their responses are
        made and `complete` is called."""
        with self._lock:
            self._release(tasks)

    def _release(self, tasks: Sequence[TaskEntry]) -> None:
        for entry in tasks:
            if entry in self._active:
                entry.steps = self._state["sampling_steps"] if self._state["job_count"] else 0
        self._active = tuple(entry for entry in self._active if entry not in tasks)

    def complete(self, entry: TaskEntry) -> None:
        """The request ended (A1111's finish_task): its ids are remembered as completed (the last
        `FINISHED_MEMORY`)."""
        with self._lock:
            entry.state = "completed"
            self._queued.pop(entry, None)
            self._active = tuple(e for e in self._active if e is not entry)
            for task_id in entry.ids:
                key = (entry.owner, task_id)
                if self._live.get(key) is entry:
                    del self._live[key]
                    self._finished.pop(key, None)
                    self._finished[key] = entry
            while len(self._finished) > self._finished_memory:
                self._finished.popitem(last=False)

    def task_state(self, id_task: str, consumer: str | None = None) -> dict[str, Any] | None:
        """Where task `id_task` of `consumer` (None: of any consumer, for admins) is, or None when this process
        does not know it: `active`, `queued`, `completed`, `position` (1-based, while queued), `waiting` (how many
        are queued), `step` / `steps`, `progress` and `eta` (seconds; while active, by A1111's formulas:
        job_no / job_count + step / steps / job_count, and elapsed / progress - elapsed, None at progress 0),
        `textinfo` (A1111's: "In queue: i/n", "Waiting..." or None while active) and `owner`."""
        with self._lock:
            entry = self._find(id_task, consumer)
            if entry is None:
                return None
            state: dict[str, Any] = {"active": entry.state == "active", "queued": entry.state == "queued",
                                     "completed": entry.state == "completed", "position": None, "waiting": None,
                                     "step": None, "steps": None, "progress": None, "eta": None,
                                     "textinfo": WAITING, "owner": entry.owner}
            if entry.state == "queued":
                queue = list(self._queued)  # admission order (A1111 sorts by the time each was added)
                state.update(position=queue.index(entry) + 1, waiting=len(queue))
                state["textinfo"] = f"In queue: {state['position']}/{state['waiting']}"
            elif entry.state == "active":
                state.update(self._running(entry), textinfo=None)
        return state

    def task_snapshot(self, id_task: str, consumer: str | None = None) -> dict[str, Any] | None:
        """A running task's place, JSON-able, for other instances to show (the `tasks.progress_json` column):
        {"step", "steps", "progress", "eta"}; None when the task is not active here."""
        with self._lock:
            entry = self._find(id_task, consumer)
            if entry is None or entry.state != "active":
                return None
            return self._running(entry)

    def _find(self, id_task: str, consumer: str | None) -> TaskEntry | None:
        """The live (else the latest completed) entry of `id_task` for `consumer` (None: any). Lock held."""
        if consumer is not None:
            return self._live.get((consumer, id_task)) or self._finished.get((consumer, id_task))
        live = [entry for (_, task_id), entry in self._live.items() if task_id == id_task]
        if live:
            return max(live, key=lambda entry: entry.seq)
        return next((entry for (_, task_id), entry in reversed(self._finished.items()) if task_id == id_task), None)

    def _running(self, entry: TaskEntry) -> dict[str, Any]:
        """Step, steps, progress and ETA of an active entry (lock held): its job's while the device runs it
        (progress 0 and no ETA while its model loads), 1 and 0 once the device is done with it."""
        if entry not in self._active:
            return {"step": entry.steps, "steps": entry.steps, "progress": 1.0, "eta": 0.0}
        state = self._state
        count, total, step = state["job_count"], state["sampling_steps"], state["sampling_step"]
        progress = 0.0
        if count > 0:
            progress += state["job_no"] / count
            if total > 0:
                progress += step / total / count
        progress = min(progress, 1.0)
        elapsed = self._clock() - self._started
        eta = elapsed / progress - elapsed if progress > 0 else None
        return {"step": step if count else 0, "steps": total if count else 0, "progress": progress, "eta": eta}
