"""Cold start: how long a fresh function instance takes to its first image, whether FC's initializer
(`POST /initialize`) makes the first real request as fast as the ones after it, and how sdfunc's cold start
compares with the bare diffusers script a user would write instead.

    python -m bench.cold_start [--data DIR] [--models demo-sd15,demo-sdxl] [--size 256] [--steps 8]
                               [--repeats 2] [--steady 8] [--ways no_initialize,initialize_first[,bare]]
                               [--drop-cache] [--real-arch] [--threads T] [--server-env KEY=VALUE]
                               [--out FILE.json] [--markdown FILE]

For each checkpoint (default the demo SD 1.5 and SDXL ones, random weights; `--real-arch` adds `real-sd15`, a
2.1 GB random-weight file of SD 1.5's real architecture, written into the data root once) and each repeat, one
fresh process per way in `--ways` (default `no_initialize,initialize_first`; `bare` is opt-in). The servers are
`python -m handler.cli serve` (gunicorn, on a free 127.0.0.1 port, warm-up at worker start off):

* `no initialize`: `SDFUNC_DEFAULT_CHECKPOINT=<model>`; `Popen` -> `GET /health` answers -> the first
  `POST /sdapi/v1/txt2img` (which loads the model). Timed: `Popen` -> /health, `Popen` -> first image; the
  first response must say `X-Cold-Start: true`.
* `initialize first` (what FC does): also `SDFUNC_WARMUP__CHECKPOINTS=["<model>"]` and
  `SDFUNC_WARMUP__SHAPES=["<size>x<size>@<steps>"]` (the request's shape); `Popen` -> /health -> `POST
  /initialize` -> the first txt2img. Timed: `Popen` -> /initialize done, `Popen` -> first image, the
  /initialize call and the first request.
* `bare script` (`bare`): `python -m bench.harness.bare` (bench/harness/bare.py): import torch and diffusers,
  `from_single_file` with the checkpoint's shipped config folder, the same txt2img (prompt, Euler, CFG, seed,
  size, steps) and the PNG in memory, then one JSON line on stdout. Timed: `Popen` -> that line is read (the
  same clock as the servers' `Popen` -> first image); its own phases (imports, load, generate) are reported.
  No /health, no steady requests (`-`).

On the servers, `--steady` identical requests (same payload, fixed seed) follow the first; first request /
median(steady) is the price of being new. Target: at most 1.10 after /initialize (the first request pays
nothing the warm-up could have paid); the same ratio without /initialize is shown for contrast. With `bare`
and `no_initialize` both measured: sdfunc / bare = the median over repeats of (no initialize `Popen` -> first
image) / (bare `Popen` -> first image) of the same repeat, every pair shown. Target: at most 0.85 for a
non-demo checkpoint read from a cold page cache (`--drop-cache`; the issue's case is `real-sd15`), at most 1.00
otherwise (demo checkpoints, or a warm cache): sdfunc's start is no slower than the bare script's.

Each server's own breakdown (`GET /healthz` -> `cold_start`: process_to_app, imports, device_init,
read_weights, to_device, first_generation, total_seconds; where the server reports them, the background phase
`prefetch`, `critical_path_seconds` and `overlapped_seconds`, else `-`) is reported next to the client's clock,
with what the foreground phases leave unexplained and how far the server's idea of its start is from `Popen`.

Each cold start is repeated `--repeats` times with a fresh process; the order of the ways alternates between
repeats, with `bare` in the middle, so each server way has a bare run next to it. Medians and all values are
reported. A process's numbers are marked DISTURBED when other processes used more than 10 % of the machine's CPU
(from /proc) while it started or served (where /proc is missing: when a server's steady requests spread by more
than x1.25): on CPU a competing process slows generation many times over. Without `--drop-cache` the page cache
is warm (the checkpoint was just written or read, torch was just imported by this process), so "cold" means a
new process, not a cold disk. With `--drop-cache`, before every start of every way the checkpoint's pages are
dropped from the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`, after an fsync) and the share still resident
is measured (mincore); the libraries and config files stay cached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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
from bench.harness.report import env_pairs, finish, machine_line, result_header, table, verdict
from bench.harness.server import (
    CFG_SCALE,
    PROMPT,
    REPO,
    SAMPLER,
    SEED,
    TXT2IMG,
    Server,
    ensure_data,
    lifecycle_headers,
    payload,
    post,
    running_server,
    stop_process_group,
)
from bench.harness.stats import DISTURBED_SPREAD, median, spread
from bench.harness.throttle import drop_cache, read_throttle
from pipelines.prefetch import resident_share

log = logging.getLogger("bench.cold_start")

MODELS = ("demo-sd15", "demo-sdxl")
WAYS = ("no_initialize", "initialize_first")  # the server ways, and the default `--ways`
BARE = "bare"
ALL_WAYS = (*WAYS, BARE)
WAY_LABELS = {"no_initialize": "no initialize", "initialize_first": "initialize first", BARE: "bare script"}
PHASES = ("process_to_app", "imports", "device_init", "read_weights", "to_device", "first_generation")
BACKGROUND_PHASES = ("prefetch",)  # the server's phases that overlap the others (not in the foreground sum)
BARE_PHASES = ("imports", "load", "generate")
TARGET_RATIO = 1.10  # first request after /initialize over the steady median
TARGET_BARE_COLD = 0.85  # sdfunc / bare, a non-demo checkpoint from a cold page cache (--drop-cache)
TARGET_BARE = 1.00  # sdfunc / bare otherwise
REAL_ARCH_MODEL = "real-sd15"


@dataclass
class BenchConfig:
    """What one run measures. The defaults take a few minutes on an idle 2-core CPU machine."""

    data: Path | None = None  # data root; missing demo checkpoints are written into it (default: a temp one)
    models: tuple[str, ...] = MODELS
    size: int = 256  # square request (and warm-up) shape
    steps: int = 8
    repeats: int = 2  # fresh servers per model and way
    steady: int = 8  # identical requests after the first one
    threads: int | None = None  # OMP_NUM_THREADS of the servers; None = torch's default here
    server_timeout: float = 240.0  # seconds a server may take to answer /health
    request_timeout: float = 600.0  # seconds one request (/initialize included) may take
    server_env: tuple[tuple[str, str], ...] = ()  # extra environment for the servers (A/B of a setting)
    ways: tuple[str, ...] = WAYS  # of ALL_WAYS
    drop_cache: bool = False  # drop the checkpoint's pages from the page cache before every start
    real_arch: bool = False  # write real-sd15 (2.1 GB) when missing and measure it too
    read_mb_s: float | None = None  # cap reads from the checkpoints' disk (a NAS-like mount; bench.harness.throttle)


def models_of(cfg: BenchConfig) -> tuple[str, ...]:
    """The models a run measures: `cfg.models`, plus `real-sd15` with `real_arch` when not listed."""
    return cfg.models + ((REAL_ARCH_MODEL,) if cfg.real_arch and REAL_ARCH_MODEL not in cfg.models else ())


def way_order(ways: tuple[str, ...], repeat: int) -> tuple[str, ...]:
    """The order of the ways in repeat `repeat` (0-based): the server ways as given with `bare` after the first
    one (so every server way has the bare run next to it), reversed on odd repeats."""
    servers = [w for w in ways if w != BARE]
    order = servers[:1] + [BARE] + servers[1:] if BARE in ways else servers
    return tuple(order if repeat % 2 == 0 else reversed(order))


def bare_target(model: str, drop_cache: bool) -> float:
    """The sdfunc / bare target of `model`: TARGET_BARE_COLD for a non-demo checkpoint read from a cold page
    cache, TARGET_BARE otherwise."""
    return TARGET_BARE_COLD if drop_cache and not model.startswith("demo-") else TARGET_BARE


# ---------------------------------------------------------------------------------------------------------
# data


def ensure_models(data: Path, models: tuple[str, ...], *, real_arch: bool = False) -> dict[str, Path]:
    """The checkpoint of each of `models` under `data`; demo ones that are missing are written (the
    `sdfunc demo-models` of `ensure_data` writes nothing into a folder that already holds a checkpoint), and
    `real-sd15` too with `real_arch` (in a subprocess: ~25 s and 2.1 GB)."""
    ensure_data(data)
    folder = data / "models" / "Stable-diffusion"
    paths = {m: folder / f"{m}.safetensors" for m in models}
    if real_arch and REAL_ARCH_MODEL in paths and not paths[REAL_ARCH_MODEL].exists():
        log.info("writing %s (2.1 GB, SD 1.5's real architecture, random weights)", paths[REAL_ARCH_MODEL])
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from pipelines.builders.realarch import write_real_arch_checkpoint; "
                        "from pipelines.loading import Arch; write_real_arch_checkpoint(Path(sys.argv[1]), Arch.SD1)",
                        str(paths[REAL_ARCH_MODEL])], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    missing = [m for m, p in paths.items() if not p.exists()]
    if missing:
        from pipelines.builders.demo import DEMO_MODELS, write_demo_models

        unknown = [m for m in missing if m not in DEMO_MODELS]
        if unknown:
            raise FileNotFoundError(f"no checkpoint {', '.join(unknown)} under {folder} (and not a demo model)")
        log.info("writing the demo checkpoints %s into %s", ", ".join(missing), folder)
        write_demo_models(folder, kinds=missing)
    return paths


def prepare_start(cfg: BenchConfig, path: Path) -> float | None:
    """Before a start: with `drop_cache`, `path`'s pages dropped; returns the share still resident (None when
    nothing was dropped or it cannot be told)."""
    if not cfg.drop_cache:
        return None
    drop_cache(path)
    return resident_share(path)


# ---------------------------------------------------------------------------------------------------------
# one cold start


def _cold_flag(response) -> bool | None:
    value = response.headers.get("X-Cold-Start")
    return None if value is None else value.lower() == "true"


def _server_env(cfg: BenchConfig, model: str, way: str) -> tuple[tuple[str, str], ...]:
    env = {"SDFUNC_DEFAULT_CHECKPOINT": model}
    if way == "initialize_first":
        env["SDFUNC_WARMUP__CHECKPOINTS"] = json.dumps([model])
        env["SDFUNC_WARMUP__SHAPES"] = json.dumps([f"{cfg.size}x{cfg.size}@{cfg.steps}"])
    env.update(dict(cfg.server_env))
    return tuple(env.items())


def breakdown_of(body: dict[str, Any], received: float, popen_epoch: float) -> dict[str, Any]:
    """The server's cold-start report from a `/healthz` body read at `received` (epoch seconds), plus where its
    start lies relative to `popen_epoch`. Fields the server does not report are None."""
    report = body["cold_start"]
    phases = report.get("phases", {})
    phase_sum = sum(v for k, v in phases.items() if k not in BACKGROUND_PHASES)
    total = report.get("total_seconds")
    return {
        "status": body.get("status"), "complete": report.get("complete"),
        "phases": phases, "total_seconds": total, "phase_sum_s": round(phase_sum, 3),
        "unattributed_s": round(total - phase_sum, 3) if total is not None else None,
        "critical_path_seconds": report.get("critical_path_seconds"),
        "overlapped_seconds": report.get("overlapped_seconds"),
        # The server's start as it sees it (time.time() - uptime) minus the bench's clock at Popen.
        "server_start_minus_popen_s": round(received - body["uptime_seconds"] - popen_epoch, 3),
    }


def _breakdown(session, server: Server, popen_epoch: float) -> dict[str, Any]:
    """The server's cold-start report from `GET /healthz`."""
    r = session.get(f"{server.url}/healthz", timeout=10)
    received = time.time()
    return {"healthz_status": r.status_code, **breakdown_of(r.json(), received, popen_epoch)}


