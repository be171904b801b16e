"""Load a checkpoint into the warm cache and run one tiny generation, so the first real request finds
the weights on the device and the kernels already initialised."""

from __future__ import annotations

import time

from pipelines.cache import PipelineCache
from pipelines.store import CheckpointEntry


def warm_checkpoint(cache: PipelineCache, entry: CheckpointEntry) -> dict[str, float]:
    """Load `entry` (a no-op when already warm) and generate one 64x64 image at 1 step. Run it on the device
    thread (`handler.executor`). Returns the seconds spent loading and generating."""
    from pipelines.generate import ImageJob, generate
    from pipelines.samplers import resolve_sampler

    started = time.perf_counter()
    model = cache.get(entry)
    loaded = time.perf_counter()
    job = ImageJob(mode="txt2img", prompt="warm-up", negative_prompt="", seeds=[0], subseeds=[0],
                   subseed_strength=0.0, batch_size=1, steps=1, cfg_scale=7.0, width=64, height=64,
                   sampler=resolve_sampler("Euler"))
    generate(model, job)
    done = time.perf_counter()
    return {"load_seconds": round(loaded - started, 3), "generate_seconds": round(done - loaded, 3)}
