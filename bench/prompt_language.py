"""Prompt language cost: what do prompt editing, alternation and `AND` cost a txt2img step, against a plain prompt?

    python -m bench.prompt_language [--rounds 10] [--size 256] [--steps 8] [--arch sd15|sdxl|both]
                                    [--threads T] [--shuffle-seed 0] [--out FILE.json] [--markdown FILE]

Method. One in-process app (`create_app`, records off, request log off) on a temporary data folder with the demo
checkpoints. Per architecture, one txt2img per kind through `app.test_client()` (Euler, `--steps`, `--size`
square, CFG 7, fixed seed), timed with `perf_counter`, kinds in an order shuffled per round (seeded):

| kind | prompt | what runs per step |
|---|---|---|
| `plain` (baseline) | `a red house, blue sky` | the pipeline's own encoding, one UNet call on [uncond, cond] |
| `edit` | `a [red:blue:0.5] house, blue sky` | the same UNet call, the conditioning swapped at the switch step |
| `alternate` | `a [red\\|blue] house, blue sky` | the same, swapped every step |
| `and2` | `a red house AND blue sky` | one UNet call on [uncond, cond 1, cond 2]: 3 rows instead of 2 |
| `and3` | `a red house AND blue sky AND a tree :0.8` | 4 rows instead of 2 |

Reported per kind: median and p90 of the request time, the ratio median / median(`plain`), and the extra
milliseconds per step ((median - plain median) / steps).

Batching. Requests whose prompts schedule differently still share each UNet call when the dynamic batcher
groups them (one row per image, its own conditioning per call). Measured on the pipeline itself
(`pipelines.generate`, the same demo checkpoint): the four prompts of `GROUP` as one job of 4 images (what a
group of four requests runs) against the same four as four jobs one after another (what they cost alone),
alternating, per round; reported as the median of each and the ratio group / alone.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.cli import RoundsConfig, parse_rounds_args, rounds_main
from bench.harness.report import finish, machine_line, result_header, table
from bench.harness.stats import percentile

PROMPTS = {
    "plain": "a red house, blue sky",
    "edit": "a [red:blue:0.5] house, blue sky",
    "alternate": "a [red|blue] house, blue sky",
    "and2": "a red house AND blue sky",
    "and3": "a red house AND blue sky AND a tree :0.8",
}
KINDS = tuple(PROMPTS)
GROUP = ("a [red:blue:0.5] house", "a [cat|dog] AND a boat :0.6", "a green tree", "a [fox::3] field")
BASELINE = "plain"
CHECKPOINTS = {"sd15": "demo-sd15", "sdxl": "demo-sdxl"}


@dataclass
class BenchConfig(RoundsConfig):
    rounds: int = 10


def _time(client: Any, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = client.post("/sdapi/v1/txt2img", json=body)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"txt2img answered {response.status_code}: {response.get_data(as_text=True)[:300]}")
    return seconds


def run(cfg: BenchConfig, command: str) -> dict[str, Any]:
    import torch

    from handler.app import create_app
    from handler.settings import Settings
    from pipelines.builders.demo import write_demo_models

    default_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = result_header("prompt_language", command, cfg, {"kinds": list(KINDS), "baseline": BASELINE},
                           torch.get_num_threads(), default_threads)
    started = time.perf_counter()
    archs = list(CHECKPOINTS) if cfg.arch == "both" else [cfg.arch]
    rng = random.Random(cfg.shuffle_seed)
    result["archs"] = {}
    with tempfile.TemporaryDirectory(prefix="bench-prompts-") as tmp:
        root = Path(tmp)
        write_demo_models(root / "models" / "Stable-diffusion")
        app = create_app(Settings(data_dir=root, warmup={"on_start": False}, record_requests=False,
                                  request_log=False, metrics=False, log_json=False))
        client = app.test_client()
        for arch in archs:
            body = {"steps": cfg.steps, "width": cfg.size, "height": cfg.size, "seed": 5, "sampler_name": "Euler",
                    "cfg_scale": 7, "override_settings": {"sd_model_checkpoint": CHECKPOINTS[arch]}}
            for kind in KINDS:  # untimed: the checkpoint, the parser, the kernels at these shapes
                _time(client, {**body, "prompt": PROMPTS[kind]})
            times: dict[str, list[float]] = {k: [] for k in KINDS}
            for _ in range(cfg.rounds):
                order = list(KINDS)
                rng.shuffle(order)
                for kind in order:
                    times[kind].append(_time(client, {**body, "prompt": PROMPTS[kind]}))
            base = statistics.median(times[BASELINE])
            rows = {}
            for kind in KINDS:
                median = statistics.median(times[kind])
                rows[kind] = {"prompt": PROMPTS[kind], "median_ms": round(median * 1000, 2),
                              "p90_ms": round(percentile(times[kind], 90, method="lower") * 1000, 2),
                              "ratio": round(median / base, 3),
                              "extra_ms_per_step": round((median - base) * 1000 / cfg.steps, 2),
                              "samples_ms": [round(t * 1000, 2) for t in times[kind]]}
            rows["batching"] = _batching(cfg, CHECKPOINTS[arch], arch)
            result["archs"][arch] = rows
        app.extensions["sdfunc"].stop()
    finish(result, time.perf_counter() - started)
    return result


def _batching(cfg: BenchConfig, checkpoint: str, arch: str) -> dict[str, Any]:
    """GROUP as one 4-image job against four 1-image jobs, alternating; seconds per round."""
    from types import SimpleNamespace

    from pipelines.builders.demo import build_demo_pipeline
    from pipelines.cache import LoadedModel
    from pipelines.generate import ImageJob, generate
    from pipelines.samplers import resolve_sampler

    model = LoadedModel(entry=SimpleNamespace(path=checkpoint), sha256=None, arch="sdxl" if arch == "sdxl" else "sd1",
                        pipe=build_demo_pipeline(checkpoint))

    def job(prompts: list[str], seeds: list[int]) -> ImageJob:
        return ImageJob(mode="txt2img", prompt=prompts[0], negative_prompt="", seeds=seeds, subseeds=seeds,
                        subseed_strength=0, batch_size=len(seeds), steps=cfg.steps, cfg_scale=7, width=cfg.size,
                        height=cfg.size, sampler=resolve_sampler("Euler"), prompts=list(prompts),
                        negative_prompts=[""] * len(prompts))

    def group() -> float:
        started = time.perf_counter()
        generate(model, job(list(GROUP), [1, 2, 3, 4]))
        return time.perf_counter() - started

    def alone() -> float:
        started = time.perf_counter()
        for i, prompt in enumerate(GROUP):
            generate(model, job([prompt], [i + 1]))
        return time.perf_counter() - started

    group(), alone()  # untimed: kernels at these batch sizes
    together, apart = [], []
    for _ in range(cfg.rounds):
        together.append(group())
        apart.append(alone())
    return {"prompts": list(GROUP), "group_ms": round(statistics.median(together) * 1000, 2),
            "alone_ms": round(statistics.median(apart) * 1000, 2),
            "ratio": round(statistics.median(together) / statistics.median(apart), 3)}


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"### Prompt language: {cfg['size']}x{cfg['size']}, {cfg['steps']} steps, {cfg['rounds']} rounds",
             "", machine_line(result, f"torch threads {result['machine']['torch_threads']}"), "",
             f"Command: `{result['command']}`", "",
             *table(["arch", "kind", "prompt", "median ms", "p90 ms", "x plain", "extra ms/step"],
                    ([arch, kind, f"`{rows[kind]['prompt']}`".replace("|", "\\|"), rows[kind]["median_ms"],
                      rows[kind]["p90_ms"], f"x{rows[kind]['ratio']}", rows[kind]["extra_ms_per_step"]]
                     for arch, rows in result["archs"].items() for kind in KINDS)),
             "", "Batching: the four prompts " + ", ".join(f"`{p}`".replace("|", "\\|") for p in GROUP)
             + " as one 4-image job (a dynamic-batching group) against four 1-image jobs:", "",
             *table(["arch", "group ms", "alone ms", "x alone"],
                    ([arch, rows["batching"]["group_ms"], rows["batching"]["alone_ms"], f"x{rows['batching']['ratio']}"]
                     for arch, rows in result["archs"].items())),
             ""]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> tuple[BenchConfig, argparse.Namespace]:
    return parse_rounds_args("bench.prompt_language", __doc__.split("\n\n")[0], BenchConfig, argv)


def main(argv: list[str] | None = None) -> None:
    rounds_main("bench.prompt_language", argv, parse_args, run, markdown)


if __name__ == "__main__":
    main()
