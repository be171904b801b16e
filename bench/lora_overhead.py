"""LoRA overhead: what does `<lora:name:w>` cost a txt2img request, against the same request without it?

    python -m bench.lora_overhead [--rounds 12] [--size 256] [--steps 8] [--arch sd15|sdxl|both]
                                  [--threads T] [--shuffle-seed 0] [--out FILE.json] [--markdown FILE]

Method. One in-process app (`create_app`, records off, request log off) on a temporary data folder with the
demo checkpoints and random-weight LoRAs written by `pipelines.builders.demo.write_demo_lora` (kohya format, UNet and
text encoders, rank 4). Per architecture, four kinds of request, each a txt2img through `app.test_client()`
(Euler, `--steps`, `--size` square, CFG 7, fixed seed), timed with `perf_counter`, in an order shuffled per
round (seeded):

| kind | prompt | what the LoRA path does |
|---|---|---|
| `base` (baseline) | `a red house` | adapters disabled (if any are loaded) |
| `warm` | `a red house <lora:a:0.8>` | adapter `a` already loaded: `set_adapters` only |
| `switch` | `<lora:a:1>` and `<lora:b:1>` in turns | both loaded: activates the other one each time |
| `cold` | `<lora:c:1>` / `<lora:d:1>` in turns, `max_loaded_loras=2` kept full by `a`, `b` | loads the file from disk each time (the least recently used adapter is deleted first) |

`cold` uses its own app (max_loaded_loras=2, with `a` and `b` used just before) so that every `cold` request
loads a LoRA; the other kinds share one app with room for all adapters. Reported per kind: median and p90 of
the request time, the ratio median / median(`base`), and the extra milliseconds. The generation itself is
the same work in every kind (the demo models' LoRA layers add a rank-4 matmul per targeted projection).
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

KINDS = ("base", "warm", "switch", "cold")
BASELINE = "base"
CHECKPOINTS = {"sd15": "demo-sd15", "sdxl": "demo-sdxl"}


@dataclass
class BenchConfig(RoundsConfig):
    rounds: int = 12


def _data(root: Path) -> Path:
    from pipelines.builders.demo import write_demo_lora, write_demo_models

    write_demo_models(root / "models" / "Stable-diffusion")
    for arch, kind in CHECKPOINTS.items():
        for seed, name in enumerate("abcd", start=1):
            write_demo_lora(root / "models" / "Lora" / f"{arch}-{name}.safetensors", kind, seed=seed)
    return root


def _app(root: Path, max_loaded_loras: int) -> Any:
    from handler.app import create_app
    from handler.settings import Settings

    return create_app(Settings(data_dir=root, warmup={"on_start": False}, record_requests=False,
                               request_log=False, metrics=False, log_json=False, max_loaded_loras=max_loaded_loras))


def _time(client: Any, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = client.post("/sdapi/v1/txt2img", json=body)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"txt2img answered {response.status_code}: {response.get_data(as_text=True)[:300]}")
    return seconds


def run(cfg: BenchConfig, command: str) -> dict[str, Any]:
    import torch

    default_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = result_header("lora_overhead", command, cfg, {"kinds": list(KINDS), "baseline": BASELINE},
                           torch.get_num_threads(), default_threads)
    started = time.perf_counter()
    archs = list(CHECKPOINTS) if cfg.arch == "both" else [cfg.arch]
    rng = random.Random(cfg.shuffle_seed)
    result["archs"] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        root = _data(Path(tmp))
        shared, cold_app = _app(root, 8), _app(root, 2)
        clients = {"shared": shared.test_client(), "cold": cold_app.test_client()}
        for arch in archs:
            body = {"prompt": "a red house", "steps": cfg.steps, "width": cfg.size, "height": cfg.size, "seed": 5,
                    "sampler_name": "Euler", "cfg_scale": 7,
                    "override_settings": {"sd_model_checkpoint": CHECKPOINTS[arch]}}
            turn = {"switch": 0, "cold": 0}

            def request(kind: str) -> float:
                if kind == "base":
                    return _time(clients["shared"], body)
                if kind == "warm":
                    return _time(clients["shared"], {**body, "prompt": f"a red house <lora:{arch}-a:0.8>"})
                if kind == "switch":
                    turn["switch"] += 1
                    name = "ab"[turn["switch"] % 2]
                    return _time(clients["shared"], {**body, "prompt": f"a red house <lora:{arch}-{name}:1>"})
                turn["cold"] += 1
                name = "cd"[turn["cold"] % 2]
                for keep in "ab":  # fill the two adapter slots so that the next one must load from disk
                    _time(clients["cold"], {**body, "steps": 1, "width": 64, "height": 64,
                                            "prompt": f"x <lora:{arch}-{keep}:1>"})
                return _time(clients["cold"], {**body, "prompt": f"a red house <lora:{arch}-{name}:1>"})

            for kind in KINDS:  # untimed: load the checkpoint in both apps, the adapters, the kernels
                request(kind)
                request(kind)
            times: dict[str, list[float]] = {k: [] for k in KINDS}
            for _ in range(cfg.rounds):
                order = list(KINDS)
                rng.shuffle(order)
                for kind in order:
                    times[kind].append(request(kind))
            base = statistics.median(times[BASELINE])
            rows = {}
            for kind in KINDS:
                median = statistics.median(times[kind])
                rows[kind] = {"median_ms": round(median * 1000, 2),
                              "p90_ms": round(percentile(times[kind], 90, method="lower") * 1000, 2),
                              "ratio": round(median / base, 3), "extra_ms": round((median - base) * 1000, 2),
                              "samples_ms": [round(t * 1000, 2) for t in times[kind]]}
            service = cold_app.extensions["sdfunc"]
            rows["cold"]["adapter_loads"] = service.lora_adapters.loads
            result["archs"][arch] = rows
        for app in (shared, cold_app):
            app.extensions["sdfunc"].stop()
    finish(result, time.perf_counter() - started)
    return result


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"### LoRA overhead: {cfg['size']}x{cfg['size']}, {cfg['steps']} steps, {cfg['rounds']} rounds",
             "", machine_line(result, f"torch threads {result['machine']['torch_threads']}"), "",
             f"Command: `{result['command']}`", "",
             *table(["arch", "kind", "median ms", "p90 ms", "x base", "extra ms"],
                    ([arch, kind, rows[kind]["median_ms"], rows[kind]["p90_ms"], f"x{rows[kind]['ratio']}",
                      rows[kind]["extra_ms"]] for arch, rows in result["archs"].items() for kind in KINDS)),
             ""]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> tuple[BenchConfig, argparse.Namespace]:
    return parse_rounds_args("bench.lora_overhead", __doc__.split("\n\n")[0], BenchConfig, argv)


def main(argv: list[str] | None = None) -> None:
    rounds_main("bench.lora_overhead", argv, parse_args, run, markdown)


if __name__ == "__main__":
    main()
