"""Warm pipelines: loaded once per worker process and reused by every later request.

An LRU keyed by (checkpoint path, VAE path, dtype) with two tiers and a byte budget for each:

* **device**: pipelines ready to run. At most `device_bytes` of weights (auto: `device_fraction` of the
  device's memory, or of the machine's RAM on CPU) and at most `capacity` checkpoints. A load first evicts least
  recently used pipelines until the new one fits (its size is estimated from the file's header, then checked
  with the real one); a pipeline larger than the whole budget still loads, with a warning, after every other
  pipeline has left the device.
* **host** (PAI-EAS `--sd-dynamic-cache`): a pipeline evicted from the device has its modules moved to CPU RAM
  and kept there, up to `host_bytes` (least recently used dropped beyond it). A request for it moves the
  modules back to the device: no disk read, no conversion. On a CPU-only machine the device *is* host RAM, so
  the tier does not apply (`host_tier` is off unless forced) and evicted pipelines are simply dropped.

Bytes are counted per torch module (`LoadedModel.component_bytes`, keyed by `id(module)`): a pipeline with an
external VAE shares its UNet and text encoders with the checkpoint's own pipeline, and those count once. A
module is on the device while any device-tier pipeline uses it; moving a pipeline to the host moves only the
modules no device-tier pipeline still uses. `cachetools` caches size each item on its own (`getsizeof`), which
cannot express that sharing, so this is a small ordered dict instead.

A single-file checkpoint's header is checked (readable, every tensor inside the file) before anything is
evicted for it: a corrupt or truncated file is a `CheckpointError` naming it, and the warm pipelines stay.
After an out-of-memory error the caller calls `trim` to free the device for the retry.

Models that are not pipelines (upscalers, face restorers: `component`) live in the same LRU, tiers and byte
budget: an upscaler used by every request stays warm, and one not used for a while leaves before a pipeline in
use does. They do not count against `capacity` (a number of checkpoints).

Loads are serialised by one lock, so two requests for a cold checkpoint load it once. Counters (`loads`,
`hits`, `host_hits`, `misses`, `evictions`, `host_evictions`, `trims`) are exact and are what tests use to
prove warmth.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import safetensors_header
from pipelines.errors import CheckpointError, ModelNotFound
from pipelines.store import CheckpointEntry, ModelStore, VaeEntry, format_title

log = logging.getLogger(__name__)
# Hashes computed beside a load (threads start with the first one: none exists when a process forks after import)
_HASHING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sdfunc-hash")

Key = tuple[str, str | None, str]  # (checkpoint path, VAE path or None, dtype name)
DEVICE, HOST = "device", "host"
COMPONENT = "<component>"  # a key's second part for a model that is not a pipeline (an upscaler, a face restorer)
CPU_FALLBACK_BYTES = 8 * 1024**3  # device budget on CPU when the machine's memory cannot be read


def assemble_pipeline(cls: type, components: dict[str, Any], **replace: Any) -> Any:
    """A new pipeline object of `cls` over existing components (no weights copied), with `replace` swapped in.
    Components `cls` does not take are dropped; no safety checker and no watermarker, as at load time."""
    # Not diffusers' AutoPipelineFor*.from_pipe: it copies the source's registered config (a refiner's force_zeros /
    # aesthetic score) and leaves the watermarker on its default; DiffusionPipeline.from_pipe also casts to float32.
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
    """Exact counters. `hits`: served from the device tier; `host_hits`: moved back from host RAM; `misses`:
    loaded from disk; `evictions`: pipelines that left the device (moved to host RAM or dropped);
    `host_evictions`: pipelines dropped from host RAM; `trims`: calls of `trim` (out-of-memory recoveries)."""

    loads: int = 0
    hits: int = 0
    host_hits: int = 0
    misses: int = 0
    evictions: int = 0
    host_evictions: int = 0
    trims: int = 0
    load_seconds: list[float] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # read_weights, copy, to_device: sums

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


def _modules(model: LoadedModel) -> dict[int, Any]:
    import torch

    return {id(m): m for m in model.pipe.components.values() if isinstance(m, torch.nn.Module)}


def move_module(module: Any, device: str) -> None:
    """The default mover: `module.to(device)`, waiting for an asynchronous CUDA copy to finish."""
    module.to(device)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def memory_total(device: str) -> int | None:
    """Bytes of memory on `device` (a GPU's total, or the machine's RAM within its cgroup limit on CPU)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total)


