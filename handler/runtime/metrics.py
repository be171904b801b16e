"""Prometheus metrics for `GET /metrics`, with `prometheus_client`.

Each app has its own registry (tests build many apps in one process). Request-driven metrics are counters
and histograms updated when a request finishes (`observe`); the state of the worker (pipeline cache, device
queue, cold start, GPU memory) is read live at scrape time by `_LiveCollector`, so those numbers are exact.

Under gunicorn with several workers, set `PROMETHEUS_MULTIPROC_DIR` (an empty folder) before the server
starts: request metrics are then aggregated over all workers by prometheus_client's multiprocess mode, and
the live numbers are those of the worker that answered the scrape.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from handler.runtime.coldstart import PHASES

if TYPE_CHECKING:
    from handler.records.metering import RequestMeter
    from handler.runtime.ports import WorkerStatus

disable_created_metrics()  # no `_created` series: they double the text and nobody graphs them

# Latency buckets (s) from a tiny CPU model's 10 ms to an SDXL cold load's minutes.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, float("inf"))
STATES = ("STARTING", "READY", "BUSY", "FAILED", "STOPPING")


def multiprocess_dir() -> str | None:
    """The folder prometheus_client's multiprocess mode uses, when the operator set one."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The function's metrics. `observe` is called once per finished request; `status` is read at scrape time."""

    def __init__(self, status: WorkerStatus, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdfunc_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("sdfunc_request_duration_seconds", "Time from request to response.",
                                         ["route"], buckets=SECONDS_BUCKETS, registry=r)
        self.queue_wait = Histogram("sdfunc_queue_wait_seconds", "Time a generation waited for the device.",
                                    buckets=SECONDS_BUCKETS, registry=r)
        self.model_load = Histogram("sdfunc_model_load_seconds", "Model loads a request had to wait for.",
                                    buckets=SECONDS_BUCKETS, registry=r)
        self.generation = Histogram("sdfunc_generation_seconds", "Device time of a generation request.",
                                    ["mode"], buckets=SECONDS_BUCKETS, registry=r)
        self.encode = Histogram("sdfunc_encode_seconds", "PNG encoding, saving and base64 of a response.",
                                buckets=SECONDS_BUCKETS, registry=r)
        self.images = Counter("sdfunc_images_generated", "Images returned by successful requests.", ["mode"],
                              registry=r)
        self.billed = Counter("sdfunc_billed_seconds", "Billable device seconds (successful generations only).",
                              registry=r)
        self.in_flight = Gauge("sdfunc_requests_in_flight", "HTTP requests being served.",
                               multiprocess_mode="livesum", registry=r)
        self.cold_starts = Counter("sdfunc_cold_starts", "Cold starts completed by this process (0 or 1).",
                                   registry=r)
        self._live = _LiveCollector(status)
        r.register(self._live)
        if not multiprocess_dir():
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    def request_started(self) -> None:
        if self.enabled:
            self.in_flight.inc()

    def observe(self, meter: RequestMeter) -> None:
        """Count a finished request and its timings."""
        if not self.enabled:
            return
        self.in_flight.dec()
        self.requests.labels(meter.route, meter.method, str(meter.status)).inc()
        if meter.total_seconds is not None:
            self.request_seconds.labels(meter.route).observe(meter.total_seconds)
        if meter.queue_wait_seconds is not None:
            self.queue_wait.observe(meter.queue_wait_seconds)
        if meter.model_load_seconds:
            self.model_load.observe(meter.model_load_seconds)
        if meter.generation_seconds is not None and meter.mode:
            self.generation.labels(meter.mode).observe(meter.generation_seconds)
        if meter.encode_seconds is not None:
            self.encode.observe(meter.encode_seconds)
        if meter.succeeded and meter.mode:
            self.images.labels(meter.mode).inc(meter.images)
            self.billed.inc(meter.billed_ms / 1000)

    def observe_aborted(self) -> None:
        """A request that ended without a response (it left the in-flight count only)."""
        if self.enabled:
            self.in_flight.dec()

    def cold_start_done(self) -> None:
        if self.enabled:
            self.cold_starts.inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        if multiprocess_dir():
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self._live)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LiveCollector(Collector):
    """Worker state read at scrape time."""

    def __init__(self, status: WorkerStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status
        state = GaugeMetricFamily("sdfunc_state", "1 for the worker's current state.", labels=["state"])
        current = status.state
        for name in STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        yield GaugeMetricFamily("sdfunc_uptime_seconds", "Seconds since the server process started.",
                                value=time.time() - status.started_at)
        yield GaugeMetricFamily("sdfunc_device_queue_depth", "Device jobs waiting behind the running one.",
                                value=float(status.queue_depth))
        yield GaugeMetricFamily("sdfunc_device_busy", "1 while the device runs a job.",
                                value=1.0 if status.device_busy else 0.0)
        yield GaugeMetricFamily("sdfunc_queue_watchers", "PAI-EAS sink watchers (WebSockets) served now.",
                                value=float(status.queue_watchers))

        report = status.cold_start_report()
        phases = GaugeMetricFamily("sdfunc_cold_start_phase_seconds",
                                   "This process's cold start, by phase (see handler/runtime/coldstart.py).", labels=["phase"])
        for name in PHASES:
            if name in report["phases"]:
                phases.add_metric([name], report["phases"][name])
        yield phases
        if report["total_seconds"] is not None:
            yield GaugeMetricFamily("sdfunc_cold_start_seconds", "Process start to the first image.",
                                    value=report["total_seconds"])

        cache = status.cache_report() or {}  # one consistent snapshot; zeros before the first load
        for name, help_text in (("hits", "Requests served by a pipeline on the device."),
                                ("host_hits", "Requests served by a pipeline moved back from host RAM."),
                                ("misses", "Requests that had to load a pipeline from disk."),
                                ("evictions", "Pipelines that left the device (to host RAM or dropped)."),
                                ("host_evictions", "Pipelines dropped from host RAM."),
                                ("trims", "Out-of-memory errors after which the device kept one pipeline."),
                                ("loads", "Checkpoint and VAE loads.")):
            yield CounterMetricFamily(f"sdfunc_pipeline_cache_{name}", help_text, value=float(cache.get(name, 0)))
        yield GaugeMetricFamily("sdfunc_pipeline_cache_bytes", "Bytes of weights held by warm pipelines on the "
                                "device (shared components once).", value=float(cache.get("device_bytes", 0)))
        yield GaugeMetricFamily("sdfunc_pipeline_cache_host_bytes", "Bytes of weights kept in host RAM for "
                                "pipelines evicted from the GPU.", value=float(cache.get("host_bytes", 0)))
        budget = GaugeMetricFamily("sdfunc_pipeline_cache_budget_bytes", "Byte budget of each cache tier.",
                                   labels=["tier"])
        budget.add_metric(["device"], float(cache.get("device_budget", 0)))
        budget.add_metric(["host"], float(cache.get("host_budget", 0)))
        yield budget
        yield GaugeMetricFamily("sdfunc_pipeline_cache_models", "Warm pipelines on the device.",
                                value=float(cache.get("device_models", 0)))
        yield GaugeMetricFamily("sdfunc_pipeline_cache_host_models", "Pipelines kept in host RAM.",
                                value=float(cache.get("host_models", 0)))

        device = status.cache_device()
        if device is not None and device.startswith("cuda") and "torch" in sys.modules:
            import torch

            if torch.cuda.is_initialized():
                yield GaugeMetricFamily("sdfunc_gpu_memory_allocated_bytes", "GPU memory held by tensors.",
                                        value=float(torch.cuda.memory_allocated()))
                yield GaugeMetricFamily("sdfunc_gpu_memory_reserved_bytes", "GPU memory reserved by the "
                                        "caching allocator.", value=float(torch.cuda.memory_reserved()))
