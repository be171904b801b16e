"""The initializer's work: load the configured checkpoints into the warm cache and run one small generation
per configured shape, so that the first real request finds the weights on the device and the kernels, the
allocator, the caches and the response path (PNG, infotext, base64) already warm.

The service calls `warm_up` from `POST /initialize` or at worker start, with its own `load` (a device job)
and `generate` (a txt2img through the request path, built by `warmup_request`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from handler.schemas import Txt2ImgRequest
from handler.settings import WarmupShape
from pipelines.cache import LoadedModel
from pipelines.store import CheckpointEntry

log = logging.getLogger(__name__)


def shapes_for(arch: str, shapes: Iterable[WarmupShape]) -> list[WarmupShape]:
    """The shapes that apply to a checkpoint of architecture `arch` ("sd1" or "sdxl")."""
    return [shape for shape in shapes if shape.arch in (None, arch)]


def warmup_request(entry: CheckpointEntry, shape: WarmupShape) -> Txt2ImgRequest:
    """The txt2img request that warms `entry` at `shape`: Euler, fixed seed, nothing saved."""
    return Txt2ImgRequest(prompt="warm-up", seed=0, steps=shape.steps, width=shape.width, height=shape.height,
                          sampler_name="Euler", override_settings={"sd_model_checkpoint": entry.name})


def warm_up(
    entries: list[CheckpointEntry],
    shapes: list[WarmupShape],
    load: Callable[[CheckpointEntry], LoadedModel],
    generate: Callable[[CheckpointEntry, WarmupShape], float],
) -> list[dict[str, Any]]:
    """Load each of `entries`, then `generate` each shape that applies to its architecture (it returns the
    device seconds). Returns one record per checkpoint."""
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
            seconds = generate(entry, shape)
            record["generations"].append({"width": shape.width, "height": shape.height, "steps": shape.steps,
                                          "seconds": round(seconds, 3)})
            log.info("warm-up %s %dx%d, %d steps: %.2f s", entry.name, shape.width, shape.height, shape.steps, seconds)
        done.append(record)
    return done
