"""Model upscalers: what does an ESRGAN-shaped upscaler cost per megapixel through `POST /sdapi/v1/extra-single-image`,
tiled (A1111's `ESRGAN_tile` 192, `ESRGAN_tile_overlap` 8) against untiled, and what does hires fix with a model
upscaler cost against the latent upscale?

    python -m bench.upscale [--data DIR] [--sizes 128,256,384] [--rounds 2] [--blocks 6] [--tile 192] [--overlap 8]
                            [--hires-size 128] [--steps 4] [--hires-steps 4] [--denoising 0.5] [--hires-rounds 3]
                            [--hires-upscalers bench-esrgan-4x,demo-srvgg-2x] [--threads T]
                            [--server-env KEY=VALUE ...] [--out FILE.json] [--markdown FILE]

Method. One real server (`python -m handler.cli serve`, gunicorn, 127.0.0.1, auth off, warm-up at start on the hires
first pass's shape, its records in a fresh SQLite file of the run's temporary folder) on a data folder (`--data`, or a
temporary one) holding the demo checkpoints, the tiny demo upscalers (`pipelines.builders.demo.write_demo_upscalers`)
and `models/ESRGAN/bench-esrgan-4x.safetensors`: an ESRGAN of realistic width written by the bench with random
weights (`pipelines.upscalers.arch.RRDBNet`, num_feat 64, num_grow_ch 32, `--blocks` RRDB blocks: the published
ESRGAN 4x has 23; 6 keep a run within minutes on 2 CPU cores; two 2x upsampling steps, so x4; the last conv scaled
so that its output spans the image's range, as a trained model's does, and the PNG encode costs what it would),
rewritten on every run (the same bytes for the same `--blocks`). Its compute per pixel is the real model's, scaled
by blocks.

1. Upscale. `POST /sdapi/v1/extra-single-image` with `upscaler_1` = the bench model, `upscaling_resize` 2, on a
   synthetic RGB image (smooth gradients plus noise, seeded) of each `--sizes` square. A1111's chain runs the x4
   network once and resizes its output to 2x with Lanczos (`pipelines.postprocess.upscale_by`). Two arms, set before
   each request through `POST /sdapi/v1/options` (the extras routes take no `override_settings`; with auth off there
   is one consumer): `untiled` (baseline, `ESRGAN_tile` 0: the image whole) and `tiled` (`ESRGAN_tile` `--tile`,
   `ESRGAN_tile_overlap` `--overlap`: each tile run with that much context, `pipelines.upscalers.tiling`). A size
   not larger than the tile runs whole in both arms: that row is an A/A. After one untimed request per arm (the
   model's load from the mount, then a cache hit: `/health`'s cache counters must not move during the timed
   requests), `--rounds` rounds; in each, every size, both arms back to back, the arm that goes first alternating
   between sizes and rounds. Per request: the server's device time (`Server-Timing` `gen`), the wall time (send ->
   whole body, which adds the PNG encode, base64 and transfer) and the gunicorn worker's peak resident memory above
   its resident memory before the request (Linux: `VmHWM` reset through `/proc/<pid>/clear_refs`). Reported per
   size: seconds per output megapixel (gen and wall), tiled / untiled (median of each round's pair), peak memory,
   and the largest pixel difference between the two arms' outputs (tiles see only `--overlap` pixels of context,
   less than the network's reach, so they may differ near the seams).
2. Hires fix. `POST /sdapi/v1/txt2img` on demo-sd15 (random weights), `--hires-size` square first pass with `--steps`
   steps, `enable_hr`, `hr_scale` 2, `hr_second_pass_steps` `--hires-steps`, `denoising_strength` `--denoising`,
   `hr_upscaler` = `Latent` (baseline: the latents interpolated) or each of `--hires-upscalers` (the first pass
   decoded, upscaled by the model, resized, encoded again; `ESRGAN_tile` at `--tile`). One untimed request per
   arm, then `--hires-rounds` rounds, the arms' order rotated each round. Reported per arm: gen and wall seconds,
   and model / Latent (median of each round's pair).

Stability: each request records the share of the CPU that other processes used meanwhile (from /proc). A request
above 10 %, or baseline requests (untiled of one size, Latent) whose rounds differ by more than x1.25, mark the run
UNSTABLE. Checks (a failed one makes the exit status 1): every request answered 200 with one image of the expected
size; no model load during the timed requests. No target: the figures are for the record.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.cli import (
    OTHERS_MAX,
    add_output_arguments,
    cpu_snapshot,
    others_share,
    parse_server_env,
    run_benchmark,
)
from bench.harness.report import env_pairs, finish, machine_line, num, result_header, table
from bench.harness.server import MODEL, REQUEST_TIMEOUT, TXT2IMG, ensure_data, max_pixel_diff, payload, running_server
from bench.harness.stats import DISTURBED_SPREAD, spread
from bench.scale.load import parse_server_timing

log = logging.getLogger("bench.upscale")

BENCH_MODEL = "bench-esrgan-4x"  # models/ESRGAN/<this>.safetensors, written by the bench
FEATURES, GROW = 64, 32  # the published ESRGAN's width (RRDBNet num_feat, num_grow_ch)
SCALE = 2.0  # upscaling_resize and hr_scale
ARMS = ("untiled", "tiled")  # untiled is the baseline
LATENT = "Latent"  # the hires baseline
EXTRAS = "/sdapi/v1/extra-single-image"
OPTIONS = "/sdapi/v1/options"
MIB = 1024 * 1024


@dataclass
class BenchConfig:
    """What one run measures. The defaults take about 2.5 minutes on an idle 2-core CPU machine."""

    data: Path | None = None  # data root; the demo checkpoints are written into a temp one when it has none
    sizes: tuple[int, ...] = (128, 256, 384)  # square inputs of the upscale part
    rounds: int = 2  # rounds of every size in both arms
    blocks: int = 6  # RRDB blocks of the bench ESRGAN (the published ESRGAN 4x has 23)
    tile: int = 192  # ESRGAN_tile of the tiled arm (A1111's default)
    overlap: int = 8  # ESRGAN_tile_overlap of the tiled arm (A1111's default)
    hires_size: int = 128  # hires fix: first pass square size
    steps: int = 4  # hires fix: first pass steps
    hires_steps: int = 4  # hires fix: hr_second_pass_steps
    denoising: float = 0.5  # hires fix: denoising_strength
    hires_rounds: int = 3  # hires fix: rounds of every arm
    hires_upscalers: tuple[str, ...] = (BENCH_MODEL, "demo-srvgg-2x")  # hires fix: the arms beside Latent
    threads: int | None = None  # torch threads in the server; None = torch's default here
    seed: int = 0  # the bench model's weights and the input images
    server_timeout: float = 240.0  # seconds the server may take to say READY (warm-up included)
    server_env: tuple[tuple[str, str], ...] = ()  # extra environment for the server


# ---------------------------------------------------------------------------------------------------------
# data


def write_bench_model(models: Path, blocks: int, seed: int) -> dict[str, Any]:
    """`models/ESRGAN/bench-esrgan-4x.safetensors`: an x4 RRDBNet of realistic width and `blocks` blocks, random
    weights (seeded), written atomically. Returns what it is."""
    import torch
    from safetensors.torch import save_file

    from pipelines.upscalers.arch import RRDBNet

    torch.manual_seed(seed)
    net = RRDBNet(num_feat=FEATURES, num_grow_ch=GROW, num_block=blocks)
    with torch.no_grad():  # the output in the image's range, not near black: the PNG encode costs what it would
        net.conv_last.weight.mul_(10.0)
        net.conv_last.bias.add_(0.5)
    path = models / "ESRGAN" / f"{BENCH_MODEL}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: the upscaler scan skips it
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return {"name": BENCH_MODEL, "arch": "ESRGAN (RRDBNet)", "num_feat": FEATURES, "num_grow_ch": GROW,
            "num_block": blocks, "scale": int(net.scale), "parameters": sum(p.numel() for p in net.parameters()),
            "file_mb": round(path.stat().st_size / 1e6, 1)}


def prepare_data(data: Path, cfg: BenchConfig) -> dict[str, Any]:
    """The demo checkpoints (when missing), the demo upscalers (when missing) and the bench model under `data`."""
    from pipelines.builders.demo import write_demo_upscalers

    ensure_data(data)
    write_demo_upscalers(data / "models")
    return write_bench_model(data / "models", cfg.blocks, cfg.seed)


def input_png(size: int, seed: int) -> str:
    """A synthetic square RGB image (smooth gradients and rings plus light noise), as base64 PNG."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * np.pi * np.hypot(x - 0.5, y - 0.5))], axis=-1) * 255.0
    rgb += np.random.default_rng(seed + size).normal(0, 6, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tiles(size: int, tile: int) -> int:
    """How many tiles `pipelines.upscalers.tiling.upscale` runs on a square of `size` (1: the image whole)."""
    return 1 if tile <= 0 or size <= tile else math.ceil(size / tile) ** 2


def out_size(size: int) -> int:
    """The side of the result A1111's chain makes: size * scale, floored to a multiple of 8."""
    return int(size * SCALE) // 8 * 8


# ---------------------------------------------------------------------------------------------------------
# the worker's memory (Linux /proc; None elsewhere)


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak(pid: int | None) -> int | None:
    """Reset the process's peak resident memory (`VmHWM`) to its current resident memory; that, in KiB."""
    if pid is None:
        return None
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib(pid, "VmRSS")


def peak_above(pid: int | None, base_kib: int | None) -> float | None:
    """MiB of the process's peak resident memory since `reset_peak` above the resident memory then."""
    peak = _status_kib(pid, "VmHWM") if pid is not None and base_kib is not None else None
    return None if peak is None else round((peak - base_kib) / 1024, 1)


# ---------------------------------------------------------------------------------------------------------
# requests


class Client:
    """One HTTP session on the server, timing each call, never raising for a failed request (it has an `error`)."""

    def __init__(self, server: Any, session: Any) -> None:
        self.server = server
        self.session = session

    def worker_pid(self) -> int | None:
        pids = self.server.worker_pids()
        return pids[0] if len(pids) == 1 else None

    def options(self, tile: int, overlap: int) -> None:
        """The consumer's `ESRGAN_tile` and `ESRGAN_tile_overlap` (a failure raises: nothing can be measured)."""
        r = self.session.post(self.server.url + OPTIONS, json={"ESRGAN_tile": tile, "ESRGAN_tile_overlap": overlap},
                              timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"POST {OPTIONS} -> {r.status_code}: {r.text[:300]}")

    def cache(self) -> dict[str, Any]:
        """`/health`'s pipeline-cache counters (None before the cache exists)."""
        return self.session.get(self.server.url + "/health", timeout=30).json().get("cache") or {}

    def call(self, path: str, body: dict[str, Any], key: str, expect: int) -> tuple[dict[str, Any], Any]:
        """POST `body`; (the sample: wall, Server-Timing parts, peak memory, other processes' CPU share, error;
        the decoded image or None). `key` is where the answer holds its image, `expect` its side."""
        import requests

        pid = self.worker_pid()
        base = reset_peak(pid)
        before = cpu_snapshot(self.server.proc.pid)
        started = time.perf_counter()
        try:
            r = self.session.post(self.server.url + path, json=body, timeout=REQUEST_TIMEOUT)
            wall = time.perf_counter() - started
        except requests.RequestException as exc:
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}, None
        sample: dict[str, Any] = {"wall_ms": round(wall * 1000.0, 1), "peak_mib": peak_above(pid, base),
                                  "others_cpu_share": others_share(before, cpu_snapshot(self.server.proc.pid))}
        if r.status_code != 200:
            return {**sample, "error": f"{r.status_code}: {r.text[:300]}"}, None
        timing = parse_server_timing(r.headers.get("Server-Timing"))
        sample.update({f"{k}_ms": v for k, v in timing.items()})
        try:
            data = r.json()[key]
            image = _decode(data[0] if isinstance(data, list) else data)
        except (ValueError, KeyError, IndexError, TypeError, OSError) as exc:
            return {**sample, "error": f"bad 200 body: {type(exc).__name__}: {exc}"[:300]}, None
        if image.size != (expect, expect):
            return {**sample, "error": f"image {image.size[0]}x{image.size[1]}, expected {expect}x{expect}"}, None
        if "gen_ms" not in sample:
            return {**sample, "error": "no gen in Server-Timing"}, None
        return sample, image


