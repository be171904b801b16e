"""The worker's job state, reported by GET /sdapi/v1/progress in A1111's shape."""

from __future__ import annotations

import threading
import time
from typing import Any


class Progress:
    """One worker runs one job at a time; this records where it is. Thread-safe.

    Idle reports exactly `progress == 0.0` and `job_count == 0` (webuiapi's `util_wait_for_ready` loops on it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {
            "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
        }
        self._started = 0.0
        self._owner: str | None = None
        self._job_id: str | None = None

    def begin(self, job: str, job_count: int, sampling_steps: int, owner: str | None = None,
              job_id: str | None = None) -> None:
        """A job starts; `owner` is the consumer it is charged to (only it or an admin may interrupt it);
        `job_id` lets its own request stop it (`stop_job`) without touching a later job."""
        with self._lock:
            self._owner = owner
            self._job_id = job_id
            self._state.update(
                job=job, job_count=job_count, job_no=0, sampling_step=0, sampling_steps=sampling_steps,
                interrupted=False, skipped=False, stopping_generation=False,
                job_timestamp=time.strftime("%Y%m%d%H%M%S"),
            )
            self._started = time.monotonic()

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
        with self._lock:
            self._state.update(job="", job_count=0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            state = dict(self._state)
            started = self._started
        if not state["job_count"]:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        count = state["job_count"]
        progress = 0.01 + state["job_no"] / count
        if state["sampling_steps"]:
            progress += state["sampling_step"] / state["sampling_steps"] / count
        progress = min(progress, 1.0)
        elapsed = time.monotonic() - started
        return {"progress": progress, "eta_relative": elapsed / progress - elapsed, "state": state,
                "current_image": None, "textinfo": None}

    def task_snapshot(self, task_id: str) -> dict[str, Any] | None:
        """Where the task `task_id` is, if it is this worker's running job."""
        with self._lock:
            if not self._state["job_count"] or self._job_id != task_id:
                return None
        snap = self.snapshot()
        return {"step": snap["state"]["sampling_step"], "steps": snap["state"]["sampling_steps"],
                "progress": snap["progress"], "eta": snap["eta_relative"]}