def measure(cfg: BenchConfig, server: Server, session, way: str) -> dict[str, Any]:
    """Start `server`, take it to its first image the way `way` says, then the steady requests."""
    body = payload(cfg.size, cfg.steps)
    cpu_start = cpu_snapshot(None)
    popen_epoch = time.time()
    t0 = server.start()
    pgid = server.proc.pid if server.proc is not None else None  # its own session: process group = its pid
    health_s, status = server.wait_health(session, until=None, timeout=cfg.server_timeout)
    out: dict[str, Any] = {"health_s": round(health_s, 3), "health_status": status}
    log.info("%s: /health answers after %.2f s (%s)", server.name, health_s, status)
    if way == "initialize_first":
        init_ms, r = post(session, server.url, "/initialize", None, cfg.request_timeout,
                         headers=lifecycle_headers(server.port))
        init = r.json()
        out.update(initialize_ms=init_ms, initialize_done_s=round(time.perf_counter() - t0, 3),
                   initialize_cold_flag=_cold_flag(r), initialize_warmed=init.get("warmed"),
                   initialize_cold_start=init.get("cold_start"))
        log.info("%s: /initialize took %.0f ms, done %.2f s after Popen", server.name, init_ms,
                 out["initialize_done_s"])
    first_ms, r = post(session, server.url, TXT2IMG, body, cfg.request_timeout)
    out.update(first_image_s=round(time.perf_counter() - t0, 3), first_request_ms=first_ms,
               first_cold_flag=_cold_flag(r))
    log.info("%s: first image %.2f s after Popen (request %.0f ms, X-Cold-Start %s)", server.name,
             out["first_image_s"], first_ms, r.headers.get("X-Cold-Start"))
    cpu_first = cpu_snapshot(pgid)
    out["breakdown"] = _breakdown(session, server, popen_epoch)
    cpu_steady = cpu_snapshot(pgid)
    steady = [post(session, server.url, TXT2IMG, body, cfg.request_timeout)[0] for _ in range(cfg.steady)]
    cpu_end = cpu_snapshot(pgid)
    out.update(steady_ms=steady, steady_median_ms=median(steady),
               first_over_steady=round(first_ms / statistics.median(steady), 3),
               steady_spread=round(spread(steady), 3),
               others_cpu_share={"to_first_image": others_share(cpu_start, cpu_first),
                                 "steady": others_share(cpu_steady, cpu_end)})
    log.info("%s: steady median %.0f ms; first / steady x%.2f; other processes used %s of the CPU", server.name,
             out["steady_median_ms"], out["first_over_steady"],
             ", ".join(f"{v:.0%} {k}" for k, v in out["others_cpu_share"].items() if v is not None) or "?")
    return out