def _decode(data: str) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def extras_body(image: str) -> dict[str, Any]:
    return {"image": image, "resize_mode": 0, "upscaling_resize": SCALE, "upscaler_1": BENCH_MODEL}


def hires_body(cfg: BenchConfig, upscaler: str) -> dict[str, Any]:
    return {**payload(cfg.hires_size, cfg.steps), "enable_hr": True, "hr_scale": SCALE, "hr_upscaler": upscaler,
            "hr_second_pass_steps": cfg.hires_steps, "denoising_strength": cfg.denoising}


def arm_tile(cfg: BenchConfig, arm: str) -> int:
    return cfg.tile if arm == "tiled" else 0


# ---------------------------------------------------------------------------------------------------------
# the two parts


def run_upscale(cfg: BenchConfig, client: Client) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Warm-up per arm, then the rounds. Returns (the timed samples, the cache counters around them and the
    tiled / untiled pixel differences of the first round)."""
    images = {size: input_png(size, cfg.seed) for size in cfg.sizes}
    for arm in ARMS:  # untimed: the model's load (first), kernels
        client.options(arm_tile(cfg, arm), cfg.overlap)
        warm, _ = client.call(EXTRAS, extras_body(images[cfg.sizes[0]]), "image", out_size(cfg.sizes[0]))
        if warm.get("error"):
            raise RuntimeError(f"warm-up of the {arm} arm failed: {warm['error']}")
    cache_before = client.cache()
    samples: list[dict[str, Any]] = []
    first: dict[tuple[int, str], Any] = {}
    for r in range(cfg.rounds):
        for i, size in enumerate(cfg.sizes):
            for arm in ARMS if (r + i) % 2 == 0 else ARMS[::-1]:
                client.options(arm_tile(cfg, arm), cfg.overlap)
                sample, image = client.call(EXTRAS, extras_body(images[size]), "image", out_size(size))
                sample.update(round=r, size=size, arm=arm, tiles=tiles(size, arm_tile(cfg, arm)))
                samples.append(sample)
                if r == 0 and image is not None:
                    first[(size, arm)] = image
                log.info("upscale round %d, %dx%d %s: %s", r + 1, size, size, arm,
                         sample.get("error") or f"gen {sample['gen_ms']:.0f} ms, wall {sample['wall_ms']:.0f} ms, "
                         f"peak +{sample['peak_mib']} MiB")
    cache_after = client.cache()
    diffs = {str(size): max_pixel_diff(first[(size, "tiled")], first[(size, "untiled")])
             for size in cfg.sizes if (size, "tiled") in first and (size, "untiled") in first}
    return samples, {"cache_before": cache_before, "cache_after": cache_after, "max_pixel_diff": diffs}


def hires_arms(cfg: BenchConfig) -> tuple[str, ...]:
    return (LATENT, *cfg.hires_upscalers)


def run_hires(cfg: BenchConfig, client: Client) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Warm-up per arm, then the rounds, the arms' order rotated each round."""
    arms = hires_arms(cfg)
    expect = out_size(cfg.hires_size)
    client.options(cfg.tile, cfg.overlap)  # A1111's defaults for the model arms
    for arm in arms:
        warm, _ = client.call(TXT2IMG, hires_body(cfg, arm), "images", expect)
        if warm.get("error"):
            raise RuntimeError(f"warm-up of the hires arm {arm} failed: {warm['error']}")
    cache_before = client.cache()
    samples = []
    for r in range(cfg.hires_rounds):
        k = r % len(arms)
        for arm in arms[k:] + arms[:k]:
            sample, _ = client.call(TXT2IMG, hires_body(cfg, arm), "images", expect)
            sample.update(round=r, arm=arm)
            samples.append(sample)
            log.info("hires round %d, %s: %s", r + 1, arm,
                     sample.get("error") or f"gen {sample['gen_ms']:.0f} ms, wall {sample['wall_ms']:.0f} ms")
    return samples, {"cache_before": cache_before, "cache_after": client.cache()}