def estimate_bytes(path: Path, dtype: str) -> int:
    """Bytes a single-file checkpoint's tensors take once loaded in `dtype`, from its header alone (0 for a
    diffusers folder or an unreadable file: the real size is checked after loading anyway)."""
    import torch

    from pipelines.loading import read_header

    if Path(path).is_dir():
        return 0
    try:
        tensors, _ = read_header(path)
    except Exception:  # noqa: BLE001 - an estimate; the load reports the real error
        return 0
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    total = 0
    for _dtype, shape in tensors.values():
        n = 1
        for s in shape:
            n *= s
        total += n * size
    return total


def check_file(entry: CheckpointEntry) -> None:
    """CheckpointError naming the file when a single-file checkpoint is not a usable safetensors file (garbage,
    a header past the end, a tensor outside the file: truncated), from its header alone; ModelNotFound when it
    is gone. Folders are left to the loader."""
    path = Path(entry.path)
    if path.is_dir():
        return
    try:
        safetensors_header.read_header(path, check_offsets=True)
    except FileNotFoundError:
        raise ModelNotFound(f"'{entry.name}' is no longer on the mount; refresh the model list") from None
    except safetensors_header.HeaderError as exc:
        raise CheckpointError(f"{entry.name}: {exc}; the file is corrupt or incomplete") from None
    except OSError as exc:  # as the loader would say it, without the path
        raise CheckpointError(f"{entry.name}: cannot be read ({exc.strerror or type(exc).__name__})") from None


