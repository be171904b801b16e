"""The initializer's work: load the configured checkpoints into the warm cache and run one small generation
per configured shape, so that the first real request finds the weights on the device and the kernels, the
allocator, the caches and the response path (PNG, infotext, base64) already warm.

The service calls `warm_up` from `POST /initialize` or at worker start, with its own `load` (a device job)
and `generate` (a txt2img through the request path). This package knows nothing of HTTP or of the handler:
it depends on the pipelines package and on the narrow `Shape` interface below.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from pipelines.cache import LoadedModel
from pipelines.store import CheckpointEntry

log = logging.getLogger(__name__)


class Shape(Protocol):
    """One warm-up generation: a size, a step count, and the architecture it is for (None: every one)."""

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def arch(self) -> str | None: ...


S = TypeVar("S", bound=Shape)


def shapes_for(arch: str, shapes: Iterable[S]) -> list[S]:
    """The shapes that apply to a checkpoint of architecture `arch` ("sd1" or "sdxl")."""
    return [shape for shape in shapes if shape.arch in (None, arch)]


def warm_up(
    entries: list[CheckpointEntry],
    shapes: Sequence[S],
    load: Callable[[CheckpointEntry], LoadedModel],
    generate: Callable[[CheckpointEntry, S], float],
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
