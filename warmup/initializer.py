"""The initializer's work: load the configured checkpoints into the warm cache and run one small generation
per configured shape, so that the first real request finds the weights on the device and the kernels, the
allocator and the caches already warm.

Runs on the device thread (`handler.executor`); the service calls it from `POST /initialize` or at worker
start, and records what it measures into the cold-start breakdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from handler.settings import WarmupShape
from pipelines.cache import LoadedModel
from pipelines.store import CheckpointEntry

log = logging.getLogger(__name__)


def shapes_for(arch: str, shapes: Iterable[WarmupShape]) -> list[WarmupShape]:
    """The shapes that apply to a checkpoint of architecture `arch` ("sd1" or "sdxl")."""
    return [shape for shape in shapes if shape.arch in (None, arch)]


def warm_generate(model: LoadedModel, shape: WarmupShape) -> float:
    """One generation of `shape` on `model` (Euler, fixed seed, image discarded). Returns its device seconds."""
    from pipelines.generate import ImageJob, generate
    from pipelines.samplers import resolve_sampler

    job = ImageJob(mode="txt2img", prompt="warm-up", negative_prompt="", seeds=[0], subseeds=[0],
                   subseed_strength=0.0, batch_size=1, steps=shape.steps, cfg_scale=7.0, width=shape.width,
                   height=shape.height, sampler=resolve_sampler("Euler"))
    return generate(model, job).generation_seconds


def warm_up(
    entries: list[CheckpointEntry],
    shapes: list[WarmupShape],
    load: Callable[[CheckpointEntry], LoadedModel],
    on_generation: Callable[[float], None],
) -> list[dict[str, Any]]:
    """Load each of `entries` with `load`, then generate each shape that applies to its architecture,
    calling `on_generation(seconds)` after each. Returns one record per checkpoint."""
    done: list[dict[str, Any]] = []
    for entry in entries:
        started = time.perf_counter()
        model = load(entry)
        record: dict[str, Any] = {"checkpoint": entry.name, "arch": model.arch,
                                  "load_seconds": round(time.perf_counter() - started, 3), "generations": []}
        applicable = shapes_for(model.arch, shapes)
        if not applicable:
            log.warning("no warm-up shape applies to %s (%s); loaded only", entry.name, model.arch)
        for shape in applicable:
            seconds = warm_generate(model, shape)
            on_generation(seconds)
            record["generations"].append({"width": shape.width, "height": shape.height, "steps": shape.steps,
                                          "seconds": round(seconds, 3)})
            log.info("warm-up %s %dx%d, %d steps: %.2f s", entry.name, shape.width, shape.height, shape.steps, seconds)
        done.append(record)
    return done