def compile_unet(pipe: Any, cache_dir: str) -> None:
    """Wrap the UNet in `torch.compile` with inductor's cache under `cache_dir` (on the mount, so a later
    instance reuses the compiled kernels). Compilation itself happens on the first generation."""
    import torch

    os.makedirs(cache_dir, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # read by inductor when it compiles
    pipe.unet = torch.compile(pipe.unet)


class PipelineCache:
    """Two-tier LRU of loaded pipelines with byte budgets (see the module docstring).

    `capacity`: most checkpoints on the device at once (None: the byte budget alone decides).
    `device_bytes`: the device tier's budget (None: `device_fraction` of `memory_total(device)`).
    `host_bytes`: the host tier's budget (0: off). `host_tier`: None = on when `host_bytes` > 0 and the device
    is not the CPU; True forces it (tests, with a `mover` that records instead of copying).
    `mover(module, device)` moves one module between tiers (default `move_module`).
    `load_options`: keyword arguments for `pipelines.loading.load_pipeline` (copy to local disk, direct load).
    `compile_cache_dir`, when set, makes every loaded pipeline's UNet a `torch.compile` module whose
    kernels are cached there."""

    def __init__(self, store: ModelStore, *, device: str, dtype: str, capacity: int | None = 2,
                 device_bytes: int | None = None, device_fraction: float = 0.6, host_bytes: int = 0,
                 host_device: str = "cpu", host_tier: bool | None = None,
                 mover: Callable[[Any, str], None] | None = None, load_options: dict[str, Any] | None = None,
                 compile_cache_dir: str | None = None) -> None:
        self.store = store
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        if device_bytes is None:
            total = memory_total(device)
            device_bytes = int(total * device_fraction) if total else CPU_FALLBACK_BYTES
        self.device_budget = int(device_bytes)
        self.host_device = host_device
        self.host_tier = (host_bytes > 0 and device != host_device) if host_tier is None else host_tier
        self.host_budget = int(host_bytes) if self.host_tier else 0
        self.mover = mover or move_module
        self.load_options = dict(load_options or {})
        self.compile_cache_dir = compile_cache_dir
        self.stats = CacheStats()
        self._items: OrderedDict[Key, LoadedModel] = OrderedDict()  # both tiers, least recently used first
        self._tier: dict[Key, str] = {}
        self._lock = threading.Lock()  # guards _items, _tier and stats
        self._load_lock = threading.RLock()  # one load or move at a time (re-entered to load a VAE's base)

    # reading --------------------------------------------------------------------------------------------
    def loaded(self) -> list[LoadedModel]:
        """Pipelines on the device (ready to run), least recently used first."""
        with self._lock:
            return [m for k, m in self._items.items() if self._tier[k] == DEVICE and k[1] != COMPONENT]

    def parked(self) -> list[LoadedModel]:
        """Pipelines kept in host RAM, least recently used first."""
        with self._lock:
            return [m for k, m in self._items.items() if self._tier[k] == HOST and k[1] != COMPONENT]

    def components(self) -> list[LoadedModel]:
        """The cached models that are not pipelines, either tier, least recently used first."""
        with self._lock:
            return [m for k, m in self._items.items() if k[1] == COMPONENT]

    def nbytes(self) -> int:
        """Bytes of model tensors on the device; components shared between pipelines count once."""
        with self._lock:
            return sum(self._tier_modules(DEVICE).values())

    def host_nbytes(self) -> int:
        """Bytes of model tensors kept in host RAM (modules no device-tier pipeline uses)."""
        with self._lock:
            return sum(self._host_only().values())

    def report(self) -> dict[str, Any]:
        """Counters, bytes and budgets, for /health and logs."""
        with self._lock:
            s = self.stats
            return {
                "device_bytes": sum(self._tier_modules(DEVICE).values()), "device_budget": self.device_budget,
                "host_bytes": sum(self._host_only().values()), "host_budget": self.host_budget,
                "device_models": sum(1 for k, t in self._tier.items() if t == DEVICE and k[1] != COMPONENT),
                "host_models": sum(1 for k, t in self._tier.items() if t == HOST and k[1] != COMPONENT),
                "device_components": sum(1 for k, t in self._tier.items() if t == DEVICE and k[1] == COMPONENT),
                "hits": s.hits, "host_hits": s.host_hits, "misses": s.misses, "loads": s.loads,
                "evictions": s.evictions, "host_evictions": s.host_evictions, "trims": s.trims,
            }

    def peek(self, entry: CheckpointEntry, vae: VaeEntry | None = None) -> LoadedModel | None:
        """The pipeline if it is on the device; never loads, moves or counts."""
        key = self._key(entry, vae)
        with self._lock:
            return self._items[key] if self._tier.get(key) == DEVICE else None

    def _key(self, entry: CheckpointEntry, vae: VaeEntry | None) -> Key:
        return (str(entry.path), str(vae.path) if vae else None, self.dtype)

    # the LRU --------------------------------------------------------------------------------------------
    def get(self, entry: CheckpointEntry, vae: VaeEntry | None = None) -> LoadedModel:
        """The warm pipeline for (checkpoint, vae): from the device, moved back from host RAM, or loaded."""
        key = self._key(entry, vae)
        with self._lock:
            if self._tier.get(key) == DEVICE:
                return self._hit_locked(key)
        with self._load_lock:
            with self._lock:
                tier = self._tier.get(key)
                if tier == DEVICE:  # loaded by another thread while we waited
                    return self._hit_locked(key)
            if tier == HOST:
                return self._restore(key)
            with self._lock:
                self.stats.misses += 1
            if vae is None:  # make room before the load, so the device never holds more than the budget
                check_file(entry)  # ...but evict nothing for a file that cannot load
                self._make_room(key, estimate_bytes(entry.path, self.dtype))
            model = self._build(entry, vae)
            with self._lock:
                self._items[key] = model
                self._tier[key] = DEVICE
            self._make_room(key, 0)
            return model

    def component(self, path: Path, build: Callable[[], Any], *, name: str, version: str = "") -> Any:
        """The warm model of the file `path` that is not a pipeline: from the device, moved back from host RAM, or
        `build()` (device thread), which returns an object whose `components` dict holds its torch modules, on the
        device already. Kept with the pipelines (see the module docstring); `name` is what logs call it; another
        `version` of the file (its size and time) is another model."""
        key: Key = (f"{path}#{version}" if version else str(path), COMPONENT, self.dtype)
        with self._lock:
            if self._tier.get(key) == DEVICE:
                return self._hit_locked(key).pipe
        with self._load_lock:
            with self._lock:
                tier = self._tier.get(key)
                if tier == DEVICE:
                    return self._hit_locked(key).pipe
            if tier == HOST:
                return self._restore(key).pipe
            with self._lock:
                self.stats.misses += 1
            started = time.perf_counter()
            held = build()
            seconds = time.perf_counter() - started
            model = LoadedModel(entry=CheckpointEntry(name, Path(path), False), sha256=None, arch=COMPONENT,
                                pipe=held, load_seconds=seconds, component_bytes=module_bytes(held.components))
            with self._lock:
                self.stats.loads += 1
                self.stats.load_seconds.append(seconds)
                self._items[key] = model
                self._tier[key] = DEVICE
            # Only other components make room for it: it is loaded while a job runs (a hires pass, restore_faces),
            # whose pipeline must stay where it is. A pipeline's next load makes room for both.
            self._make_room(key, 0, components_only=True)
            log.info("loaded %s in %.2f s", name, seconds)
            return held

    def forget(self, path: Path) -> int:
        """Drop every cached pipeline of the checkpoint file `path` (it was replaced on disk); a job running on
        one keeps it until it ends. Returns how many were dropped."""
        with self._lock:
            keys = [k for k in self._items if k[0] == str(path) or k[0].startswith(f"{path}#")]
            for key in keys:
                del self._items[key], self._tier[key]
        if keys:
            log.info("dropped %s from the warm cache: the file was replaced", Path(path).name)
        return len(keys)

    def trim(self, keep: LoadedModel | None = None) -> int:
        """Free device memory after an out-of-memory error: evict every device-tier pipeline except `keep` (the
        one the failed job ran on, worth keeping for the retry; None: all of them) as `_make_room` would (to host
        RAM when the tier is on and it fits, else dropped; modules `keep` shares stay), collect garbage and
        hand the CUDA caching allocator's unused blocks back. Device thread only (like loads). Returns how many
        pipelines left the device; they count in `stats.evictions`, the call in `stats.trims`."""
        with self._load_lock:
            with self._lock:
                victims = [k for k, m in self._items.items() if self._tier[k] == DEVICE and m is not keep]
                self.stats.trims += 1
            for key in victims:
                self._evict(key)
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        return len(victims)

    def remeasure(self, model: LoadedModel) -> None:
        """Count the bytes of `model`'s modules again, and of every cached pipeline sharing one of them, after
        LoRA adapters or embeddings were added to or removed from them; evict others if the device is now over
        its budget. Device thread only (like loads)."""
        with self._lock:
            key = next((k for k, m in self._items.items() if m is model), None)
            shared = set(model.component_bytes)
            for other in self._items.values():
                if other is model or shared & set(other.component_bytes):
                    other.component_bytes = module_bytes(other.pipe.components)
        if key is not None and self._tier.get(key) == DEVICE:
            with self._load_lock:
                self._make_room(key, 0)

    def _hit_locked(self, key: Key) -> LoadedModel:
        self._items.move_to_end(key)
        self.stats.hits += 1
        return self._items[key]

    def _restore(self, key: Key) -> LoadedModel:
        """Move a host-tier pipeline back to the device (under the load lock). It counts as on the device
        first, so that making room neither drops it from host RAM nor moves out the modules it shares."""
        started = time.perf_counter()
        with self._lock:
            model = self._items[key]
            on_device = self._tier_modules(DEVICE)
            incoming = [i for i in model.component_bytes if i not in on_device]
            self._tier[key] = DEVICE
            self._items.move_to_end(key)
        self._make_room(key, 0, components_only=key[1] == COMPONENT)
        modules = _modules(model)
        for module_id in incoming:
            self.mover(modules[module_id], self.device)
        seconds = time.perf_counter() - started
        with self._lock:
            self.stats.host_hits += 1
            self.stats.add_phases({"to_device": seconds})
        log.info("moved %s back from host RAM to %s in %.2f s", model.entry.name, self.device, seconds)
        return model

    def _tier_modules(self, tier: str) -> dict[int, int]:
        out: dict[int, int] = {}
        for key, model in self._items.items():
            if self._tier[key] == tier:
                out.update(model.component_bytes)
        return out

    def _host_only(self) -> dict[int, int]:
        on_device = self._tier_modules(DEVICE)
        return {i: b for i, b in self._tier_modules(HOST).items() if i not in on_device}

    def _make_room(self, keep: Key, incoming: int, *, components_only: bool = False) -> None:
        """Evict least recently used device-tier pipelines and components (never `keep`; only components when
        `components_only`) until `incoming` more bytes fit and the checkpoint count is within `capacity`; a
        pipeline that alone exceeds the budget is warned about."""
        while True:
            with self._lock:
                device_keys = [k for k in self._items if self._tier[k] == DEVICE
                               and (not components_only or k[1] == COMPONENT)]
                used = sum(self._tier_modules(DEVICE).values())
                checkpoints = {k[0] for k in [*device_keys, keep] if k[1] != COMPONENT}
                over_count = self.capacity is not None and len(checkpoints) > self.capacity
                over_bytes = used + incoming > self.device_budget
                victims = [k for k in device_keys if k != keep]
                if over_count and not over_bytes:  # only checkpoints other than keep's reduce the count
                    victims = [k for k in victims if k[0] != keep[0] and k[1] != COMPONENT]
                if not (over_count or over_bytes) or not victims:
                    break
                victim = victims[0]
            self._evict(victim)
        if over_bytes and keep[1] == COMPONENT:
            log.warning("the device cache holds %.2f GiB, over its budget of %.2f GiB, until the next pipeline load "
                        "makes room (%s was added while a job ran)", used / 2**30, self.device_budget / 2**30,
                        Path(keep[0]).name)
        elif over_bytes:
            log.warning("pipeline %s needs %.2f GiB, more than the device cache budget of %.2f GiB: it is "
                        "loaded alone", Path(keep[0]).name, (used + incoming) / 2**30, self.device_budget / 2**30)

    def _evict(self, key: Key) -> None:
        """Take `key` off the device: to host RAM when the tier is on and it fits there, else drop it. Runs on
        the one thread that also generates (handler/runtime/executor.py), so no pipeline is in use while it moves."""
        with self._lock:
            model = self._items[key]
            self._tier[key] = HOST  # provisionally: the modules other device-tier pipelines use stay put
            on_device = self._tier_modules(DEVICE)
            outgoing = {i: b for i, b in model.component_bytes.items() if i not in on_device}
            self.stats.evictions += 1
            kept = self.host_tier and sum(outgoing.values()) <= self.host_budget
            if not kept:
                del self._items[key], self._tier[key]
        if kept:
            modules = _modules(model)
            for module_id in outgoing:
                self.mover(modules[module_id], self.host_device)
            log.info("moved %s to host RAM (%.2f GiB)", model.entry.name, sum(outgoing.values()) / 2**30)
            self._trim_host(key)
        else:
            log.info("evicted %s from the warm cache", model.entry.name)
        del model
        gc.collect()

    def _trim_host(self, keep: Key) -> None:
        """Drop least recently used host-tier pipelines (never `keep`) while the tier is over its budget."""
        with self._lock:
            while sum(self._host_only().values()) > self.host_budget:
                victims = [k for k in self._items if self._tier[k] == HOST and k != keep]
                if not victims:
                    break
                del self._items[victims[0]], self._tier[victims[0]]
                self.stats.host_evictions += 1
                log.info("dropped %s from host RAM", Path(victims[0][0]).name)

    # loading --------------------------------------------------------------------------------------------
    def _build(self, entry: CheckpointEntry, vae: VaeEntry | None) -> LoadedModel:
        if vae is not None:
            base = self.get(entry, None)
            return self._with_vae(base, vae)
        import torch
        from diffusers.utils import logging as diffusers_logging

        from pipelines.loading import load_pipeline

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components..." on every load
        started = time.perf_counter()
        # The sha256 (A1111's `Model hash`) is a full read of the file on a fresh mount: done beside the load,
        # not before it (a prefetched file's hash is known already).
        known = entry.is_dir or self.store.known_sha256(entry) is not None
        hashing = None if known else _HASHING.submit(self.store.sha256, entry)  # a failed load leaves it running
        phases: dict[str, float] = {}
        try:
            pipe = load_pipeline(entry.path, device=self.device, dtype=getattr(torch, self.dtype), timings=phases,
                                 **self.load_options)
            loaded = time.perf_counter()
            sha = hashing.result() if hashing is not None else self.store.known_sha256(entry)
            # The cold-start breakdown has no `copy` phase: copying to local disk is reading the weights; waiting
            # for the hash after the load is too.
            phases["read_weights"] = (phases.get("read_weights", 0.0) + phases.get("copy", 0.0)
                                      + time.perf_counter() - loaded)
        except (FileNotFoundError, ModelNotFound):  # removed from the mount since the last scan
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

    def clear(self) -> None:
        """Drop every pipeline of both tiers."""
        with self._lock:
            self._items.clear()
            self._tier.clear()
        gc.collect()
