"""Warm pipelines: loaded once per worker process and reused by every later request.

An LRU keyed by (checkpoint path, VAE path, dtype). A pipeline with an external VAE shares every other
component with the checkpoint's own pipeline (no second copy of the UNet). Loads are serialised by one lock,
so two requests for a cold checkpoint load it once. Counters (`loads`, `hits`, `evictions`) are exact and
are what tests use to prove warmth.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import ModelNotFound
from pipelines.store import CheckpointEntry, ModelStore, VaeEntry, format_title

log = logging.getLogger(__name__)


def assemble_pipeline(cls: type, components: dict[str, Any], **replace: Any) -> Any:
    """A new pipeline object of `cls` over existing components (no weights copied), with `replace` swapped in.
    Components `cls` does not take are dropped; no safety checker and no watermarker, as at load time."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in {**components, **replace}.items() if k in accepted}
    if "requires_safety_checker" in accepted:
        kwargs["requires_safety_checker"] = False
    if "add_watermarker" in accepted:
        kwargs["add_watermarker"] = False
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class LoadedModel:
    """A ready pipeline and what the infotext says about it."""

    entry: CheckpointEntry
    sha256: str | None
    arch: str  # "sd1" | "sdxl"
    pipe: Any  # diffusers DiffusionPipeline
    vae: VaeEntry | None = None
    vae_sha256: str | None = None
    load_seconds: float = 0.0
    component_bytes: dict[int, int] = field(default_factory=dict)  # id(module) -> bytes of its tensors

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return format_title(self.entry.name, self.sha256)


@dataclass
class CacheStats:
    loads: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # read_weights, to_device: sums over loads

    def add_phases(self, phases: dict[str, float]) -> None:
        for name, seconds in phases.items():
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + seconds


def module_bytes(components: dict[str, Any]) -> dict[int, int]:
    """Bytes held by each torch module among `components` (parameters and buffers), keyed by the module's
    id so that modules shared between pipelines are counted once."""
    import torch

    out: dict[int, int] = {}
    for module in components.values():
        if isinstance(module, torch.nn.Module) and id(module) not in out:
            tensors = [*module.parameters(), *module.buffers()]
            out[id(module)] = sum(t.numel() * t.element_size() for t in tensors)
    return out


def compile_unet(pipe: Any, cache_dir: str) -> None:
    """Wrap the UNet in `torch.compile` with inductor's cache under `cache_dir` (on the mount, so a later
    instance reuses the compiled kernels). Compilation itself happens on the first generation."""
    import os

    import torch

    os.makedirs(cache_dir, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # read by inductor when it compiles
    pipe.unet = torch.compile(pipe.unet)


class PipelineCache:
    """Least-recently-used cache of loaded pipelines, at most `capacity` checkpoints.

    `compile_cache_dir`, when set, makes every loaded pipeline's UNet a `torch.compile` module whose
    kernels are cached there."""

    def __init__(self, store: ModelStore, *, device: str, dtype: str, capacity: int = 2,
                 compile_cache_dir: str | None = None) -> None:
        self.store = store
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self.compile_cache_dir = compile_cache_dir
        self.stats = CacheStats()
        self._items: OrderedDict[tuple[str, str | None, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards _items and stats
        self._load_lock = threading.RLock()  # one load at a time (re-entered to load a VAE's base)

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._items.values())

    def nbytes(self) -> int:
        """Bytes of model tensors held by the cache; components shared between pipelines count once."""
        unique: dict[int, int] = {}
        for model in self.loaded():
            unique.update(model.component_bytes)
        return sum(unique.values())

    def peek(self, entry: CheckpointEntry, vae: VaeEntry | None = None) -> LoadedModel | None:
        with self._lock:
            return self._items.get(self._key(entry, vae))

    def _key(self, entry: CheckpointEntry, vae: VaeEntry | None) -> tuple[str, str | None, str]:
        return (str(entry.path), str(vae.path) if vae else None, self.dtype)

    def get(self, entry: CheckpointEntry, vae: VaeEntry | None = None) -> LoadedModel:
        """The warm pipeline for (checkpoint, vae), loading it on a miss."""
        key = self._key(entry, vae)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.stats.hits += 1
                return hit
        with self._load_lock:
            with self._lock:  # loaded by another thread while we waited
                hit = self._items.get(key)
                if hit is not None:
                    self._items.move_to_end(key)
                    self.stats.hits += 1
                    return hit
                self.stats.misses += 1
            model = self._build(entry, vae)
            with self._lock:
                self._items[key] = model
                self._evict_locked()
            return model

    def _build(self, entry: CheckpointEntry, vae: VaeEntry | None) -> LoadedModel:
        if vae is not None:
            base = self.get(entry, None)
            return self._with_vae(base, vae)
        import torch
        from diffusers.utils import logging as diffusers_logging

        from pipelines.loading import load_pipeline

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components..." on every load
        started = time.perf_counter()
        sha = self.store.sha256(entry)  # a full read of the file on a fresh mount (cached after that)
        hashed = time.perf_counter() - started
        phases: dict[str, float] = {}
        try:
            pipe = load_pipeline(entry.path, device=self.device, dtype=getattr(torch, self.dtype), timings=phases)
            phases["read_weights"] = phases.get("read_weights", 0.0) + hashed
        except FileNotFoundError:  # removed from the mount since the last scan
            raise ModelNotFound(f"'{entry.name}' is no longer on the mount; refresh the model list") from None
        arch = "sdxl" if "XL" in type(pipe).__name__ else "sd1"
        if self.compile_cache_dir:
            compile_unet(pipe, self.compile_cache_dir)
        seconds = time.perf_counter() - started
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds.append(seconds)
            self.stats.add_phases(phases)
        log.info("loaded checkpoint %s (%s) in %.2f s", entry.name, arch, seconds)
        return LoadedModel(entry=entry, sha256=sha, arch=arch, pipe=pipe, load_seconds=seconds,
                           component_bytes=module_bytes(pipe.components))

    def _with_vae(self, base: LoadedModel, vae: VaeEntry) -> LoadedModel:
        import torch

        from pipelines.loading import Arch, load_vae

        started = time.perf_counter()
        vae_model = load_vae(vae.path, arch=Arch(base.arch), device=self.device, dtype=getattr(torch, self.dtype))
        pipe = assemble_pipeline(type(base.pipe), base.pipe.components, vae=vae_model)
        seconds = time.perf_counter() - started
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds.append(seconds)
            self.stats.add_phases({"read_weights": seconds})
        log.info("loaded VAE %s for %s in %.2f s", vae.name, base.entry.name, seconds)
        return LoadedModel(
            entry=base.entry, sha256=base.sha256, arch=base.arch, pipe=pipe, vae=vae,
            vae_sha256=self.store.sha256(vae), load_seconds=seconds,
            component_bytes=module_bytes(pipe.components),
        )

    def _evict_locked(self) -> None:
        checkpoints = {key[0] for key in self._items}
        while len(checkpoints) > self.capacity:
            oldest = next(iter(self._items))[0]
            for key in [k for k in self._items if k[0] == oldest]:
                del self._items[key]
                self.stats.evictions += 1
            checkpoints.discard(oldest)
            log.info("evicted %s from the warm cache", oldest)
            gc.collect()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
        gc.collect()
