"""Narrow views of the worker that other runtime modules read, so that they never import the Service.

`WorkerStatus` is what the metrics scrape reads live (handler.runtime.metrics); the Service implements it.
"""

from __future__ import annotations

from typing import Any, Protocol


class WorkerStatus(Protocol):
    """The worker's live status: its state, its device queue, its cold start and its warm pipeline cache."""

    @property
    def state(self) -> str:
        """STARTING, READY, BUSY, FAILED or STOPPING (handler.runtime.admission)."""
        ...

    @property
    def queue_depth(self) -> int:
        """Device jobs waiting behind the running one."""
        ...

    @property
    def device_busy(self) -> bool:
        """Whether the device runs a job."""
        ...

    @property
    def queue_watchers(self) -> int:
        """PAI-EAS sink watchers (WebSockets) this worker serves now."""
        ...

    @property
    def started_at(self) -> float:
        """Epoch seconds at which the server process started."""
        ...

    def cold_start_report(self) -> dict[str, Any]:
        """The cold start's phases and total (handler.runtime.coldstart.ColdStart.report)."""
        ...

    def cache_report(self) -> dict[str, Any] | None:
        """The warm pipeline cache's counters, bytes and budgets (pipelines.cache.PipelineCache.report); None
        before the cache exists (no torch import)."""
        ...

    def cache_device(self) -> str | None:
        """The device the warm pipeline cache runs on; None before the cache exists."""
        ...