# ---------------------------------------------------------------------------------------------------------
# summary


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _ok_samples(samples: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [s for s in samples if not s.get("error") and all(s.get(k) == v for k, v in match.items())]


def _paired(samples: list[dict[str, Any]], base: dict[str, Any], other: dict[str, Any], rounds: int) -> list[float]:
    """other / base of gen_ms, per round where both answered."""
    out = []
    for r in range(rounds):
        b, o = _ok_samples(samples, round=r, **base), _ok_samples(samples, round=r, **other)
        if b and o:
            out.append(round(o[0]["gen_ms"] / b[0]["gen_ms"], 3))
    return out


def summarize(cfg: BenchConfig, upscale: list[dict[str, Any]], hires: list[dict[str, Any]]) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    spreads: dict[str, float] = {}
    for size in cfg.sizes:
        mp = out_size(size) ** 2 / 1e6
        entry: dict[str, Any] = {"output": out_size(size), "output_mp": round(mp, 4)}
        for arm in ARMS:
            ok = _ok_samples(upscale, size=size, arm=arm)
            gen, wall = _median([s["gen_ms"] for s in ok]), _median([s["wall_ms"] for s in ok])
            peaks = [s["peak_mib"] for s in ok if s.get("peak_mib") is not None]
            entry[arm] = {"tiles": tiles(size, arm_tile(cfg, arm)), "gen_ms": gen, "wall_ms": wall,
                          "s_per_mp_gen": None if gen is None else round(gen / 1000 / mp, 3),
                          "s_per_mp_wall": None if wall is None else round(wall / 1000 / mp, 3),
                          "peak_mib": _median(peaks), "round_gen_ms": [s["gen_ms"] for s in ok],
                          "errors": sum(1 for x in upscale if x.get("error") and x["size"] == size
                                        and x["arm"] == arm)}
            if arm == "untiled" and len(ok) > 1:
                spreads[f"{size}/untiled"] = round(spread([s["gen_ms"] for s in ok]), 3)
        paired = _paired(upscale, {"size": size, "arm": "untiled"}, {"size": size, "arm": "tiled"}, cfg.rounds)
        entry["round_ratios"] = paired
        entry["ratio"] = _median(paired)
        sizes[str(size)] = entry
    arms: dict[str, Any] = {}
    for arm in hires_arms(cfg):
        ok = _ok_samples(hires, arm=arm)
        paired = _paired(hires, {"arm": LATENT}, {"arm": arm}, cfg.hires_rounds)
        arms[arm] = {"gen_ms": _median([s["gen_ms"] for s in ok]), "wall_ms": _median([s["wall_ms"] for s in ok]),
                     "round_gen_ms": [s["gen_ms"] for s in ok], "round_ratios": paired, "ratio": _median(paired),
                     "errors": sum(1 for s in hires if s.get("error") and s["arm"] == arm)}
        if arm == LATENT and len(ok) > 1:
            spreads[f"hires/{LATENT}"] = round(spread([s["gen_ms"] for s in ok]), 3)
    busy = [f"{s.get('size', 'hires')}/{s['arm']}/round {s['round'] + 1}" for s in [*upscale, *hires]
            if s.get("others_cpu_share") is not None and s["others_cpu_share"] > OTHERS_MAX]
    disturbed = [k for k, v in spreads.items() if v > DISTURBED_SPREAD]
    stability: dict[str, Any] = {"round_spread": spreads, "threshold": DISTURBED_SPREAD, "others_max": OTHERS_MAX,
                                 "busy_requests": busy, "baseline_disturbed": disturbed,
                                 "disturbed": bool(busy or disturbed)}
    if busy:
        log.warning("other processes used more than %.0f %% of the CPU during %d request(s): rerun on a quiet "
                    "machine", OTHERS_MAX * 100, len(busy))
    if disturbed:
        log.warning("baseline rounds differ by more than x%.2f (%s): the machine was busy", DISTURBED_SPREAD,
                    ", ".join(disturbed))
    return {"sizes": sizes, "hires": arms, "stability": stability}


def checks(upscale: list[dict[str, Any]], hires: list[dict[str, Any]], up_extra: dict[str, Any],
           hires_extra: dict[str, Any]) -> dict[str, Any]:
    """Every request answered with its image; no model loaded while timing."""
    errors = [s["error"] for s in [*upscale, *hires] if s.get("error")]

    def loads(extra: dict[str, Any]) -> int | None:
        before, after = extra["cache_before"].get("loads"), extra["cache_after"].get("loads")
        return None if before is None or after is None else after - before

    up_loads, hires_loads = loads(up_extra), loads(hires_extra)
    out: dict[str, Any] = {
        "errors": {"count": len(errors), "samples": errors[:5], "ok": not errors},
        "no_loads": {"upscale": up_loads, "hires": hires_loads, "ok": up_loads == 0 and hires_loads == 0},
    }
    out["ok"] = all(c["ok"] for c in out.values())
    for name, check in out.items():
        if isinstance(check, dict) and not check["ok"]:
            log.error("check %s failed: %s", name, check)
    return out


def run(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Data, the server up and warm, the upscale part, the hires part, the checks. Returns the result."""
    import requests
    import torch

    default_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads
    started = time.perf_counter()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdfunc-bench-upscale-")))
        env = (("SDFUNC_WARMUP__SHAPES", json.dumps([f"{cfg.hires_size}x{cfg.hires_size}@{cfg.steps}"])),
               ("SDFUNC_DATABASE_URL", f"sqlite:///{work / 'records.sqlite3'}"), *cfg.server_env)
        result: dict[str, Any] = result_header("upscale", command, cfg, {
            "model": MODEL, "scale": SCALE, "arms": list(ARMS), "baseline": "untiled", "hires_baseline": LATENT,
            "threads": threads,
            "server_environment": [list(p) for p in env if p[0] != "SDFUNC_DATABASE_URL"]}, threads, default_threads)
        data = Path(cfg.data).resolve() if cfg.data else work / "data"
        result["config"]["bench_model"] = prepare_data(data, cfg)
        server = stack.enter_context(running_server(data, work, warmup=True, threads=threads, name="upscale",
                                                    extra_env=env))
        session = stack.enter_context(requests.Session())
        server.start()
        ready_s, _ = server.wait_health(session, until=("READY",), timeout=cfg.server_timeout)
        log.info("server READY after %.1f s", ready_s)
        client = Client(server, session)
        listed = {u["name"]: u["scale"] for u in session.get(server.url + "/sdapi/v1/upscalers", timeout=30).json()}
        missing = [n for n in (BENCH_MODEL, *cfg.hires_upscalers) if n not in listed]
        if missing:
            raise RuntimeError(f"upscalers not listed by the server: {missing} (listed: {sorted(listed)})")
        result["config"]["listed_scales"] = {n: listed[n] for n in (BENCH_MODEL, *cfg.hires_upscalers)}
        upscale, up_extra = run_upscale(cfg, client)
        hires, hires_extra = run_hires(cfg, client)
    result["upscale"] = {"samples": upscale, **up_extra}
    result["hires"] = {"samples": hires, **hires_extra}
    result["summary"] = summarize(cfg, upscale, hires)
    result["checks"] = checks(upscale, hires, up_extra, hires_extra)
    finish(result, time.perf_counter() - started)
    return result


# ---------------------------------------------------------------------------------------------------------
# report


def _s(ms: float | None, digits: int = 2) -> str:
    return "-" if ms is None else f"{ms / 1000:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The section RESULTS.md carries, from a result dict."""
    m, c = result["machine"], result["config"]
    s = result["summary"]
    bm = c["bench_model"]
    stab = s["stability"]
    ch = result["checks"]
    diffs = result["upscale"]["max_pixel_diff"]
    lines = [
        machine_line(result, f"torch threads {m['torch_threads']} in the server (torch default here: "
                             f"{m['torch_default_threads']})"),
        "",
        f"Command: `{result['command']}`",
        "",
        f"One server (gunicorn, auth off, {env_pairs(c['server_environment'])}). Upscaler `{bm['name']}`: "
        f"{bm['arch']}, num_feat {bm['num_feat']}, num_grow_ch {bm['num_grow_ch']}, {bm['num_block']} blocks, x"
        f"{bm['scale']}, {bm['parameters'] / 1e6:.1f} M parameters (random weights; the published ESRGAN 4x has 23 "
        f"blocks). `POST /sdapi/v1/extra-single-image`, `upscaling_resize` {c['scale']:g} (the x{bm['scale']} network "
        f"runs once, then a Lanczos resize to {c['scale']:g}x); `untiled` = `ESRGAN_tile` 0 (baseline), `tiled` = "
        f"`ESRGAN_tile` {c['tile']}, `ESRGAN_tile_overlap` {c['overlap']}, set through `POST /sdapi/v1/options` "
        f"before each request; {c['rounds']} rounds after one untimed request per arm, arms alternating. gen = "
        "`Server-Timing` device time, wall = send -> whole body; s/MP = seconds per output megapixel (medians); "
        "tiled / untiled = median of each round's gen ratio; peak = the worker's peak resident memory above its "
        "resident memory before the request.",
        "",
        *table(["input", "output", "tiles", "untiled gen s", "tiled gen s", "untiled s/MP gen", "tiled s/MP gen",
                "untiled s/MP wall", "tiled s/MP wall", "tiled / untiled", "per round", "peak MiB untiled / tiled",
                "max pixel diff"],
               ([f"{size}x{size}", f"{e['output']}x{e['output']}", e["tiled"]["tiles"], _s(e["untiled"]["gen_ms"]),
                 _s(e["tiled"]["gen_ms"]), num(e["untiled"]["s_per_mp_gen"], 2), num(e["tiled"]["s_per_mp_gen"], 2),
                 num(e["untiled"]["s_per_mp_wall"], 2), num(e["tiled"]["s_per_mp_wall"], 2),
                 f"**{num(e['ratio'], 3)}**", ", ".join(num(x, 3) for x in e["round_ratios"]),
                 f"{num(e['untiled']['peak_mib'], 0)} / {num(e['tiled']['peak_mib'], 0)}",
                 diffs.get(size, "-")] for size, e in s["sizes"].items()),
               "lrrrrrrrrrlll"),
        "",
        f"Hires fix: `POST /sdapi/v1/txt2img`, {c['model']} (random weights), {c['hires_size']}x{c['hires_size']} "
        f"first pass, {c['steps']} steps, `hr_scale` {c['scale']:g}, `hr_second_pass_steps` {c['hires_steps']}, "
        f"`denoising_strength` {c['denoising']:g}, Euler; {c['hires_rounds']} rounds after one untimed request "
        "per arm, the order rotated each round; x Latent = median of each round's gen ratio.",
        "",
        *table(["hr_upscaler", "gen s", "wall s", "x Latent", "per round"],
               ([f"`{arm}`", _s(e["gen_ms"], 3), _s(e["wall_ms"], 3), f"**{num(e['ratio'], 3)}**",
                 ", ".join(num(x, 3) for x in e["round_ratios"])] for arm, e in s["hires"].items()),
               "lrrrl"),
        "",
        "Stability: the baselines' largest spread between rounds "
        + (", ".join(f"{k} x{v:.2f}" for k, v in stab["round_spread"].items()) or "-")
        + (f"; requests during which other processes used over {stab['others_max'] * 100:.0f} % of the CPU: "
           f"{len(stab['busy_requests'])}" if stab["busy_requests"] else "")
        + (" - UNSTABLE, rerun on a quiet machine" if stab["disturbed"] else "") + ".",
        "",
        f"Checks (a failed one makes the exit status 1): errors {ch['errors']['count']}: "
        f"{'OK' if ch['errors']['ok'] else 'FAILED'}; model loads while timing (`/health` cache `loads`) upscale "
        f"{ch['no_loads']['upscale']}, hires {ch['no_loads']['hires']}: {'OK' if ch['no_loads']['ok'] else 'FAILED'}.",
    ]
    return "\n".join(lines) + "\n"


def _ints(p: argparse.ArgumentParser, text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        p.error(f"{name}: comma-separated integers")
    return values


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None, Path | None, str]:
    """(config, --out, --markdown, --log-level) from the command line."""
    d = BenchConfig
    p = argparse.ArgumentParser(prog="python -m bench.upscale", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="data root (demo models written there if missing; default: a temp dir)")
    p.add_argument("--sizes", default=",".join(map(str, d.sizes)), help="square input sizes (default %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="upscale rounds (default %(default)s)")
    p.add_argument("--blocks", type=int, default=d.blocks, help="RRDB blocks of the bench ESRGAN (default %(default)s)")
    p.add_argument("--tile", type=int, default=d.tile, help="ESRGAN_tile of the tiled arm (default %(default)s)")
    p.add_argument("--overlap", type=int, default=d.overlap, help="ESRGAN_tile_overlap (default %(default)s)")
    p.add_argument("--hires-size", type=int, default=d.hires_size, help="hires first pass size (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="hires first pass steps (default %(default)s)")
    p.add_argument("--hires-steps", type=int, default=d.hires_steps, help="hr_second_pass_steps (default %(default)s)")
    p.add_argument("--denoising", type=float, default=d.denoising, help="denoising_strength (default %(default)s)")
    p.add_argument("--hires-rounds", type=int, default=d.hires_rounds, help="hires rounds (default %(default)s)")
    p.add_argument("--hires-upscalers", default=",".join(d.hires_upscalers),
                   help="hr_upscaler arms beside Latent, comma-separated (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads in the server (default: torch's default)")
    add_output_arguments(p)
    a = p.parse_args(argv)
    sizes = _ints(p, a.sizes, "--sizes")
    if not sizes or len(set(sizes)) != len(sizes) or any(s < 16 or s % 8 for s in sizes):
        p.error("--sizes: distinct multiples of 8, at least 16")
    if a.hires_size < 64 or a.hires_size % 8:
        p.error("--hires-size: a multiple of 8, at least 64")
    if min(a.rounds, a.hires_rounds, a.blocks, a.steps, a.hires_steps, a.tile) < 1 or a.overlap < 0 \
            or (a.threads is not None and a.threads < 1):
        p.error("--rounds, --hires-rounds, --blocks, --steps, --hires-steps, --tile and --threads at least 1; "
                "--overlap at least 0")
    if not 0 < a.denoising <= 1:
        p.error("--denoising: in (0, 1]")
    upscalers = tuple(x.strip() for x in a.hires_upscalers.split(",") if x.strip())
    if LATENT in upscalers or len(set(upscalers)) != len(upscalers):
        p.error(f"--hires-upscalers: distinct names other than {LATENT} (the baseline, always run)")
    cfg = BenchConfig(data=a.data, sizes=sizes, rounds=a.rounds, blocks=a.blocks, tile=a.tile, overlap=a.overlap,
                      hires_size=a.hires_size, steps=a.steps, hires_steps=a.hires_steps, denoising=a.denoising,
                      hires_rounds=a.hires_rounds, hires_upscalers=upscalers, threads=a.threads,
                      server_env=parse_server_env(p, a.server_env))
    return cfg, a.out, a.markdown, a.log_level


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg, out, markdown_path, log_level = parse_args(args)
    result = run_benchmark("bench.upscale", args, lambda command: run(cfg, command), markdown, out=out,
                           markdown_path=markdown_path, log_level=log_level)
    return 0 if result["checks"]["ok"] else 1  # no target: the figures are for the record; a failed check is an error


if __name__ == "__main__":
    sys.exit(main())
