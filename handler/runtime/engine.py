"""The device side of a worker: the one device thread, the warm pipeline cache on it, model loading timed into
the cold start, and giving device memory back (pre-stop, out of memory).

Nothing heavy happens in the constructor: the pipeline cache (and with it torch) is made on first use, on the
device thread like every other torch call. Everything that touches a model runs on `device`, one job at a time
(handler.runtime.executor).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from handler.runtime.coldstart import ColdStart
from handler.runtime.controlnets import ControlNets
from handler.runtime.executor import DeviceExecutor
from handler.settings import Settings
from pipelines.prefetch import PrefetchWatch
from pipelines.store import CheckpointEntry, ModelStore, VaeEntry

log = logging.getLogger(__name__)

PREFETCH_WAIT_S = 600.0  # longest a load waits for the prefetch of its file (a stalled mount), then it loads


class Engine:
    """The device thread (`device`), the warm pipelines (`cache`) and the cold-start accounting of their loads.

    `cold_start_done` is called once, when the first image completes the cold start (the metrics count it).
    The loaded ControlNet models are device memory too: `release` and `recover_memory` drop them.
    """

    def __init__(self, settings: Settings, store: ModelStore, coldstart: ColdStart, controlnets: ControlNets,
                 cold_start_done: Callable[[], None], prefetch: PrefetchWatch | None = None) -> None:
        self.settings = settings
        self.store = store
        self.coldstart = coldstart
        self.controlnets = controlnets
        self._cold_start_done = cold_start_done
        self.prefetch = prefetch  # the gunicorn master's prefetch process, when there is one
        self.device = DeviceExecutor()  # the one thread that loads and generates
        self._device_type: str | None = None
        self._cache: Any = None
        self._cache_lock = threading.Lock()

    @property
    def cache(self) -> Any:  # -> pipelines.cache.PipelineCache (imports torch lazily)
        with self._cache_lock:
            if self._cache is None:
                from pipelines.cache import PipelineCache

                device = self.settings.resolved_device()
                cfg = self.settings.cache
                load_options = {"direct_to_device": cfg.direct_to_device}
                if cfg.copy_to_local:
                    load_options.update(local_dir=cfg.resolved_local_dir, local_max_bytes=cfg.local_max_bytes)
                self._cache = PipelineCache(
                    self.store, device=device, dtype=self.settings.resolved_dtype(device),
                    capacity=self.settings.max_loaded_models, device_bytes=cfg.device_bytes,
                    device_fraction=cfg.device_fraction, host_bytes=cfg.host_bytes, load_options=load_options,
                    compile_cache_dir=str(self.settings.compile_cache_dir) if self.settings.warmup.compile else None,
                )
            return self._cache

    @property
    def cache_if_loaded(self) -> Any:
        """The PipelineCache if one exists, else None; never imports torch."""
        return self._cache

    def device_name(self) -> str:
        """The device pipelines run on, or the configured value before the first load (no torch import)."""
        return self._cache.device if self._cache is not None else self.settings.device

    def device_type(self) -> str:
        """What billing prices: `cpu`, or the GPU's model name (`NVIDIA H100 80GB HBM3`)."""
        if self._device_type is None:
            device = self.device_name()
            if device.startswith("cuda"):
                import torch

                self._device_type = torch.cuda.get_device_name(torch.device(device))
            else:
                self._device_type = device
        return self._device_type

    def loaded_models(self) -> list[str]:
        """Titles of the warm pipelines (empty before the first load)."""
        return [m.title for m in self._cache.loaded()] if self._cache is not None else []

    def import_runtime(self) -> None:
        """The heavy imports, timed, on the device thread like all torch work (once; a no-op afterwards)."""
        if not self.coldstart.imported:
            self.device.run(self.coldstart.import_runtime)

    def load(self, checkpoint: CheckpointEntry, vae: VaeEntry | None = None) -> tuple[Any, float | None]:
        """The warm pipeline for (checkpoint, vae) and the seconds spent loading it (None on a hit). Runs
        on the device thread; loads during the cold start go into its breakdown. A load of a file the prefetch
        is still reading waits for it first (that wait is reading the weights)."""
        self.coldstart.import_runtime()  # timed before the cache resolves the device (which imports torch)
        cache = self.cache
        self.coldstart.init_device(cache.device)
        stats = cache.stats
        if cache.peek(checkpoint, vae) is not None:
            return cache.get(checkpoint, vae), None
        from pipelines.loading import pipeline_arch

        arch = pipeline_arch(checkpoint.path)  # its pipeline classes only (the header says which)
        self.coldstart.import_runtime([arch] if arch else ["sd1", "sdxl"])
        started = time.perf_counter()
        self._await_prefetch(checkpoint)
        waited = time.perf_counter() - started
        before, phases = stats.loads + stats.host_hits, dict(stats.phase_seconds)  # from disk or from host RAM
        model = cache.get(checkpoint, vae)
        if stats.loads + stats.host_hits == before:
            return model, None
        self.coldstart.record("read_weights", waited)
        for name, total in cache.stats.phase_seconds.items():
            self.coldstart.record(name, total - phases.get(name, 0.0))
        return model, time.perf_counter() - started

    def _await_prefetch(self, checkpoint: CheckpointEntry) -> None:
        """Wait until the prefetch has read `checkpoint` (no-op when it is not being prefetched), and put the
        prefetch's span into the cold start once it is over."""
        watch = self.prefetch
        if watch is None or checkpoint.is_dir:
            return
        started = time.perf_counter()
        result = watch.wait(checkpoint.path, timeout=PREFETCH_WAIT_S)
        if result is None and not watch.ended:
            log.warning("the prefetch of %s takes over %.0f s; loading it now", checkpoint.name, PREFETCH_WAIT_S)
        self.coldstart.prefetch_waited(time.perf_counter() - started)
        if results := watch.results():
            self.coldstart.prefetch_span(min(r.started for r in results), max(r.ended for r in results))

    def first_image(self, seconds: float) -> None:
        """A generation finished on the device: part of the cold start until the first one completes it."""
        self.coldstart.record("first_generation", seconds)
        if self.coldstart.complete():
            self._cold_start_done()
            report = self.coldstart.report()
            log.info("cold start: %.2f s to the first image (%s)", report["total_seconds"],
                     ", ".join(f"{k} {v:.2f} s" for k, v in report["phases"].items()),
                     extra={"fields": {"cold_start": report}})

    def release(self) -> int:
        """Drop every warm pipeline and hand cached device memory back. Runs on the device thread."""
        cache = self._cache
        if cache is None:
            return 0
        count = len(cache.loaded())
        cache.clear()
        self.controlnets.clear()
        if cache.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        return count

    def recover_memory(self, exc: BaseException, keep: Any) -> None:
        """After an out-of-memory error on the device thread: release the failed job's tensors (the frames of
        its traceback hold its latents and activations until the error object dies, which is after the
        response), then trim the warm cache to `keep`, the pipeline the job ran on (None when the error came
        while loading: then every pipeline goes). Never raises: the original error is what the caller gets."""
        traceback.clear_frames(exc.__traceback__)  # the running frame (ours) is skipped; the rest are done
        self.controlnets.clear()
        cache = self._cache
        try:
            dropped = cache.trim(keep=keep) if cache is not None else 0
        except Exception:  # best effort: the request fails with the out-of-memory error either way
            log.exception("trimming the warm cache after running out of device memory failed")
            return
        report = cache.report() if cache is not None else {}
        log.warning("out of device memory on %s: %d pipeline(s) left the device, %s kept; %d model(s) and "
                    "%.2f GiB of weights remain there", self.device_name(), dropped,
                    keep.entry.name if keep is not None else "none", report.get("device_models", 0),
                    report.get("device_bytes", 0) / 2**30, extra={"fields": {"cache": report}})