def measure_bare(cfg: BenchConfig, path: Path, work: Path, name: str, threads: int) -> dict[str, Any]:
    """Run the bare script (bench/harness/bare.py) on `path` in its own process group; `Popen` -> the moment its
    `first_image` line is read. Its stderr goes to `work/bare-<name>.log`."""
    from pipelines.loading import config_dir_for

    arch, config = config_dir_for(path)  # as the server picks them; resolved here so the script stays bare
    argv = [sys.executable, "-m", "bench.harness.bare", "--checkpoint", str(path), "--size", str(cfg.size),
            "--steps", str(cfg.steps), "--seed", str(SEED), "--threads", str(threads), "--config", str(config),
            "--arch", arch.value]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFUNC_")}
    env.update(HOME=str(work), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    log_path = work / f"bare-{name}.log"
    event: dict[str, Any] | None = None
    with open(log_path, "wb") as log_file:
        cpu_start = cpu_snapshot(None)
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                start_new_session=True)
        watchdog = threading.Timer(cfg.server_timeout + cfg.request_timeout, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    parsed = json.loads(line)
                except ValueError:
                    continue
                if isinstance(parsed, dict) and parsed.get("event") == "first_image":
                    first_image_s = time.perf_counter() - t0
                    event = parsed
                    break
            cpu_end = cpu_snapshot(proc.pid)  # before the wait: a zombie still shows its CPU seconds
            rc = proc.wait(timeout=30)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                stop_process_group(proc)
    if event is None or rc != 0:
        raise RuntimeError(f"bare script {name} exited {proc.returncode} without an image:\n"
                           f"{log_path.read_text(errors='replace')[-3000:]}")
    out = {"first_image_s": round(first_image_s, 3), "phases": event.get("phases", {}),
           "device": event.get("device"), "dtype": event.get("dtype"), "png_bytes": event.get("png_bytes"),
           "others_cpu_share": {"to_first_image": others_share(cpu_start, cpu_end)}}
    log.info("%s: first image %.2f s after Popen (%s)", name, out["first_image_s"],
             ", ".join(f"{k} {v:.2f} s" for k, v in out["phases"].items()))
    return out


# ---------------------------------------------------------------------------------------------------------
# the whole run

SUMMARY_KEYS = ("health_s", "initialize_done_s", "initialize_ms", "first_image_s", "first_request_ms",
                "steady_median_ms", "first_over_steady")


def _stat(values: list[float]) -> dict[str, Any] | None:
    return {"median": median(values), "values": values} if values else None


def _optional_median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and all values of each timing over the repeats of one model and server way, and the median
    breakdown (fields the server did not report: None)."""
    out: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        stat = _stat([r[key] for r in runs if r.get(key) is not None])
        if stat:
            out[key] = stat
    breakdowns = [r["breakdown"] for r in runs]
    out["phases_median_s"] = {p: median([b["phases"][p] for b in breakdowns if p in b["phases"]])
                              for p in PHASES if any(p in b["phases"] for b in breakdowns)}
    out["background_median_s"] = {p: median([b["phases"][p] for b in breakdowns if p in b["phases"]])
                                  for p in BACKGROUND_PHASES if any(p in b["phases"] for b in breakdowns)}
    for key in ("total_seconds", "phase_sum_s", "unattributed_s", "server_start_minus_popen_s",
                "critical_path_seconds", "overlapped_seconds"):
        out[f"{key}_median"] = _optional_median([b.get(key) for b in breakdowns])
    out["steady_spreads"] = [r["steady_spread"] for r in runs]
    out["others_cpu_max"] = [max((v for v in r["others_cpu_share"].values() if v is not None), default=None)
                             for r in runs]
    # Other processes' CPU decides; the spread of the steady requests only where /proc could not tell (one slow
    # request among the steady ones is the server's own noise, and the median absorbs it).
    out["disturbed"] = any(x > DISTURBED_SPREAD if others is None else others > OTHERS_MAX
                           for x, others in zip(out["steady_spreads"], out["others_cpu_max"], strict=True))
    out["first_cold_flags"] = [r["first_cold_flag"] for r in runs]
    if any("initialize_cold_flag" in r for r in runs):
        out["initialize_cold_flags"] = [r.get("initialize_cold_flag") for r in runs]
    out["cold_start_complete"] = all(b["complete"] for b in breakdowns)
    out["resident_after_drop"] = [r.get("resident_after_drop") for r in runs]
    return out


def summarize_bare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and all values of the bare script's `Popen` -> first image and its own phases over the repeats;
    `rest_s` = client clock - sum of phases (interpreter start, reading the line)."""
    phase_sums = [sum(r["phases"].get(p, 0.0) for p in BARE_PHASES) for r in runs]
    others = [r["others_cpu_share"]["to_first_image"] for r in runs]
    return {
        "first_image_s": _stat([r["first_image_s"] for r in runs]),
        "phases_median_s": {p: median([r["phases"][p] for r in runs if p in r["phases"]])
                            for p in BARE_PHASES if any(p in r["phases"] for r in runs)},
        "phase_sum_s_median": median(phase_sums) if runs else None,
        "rest_s_median": median([r["first_image_s"] - s for r, s in zip(runs, phase_sums, strict=True)])
        if runs else None,
        "others_cpu_max": others,
        "disturbed": any(x is not None and x > OTHERS_MAX for x in others),
        "resident_after_drop": [r.get("resident_after_drop") for r in runs],
    }


def bare_pairs(sdfunc_runs: list[dict[str, Any]], bare_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """sdfunc (no initialize) against bare, `Popen` -> first image, paired by repeat: one
    `{repeat, sdfunc_s, bare_s, ratio}` per repeat both measured, in repeat order."""
    bare = {r["repeat"]: r["first_image_s"] for r in bare_runs}
    return [{"repeat": r["repeat"], "sdfunc_s": r["first_image_s"], "bare_s": bare[r["repeat"]],
             "ratio": round(r["first_image_s"] / bare[r["repeat"]], 3)}
            for r in sorted(sdfunc_runs, key=lambda r: r["repeat"]) if r["repeat"] in bare]


def bare_comparison(model: str, sdfunc_runs: list[dict[str, Any]], bare_runs: list[dict[str, Any]],
                    drop_cache: bool) -> dict[str, Any] | None:
    """sdfunc / bare of one model: the median of the paired ratios, the pairs, the target and whether it is met;
    None without a pair."""
    pairs = bare_pairs(sdfunc_runs, bare_runs)
    if not pairs:
        return None
    ratio = median([p["ratio"] for p in pairs])
    target = bare_target(model, drop_cache)
    return {"median": ratio, "pairs": pairs, "target_max": target, "pass": ratio <= target}


def overall_pass(models: dict[str, Any]) -> bool | None:
    """Every target that was measured is met; None when none was."""
    checks = [e.get("target_pass") for e in models.values()]
    checks += [e["sdfunc_over_bare"]["pass"] for e in models.values() if e.get("sdfunc_over_bare")]
    checks = [c for c in checks if c is not None]
    return all(checks) if checks else None


def _run_starts(cfg: BenchConfig, models: tuple[str, ...], paths: dict[str, Path], data: Path, work: Path,
                threads: int, runs: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """Every repeat, model and way: one fresh process each, its measurements appended to `runs`."""
    import requests

    for rep in range(cfg.repeats):
        for model in models:
            for way in way_order(cfg.ways, rep):
                name = f"{model}-{way}-{rep + 1}"
                resident = prepare_start(cfg, paths[model])
                if resident is not None:
                    log.info("%s: page cache dropped, %.1f %% of %s still resident", name, resident * 100,
                             paths[model].name)
                if way == BARE:
                    out = measure_bare(cfg, paths[model], work, name, threads)
                else:
                    # One session per server, closed before the server stops: gunicorn's graceful stop
                    # otherwise waits for the idle keep-alive connection (seconds per server).
                    with running_server(data, work, warmup=False, threads=threads, name=name,
                                        extra_env=_server_env(cfg, model, way)) as server, \
                            requests.Session() as session:
                        out = measure(cfg, server, session, way)
                runs[model][way].append({"repeat": rep + 1, "resident_after_drop": resident, **out})


def run(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Every model, way and repeat on a fresh process. Returns the JSON-able result."""
    import torch

    default_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads
    models = models_of(cfg)
    started = time.perf_counter()
    result: dict[str, Any] = {
        **result_header("cold_start", command, cfg, {"sampler": SAMPLER, "seed": SEED, "cfg_scale": CFG_SCALE,
                        "prompt": PROMPT, "threads": threads, "warmup_shape": f"{cfg.size}x{cfg.size}@{cfg.steps}",
                        "measured_models": list(models)}, threads, default_threads),
        "target": {"first_over_steady_max": TARGET_RATIO, "way": "initialize_first",
                   "sdfunc_over_bare_max": {m: bare_target(m, cfg.drop_cache) for m in models}},
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {w: [] for w in cfg.ways} for m in models}
    with tempfile.TemporaryDirectory(prefix="sdfunc-bench-") as tmp:
        work = Path(tmp)
        data = Path(cfg.data).resolve() if cfg.data else work / "data"
        paths = ensure_models(data, models, real_arch=cfg.real_arch)
        with contextlib.ExitStack() as stack:
            if cfg.read_mb_s:
                result["read_throttle"] = stack.enter_context(read_throttle(next(iter(paths.values())), cfg.read_mb_s))
                log.info("%s", result["read_throttle"])
            _run_starts(cfg, models, paths, data, work, threads, runs)
    entries: dict[str, Any] = {}
    for model, by_way in runs.items():
        entry: dict[str, Any] = {way: {"summary": summarize_bare(rs) if way == BARE else summarize(rs), "runs": rs}
                                 for way, rs in by_way.items()}
        entry["target_pass"] = (entry["initialize_first"]["summary"]["first_over_steady"]["median"] <= TARGET_RATIO
                                if "initialize_first" in entry else None)
        if BARE in entry and "no_initialize" in entry:
            entry["sdfunc_over_bare"] = bare_comparison(model, entry["no_initialize"]["runs"], entry[BARE]["runs"],
                                                        cfg.drop_cache)
        entries[model] = entry
        for way in (w for w in WAYS if w in entry):
            flags = entry[way]["summary"]["first_cold_flags"]
            expected = way == "no_initialize"  # after /initialize the cold start is already over
            if any(f is not expected for f in flags):
                log.warning("%s %s: first txt2img X-Cold-Start %s, expected %s", model, way, flags, expected)
    result["models"] = entries
    result["target"]["pass"] = overall_pass(entries)
    result["disturbed"] = any(e[w]["summary"]["disturbed"] for e in entries.values() for w in cfg.ways)
    finish(result, time.perf_counter() - started)
    return result


# ---------------------------------------------------------------------------------------------------------
# report


def _cell(stat: dict[str, Any] | None, unit: str = "", digits: int = 2) -> str:
    """`median (v1, v2, ...)`, or `-` when not measured."""
    if not stat:
        return "-"
    values = stat["values"]
    text = f"{stat['median']:.{digits}f}{unit}"
    return text if len(values) == 1 else text + f" ({', '.join(f'{v:.{digits}f}' for v in values)})"


def _flags(values: list[bool | None]) -> str:
    return ", ".join("missing" if v is None else str(v).lower() for v in values)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _share(value: float | None) -> str:
    return "?" if value is None else f"{value:.0%}"


def _breakdown_row(model: str, way: str, s: dict[str, Any]) -> list[str]:
    """One row of the server's own breakdown: phase medians, the background prefetch, the foreground sum, the
    server's critical path and overlap, the total, the rest, the start offset and the client's clock."""
    phases = s["phases_median_s"]
    client = s.get("first_image_s" if way == "no_initialize" else "initialize_done_s")
    return [model, WAY_LABELS[way], *(_seconds(phases.get(p)) for p in PHASES),
            _seconds(s.get("background_median_s", {}).get("prefetch")), _seconds(s["phase_sum_s_median"]),
            _seconds(s.get("critical_path_seconds_median")), _seconds(s.get("overlapped_seconds_median")),
            _seconds(s["total_seconds_median"]), _seconds(s["unattributed_s_median"]),
            _seconds(s["server_start_minus_popen_s_median"]), _seconds(client["median"] if client else None)]


def _way_row(way: str, s: dict[str, Any]) -> list[str]:
    """One row of a model's table; the bare script has no /health, /initialize or steady requests."""
    if way == BARE:
        return [WAY_LABELS[way], "-", "-", _cell(s.get("first_image_s"), " s"), "-", "-", "-", "-", "-"]
    return [WAY_LABELS[way], _cell(s.get("health_s"), " s"), _cell(s.get("initialize_done_s"), " s"),
            _cell(s.get("first_image_s"), " s"), _cell(s.get("initialize_ms"), "", 0),
            _cell(s.get("first_request_ms"), "", 0), _cell(s.get("steady_median_ms"), "", 0),
            _cell(s.get("first_over_steady")), _flags(s["first_cold_flags"])]


def _page_cache_line(result: dict[str, Any], ways: list[str]) -> str:
    """What the page cache held at each start."""
    throttle = f" Reads throttled: {result['read_throttle']} (a NAS-like mount)." if result.get("read_throttle") else ""
    if not result["config"].get("drop_cache"):
        return "Page cache warm (the checkpoint was just written or read): a cold start is a new process." + throttle
    resident = [x for e in result["models"].values() for w in ways for x in e[w]["summary"]["resident_after_drop"]
                if x is not None]
    after = f"; still resident after the drop: at most {max(resident):.1%}" if resident else ""
    return ("Page cache dropped (`--drop-cache`): before every start of every way, the checkpoint's pages were "
            f"evicted (`posix_fadvise DONTNEED`){after}; libraries and configs stay cached." + throttle)


def markdown(result: dict[str, Any]) -> str:
    """The tables RESULTS.md carries, from a result dict."""
    m, c = result["machine"], result["config"]
    ways = list(c.get("ways", WAYS))
    server_ways = [w for w in ways if w != BARE]
    lines = [
        machine_line(result, f"server torch threads {m['torch_threads']}"),
        "",
        f"Command: `{result['command']}`",
        "",
        f"Request: {c['size']}x{c['size']}, {c['steps']} steps, sampler {c['sampler']}, CFG {c['cfg_scale']}, seed "
        f"{c['seed']}; warm-up shape `{c['warmup_shape']}`. Fresh process per cold start, {c['repeats']} per model "
        f"and way; {c['steady']} steady requests after the first. Cells: median (each repeat). "
        + _page_cache_line(result, ways)
        + (" Server environment: " + env_pairs(c["server_env"]) + "." if c.get("server_env") else ""),
    ]
    target = result["target"]
    for model, entry in result["models"].items():
        summaries = [(way, entry[way]["summary"]) for way in ways]
        lines += [
            "",
            f"**{model}**",
            "",
            *table(["way", "Popen -> /health", "Popen -> /initialize done", "Popen -> first image", "/initialize ms",
                    "first request ms", "steady median ms", "first / steady", "X-Cold-Start (first txt2img)"],
                   (_way_row(way, s) for way, s in summaries), "lrrrrrrrl"),
        ]
        if entry.get("target_pass") is not None:
            ratio = entry["initialize_first"]["summary"]["first_over_steady"]["median"]
            lines += ["", f"Target: first request after /initialize <= x{target['first_over_steady_max']:.2f} the "
                          f"steady median: {verdict(entry['target_pass'])} (x{ratio:.2f})."]
        bare = entry.get("sdfunc_over_bare")
        if bare:
            pairs = ", ".join(f"x{p['ratio']:.2f} ({p['sdfunc_s']:.2f} / {p['bare_s']:.2f} s)" for p in bare["pairs"])
            lines += ["", f"Target: sdfunc (no initialize) / bare script, Popen -> first image, paired by repeat, "
                          f"<= x{bare['target_max']:.2f}: {verdict(bare['pass'])} (x{bare['median']:.2f}; each "
                          f"repeat {pairs})."]
        spreads = "; ".join(f"{WAY_LABELS[w]} " + ", ".join(f"x{x:.2f}" for x in entry[w]["summary"]["steady_spreads"])
                            for w in server_ways)
        others = "; ".join(f"{WAY_LABELS[w]} " + ", ".join(_share(x) for x in entry[w]["summary"]["others_cpu_max"])
                           for w in ways)
        disturbed = any(entry[w]["summary"]["disturbed"] for w in ways)
        lines += ["",
                  "Noise, per process: "
                  + (f"slowest / fastest steady request {spreads}; " if server_ways else "")
                  + f"CPU used by other processes (largest window) {others}"
                  + (f" - DISTURBED (other processes above {OTHERS_MAX:.0%}, or where that is unknown a spread "
                     f"above x{DISTURBED_SPREAD:.2f}: the machine was busy; rerun)." if disturbed else ".")]
    if server_ways:
        columns = [*PHASES, "prefetch", "sum", "critical path", "overlapped", "total", "unexplained", "start offset",
                   "client"]
        lines += [
            "",
            "Server's own breakdown (`GET /healthz` -> `cold_start`, seconds, median over repeats; `-`: not "
            "reported). `prefetch` runs in the background, beside the others; `sum` = the foreground phases; "
            "`critical path` and `overlapped` = the server's own `critical_path_seconds` (foreground) and "
            "`overlapped_seconds` (background time hidden behind it); `unexplained` = total - sum; `start offset` = "
            "the server's start (now - `uptime_seconds`) minus the bench's clock at `Popen`; `client` = Popen -> "
            "first image (no initialize) or Popen -> /initialize done:",
            "",
            *table(["model", "way", *columns],
                   (_breakdown_row(model, way, entry[way]["summary"]) for model, entry in result["models"].items()
                    for way in server_ways),
                   "ll" + "r" * len(columns)),
        ]
    if BARE in ways:
        lines += [
            "",
            "Bare script's own clock (seconds, median over repeats): `imports` = torch, diffusers, transformers and "
            "the pipeline classes; `load` = tokenizer, `from_single_file`, move to the device; `generate` = the "
            "call and the PNG; `rest` = Popen -> first image - sum (interpreter start, reading the line):",
            "",
            *table(["model", *BARE_PHASES, "sum", "rest", "Popen -> first image"],
                   ([model, *(_seconds(s["phases_median_s"].get(p)) for p in BARE_PHASES),
                     _seconds(s["phase_sum_s_median"]), _seconds(s["rest_s_median"]),
                     _seconds(s["first_image_s"]["median"] if s["first_image_s"] else None)]
                    for model, entry in result["models"].items() for s in [entry[BARE]["summary"]]),
                   "l" + "r" * (len(BARE_PHASES) + 3)),
        ]
    lines += ["", f"Overall: {verdict(target['pass'])}"
              + (" - but the run was DISTURBED (see the noise lines); rerun on a quiet machine." if result["disturbed"]
                 else ".")]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None, Path | None, str]:
    """(config, --out, --markdown, --log-level) from the command line."""
    p = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path,
                   help="data root (missing demo checkpoints are written there; default: a temp dir)")
    p.add_argument("--models", default=",".join(BenchConfig.models), help="checkpoints (default %(default)s)")
    p.add_argument("--size", type=int, default=BenchConfig.size, help="square request size (default %(default)s)")
    p.add_argument("--steps", type=int, default=BenchConfig.steps, help="sampling steps (default %(default)s)")
    p.add_argument("--repeats", type=int, default=BenchConfig.repeats,
                   help="fresh servers per model and way (default %(default)s)")
    p.add_argument("--steady", type=int, default=BenchConfig.steady,
                   help="identical requests after the first one (default %(default)s)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the servers (default: torch's default)")
    p.add_argument("--server-timeout", type=float, default=BenchConfig.server_timeout,
                   help="seconds a server may take to answer /health (default %(default)s)")
    p.add_argument("--ways", default=",".join(BenchConfig.ways),
                   help=f"ways to start, of {','.join(ALL_WAYS)} (default %(default)s; `bare` is the bare diffusers "
                        "script, compared with no_initialize)")
    p.add_argument("--drop-cache", action="store_true",
                   help="drop the checkpoint's pages from the page cache before every start (posix_fadvise)")
    p.add_argument("--real-arch", action="store_true",
                   help=f"also measure {REAL_ARCH_MODEL} (2.1 GB, SD 1.5's real architecture, random weights; "
                        "written into the data root when missing, ~25 s)")
    p.add_argument("--read-mb-s", type=float,
                   help="cap reads from the checkpoints' disk at this many MB/s for every process started (a "
                        "NAS-like mount; root and a cgroup blkio/io controller needed; use with --drop-cache)")
    add_output_arguments(p)
    a = p.parse_args(argv)
    if a.read_mb_s is not None and a.read_mb_s <= 0:
        p.error("--read-mb-s: a positive rate")
    models = tuple(s.strip() for s in a.models.split(",") if s.strip())
    if not models:
        p.error("--models: at least one checkpoint")
    ways = tuple(s.strip() for s in a.ways.split(",") if s.strip())
    if not ways or len(set(ways)) != len(ways) or not set(ways) <= set(ALL_WAYS):
        p.error(f"--ways: distinct items of {','.join(ALL_WAYS)}")
    if a.size < 64 or a.size % 8:
        p.error("--size: a multiple of 8, at least 64")
    if a.repeats < 1 or a.steady < 1 or a.steps < 1 or (a.threads is not None and a.threads < 1):
        p.error("--repeats, --steady, --steps and --threads must be at least 1")
    server_env = parse_server_env(p, a.server_env)
    cfg = BenchConfig(data=a.data, models=models, size=a.size, steps=a.steps, repeats=a.repeats, steady=a.steady,
                      threads=a.threads, server_timeout=a.server_timeout, server_env=server_env, ways=ways,
                      drop_cache=a.drop_cache, real_arch=a.real_arch, read_mb_s=a.read_mb_s)
    return cfg, a.out, a.markdown, a.log_level


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg, out, md_path, log_level = parse_args(args)
    run_benchmark("bench.cold_start", args, lambda command: run(cfg, command), markdown, out=out,
                  markdown_path=md_path, log_level=log_level)
    return 0  # a missed target is a result, not a failure of the benchmark


if __name__ == "__main__":
    sys.exit(main())
