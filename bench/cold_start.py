"""Cold start: how long a fresh function instance takes to its first image, and whether FC's initializer
(`POST /initialize`) makes the first real request as fast as the ones after it.

    python -m bench.cold_start [--data DIR] [--models demo-sd15,demo-sdxl] [--size 256] [--steps 8]
                               [--repeats 2] [--steady 8] [--threads T] [--server-env KEY=VALUE]
                               [--out FILE.json] [--markdown FILE]

For each checkpoint (default the demo SD 1.5 and SDXL ones, random weights) and each repeat, two fresh
servers (`python -m handler.cli serve`, gunicorn, on a free 127.0.0.1 port, warm-up at worker start off):

* `no initialize`: `SDFUNC_DEFAULT_CHECKPOINT=<model>`; `Popen` -> `GET /health` answers -> the first
  `POST /sdapi/v1/txt2img` (which loads the model). Timed: `Popen` -> /health, `Popen` -> first image; the
  first response must say `X-Cold-Start: true`.
* `initialize first` (what FC does): also `SDFUNC_WARMUP__CHECKPOINTS=["<model>"]` and
  `SDFUNC_WARMUP__SHAPES=["<size>x<size>@<steps>"]` (the request's shape); `Popen` -> /health -> `POST
  /initialize` -> the first txt2img. Timed: `Popen` -> /initialize done, `Popen` -> first image, the
  /initialize call and the first request.

On both, `--steady` identical requests (same payload, fixed seed) follow the first; first request /
median(steady) is the price of being new. Target: at most 1.10 after /initialize (the first request pays
nothing the warm-up could have paid); the same ratio without /initialize is shown for contrast. Each server's
own breakdown (`GET /healthz` -> `cold_start`: process_to_app, imports, device_init, read_weights, to_device,
first_generation, total_seconds) is reported next to the client's clock, with what the phases leave
unexplained and how far the server's idea of its start is from `Popen`.

Each cold start is repeated `--repeats` times with a fresh server; the order of the two ways alternates
between repeats. Medians and all values are reported. A server's numbers are marked DISTURBED when other
processes used more than 10 % of the machine's CPU (from /proc) while it started or served (where /proc is
missing: when its steady requests spread by more than x1.25): on CPU a competing process slows generation
many times over. The page cache is warm (the checkpoint was just written or read, torch was just imported by
this process), so "cold" means a new process, not a cold disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
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
from bench.harness.report import env_pairs, finish, machine_line, result_header, table
from bench.harness.server import (
    CFG_SCALE,
    PROMPT,
    SAMPLER,
    SEED,
    TXT2IMG,
    Server,
    ensure_data,
    payload,
    post,
    running_server,
)
from bench.harness.stats import DISTURBED_SPREAD, median, spread

log = logging.getLogger("bench.cold_start")

MODELS = ("demo-sd15", "demo-sdxl")
WAYS = ("no_initialize", "initialize_first")
WAY_LABELS = {"no_initialize": "no initialize", "initialize_first": "initialize first"}
PHASES = ("process_to_app", "imports", "device_init", "read_weights", "to_device", "first_generation")
TARGET_RATIO = 1.10  # first request after /initialize over the steady median


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


# ---------------------------------------------------------------------------------------------------------
# data


def ensure_models(data: Path, models: tuple[str, ...]) -> dict[str, Path]:
    """The checkpoint of each of `models` under `data`; demo ones that are missing are written (the
    `sdfunc demo-models` of `ensure_data` writes nothing into a folder that already holds a checkpoint)."""
    ensure_data(data)
    folder = data / "models" / "Stable-diffusion"
    paths = {m: folder / f"{m}.safetensors" for m in models}
    missing = [m for m, p in paths.items() if not p.exists()]
    if missing:
        from pipelines.builders.demo import DEMO_MODELS, write_demo_models

        unknown = [m for m in missing if m not in DEMO_MODELS]
        if unknown:
            raise FileNotFoundError(f"no checkpoint {', '.join(unknown)} under {folder} (and not a demo model)")
        log.info("writing the demo checkpoints %s into %s", ", ".join(missing), folder)
        write_demo_models(folder, kinds=missing)
    return paths


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


def _breakdown(session, server: Server, popen_epoch: float) -> dict[str, Any]:
    """The server's cold-start report from `GET /healthz`, plus where its start lies relative to `Popen`."""
    r = session.get(f"{server.url}/healthz", timeout=10)
    received = time.time()
    body = r.json()
    report = body["cold_start"]
    phases = report.get("phases", {})
    phase_sum = sum(phases.values())
    total = report.get("total_seconds")
    return {
        "healthz_status": r.status_code, "status": body.get("status"), "complete": report.get("complete"),
        "phases": phases, "total_seconds": total, "phase_sum_s": round(phase_sum, 3),
        "unattributed_s": round(total - phase_sum, 3) if total is not None else None,
        # The server's start as it sees it (time.time() - uptime) minus the bench's clock at Popen.
        "server_start_minus_popen_s": round(received - body["uptime_seconds"] - popen_epoch, 3),
    }


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
        init_ms, r = post(session, server.url, "/initialize", None, cfg.request_timeout)
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


# ---------------------------------------------------------------------------------------------------------
# the whole run

SUMMARY_KEYS = ("health_s", "initialize_done_s", "initialize_ms", "first_image_s", "first_request_ms",
                "steady_median_ms", "first_over_steady")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and all values of each timing over the repeats of one model and way, and the median breakdown."""
    out: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = {"median": median(values), "values": values}
    breakdowns = [r["breakdown"] for r in runs]
    out["phases_median_s"] = {p: median([b["phases"][p] for b in breakdowns if p in b["phases"]])
                              for p in PHASES if any(p in b["phases"] for b in breakdowns)}
    for key in ("total_seconds", "phase_sum_s", "unattributed_s", "server_start_minus_popen_s"):
        values = [b[key] for b in breakdowns if b.get(key) is not None]
        out[f"{key}_median"] = median(values) if values else None
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
    return out


def run(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Every model, way and repeat on a fresh server. Returns the JSON-able result."""
    import requests
    import torch

    default_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads
    started = time.perf_counter()
    result: dict[str, Any] = {
        **result_header("cold_start", command, cfg, {"sampler": SAMPLER, "seed": SEED, "cfg_scale": CFG_SCALE,
                        "prompt": PROMPT, "threads": threads, "warmup_shape": f"{cfg.size}x{cfg.size}@{cfg.steps}"},
                        threads, default_threads),
        "target": {"first_over_steady_max": TARGET_RATIO, "way": "initialize_first"},
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {w: [] for w in WAYS} for m in cfg.models}
    with tempfile.TemporaryDirectory(prefix="sdfunc-bench-") as tmp:
        work = Path(tmp)
        data = Path(cfg.data).resolve() if cfg.data else work / "data"
        ensure_models(data, cfg.models)
        for rep in range(cfg.repeats):
            order = WAYS if rep % 2 == 0 else tuple(reversed(WAYS))
            for model in cfg.models:
                for way in order:
                    name = f"{model}-{way}-{rep + 1}"
                    # One session per server, closed before the server stops: gunicorn's graceful stop
                    # otherwise waits for the idle keep-alive connection (seconds per server).
                    with running_server(data, work, warmup=False, threads=threads, name=name,
                                        extra_env=_server_env(cfg, model, way)) as server, \
                            requests.Session() as session:
                        runs[model][way].append({"repeat": rep + 1, **measure(cfg, server, session, way)})
    models: dict[str, Any] = {}
    for model, by_way in runs.items():
        entry: dict[str, Any] = {way: {"summary": summarize(rs), "runs": rs} for way, rs in by_way.items()}
        ratio = entry["initialize_first"]["summary"]["first_over_steady"]["median"]
        entry["target_pass"] = ratio <= TARGET_RATIO
        models[model] = entry
        for way in WAYS:
            flags = entry[way]["summary"]["first_cold_flags"]
            expected = way == "no_initialize"  # after /initialize the cold start is already over
            if any(f is not expected for f in flags):
                log.warning("%s %s: first txt2img X-Cold-Start %s, expected %s", model, way, flags, expected)
    result["models"] = models
    result["target"]["pass"] = all(e["target_pass"] for e in models.values())
    result["disturbed"] = any(e[w]["summary"]["disturbed"] for e in models.values() for w in WAYS)
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


def _breakdown_row(model: str, way: str, s: dict[str, Any]) -> list[str]:
    """One row of the server's own breakdown: phase medians, their sum, the total, the rest, the start offset
    and the client's clock."""
    phases = s["phases_median_s"]
    client = s.get("first_image_s" if way == "no_initialize" else "initialize_done_s")
    return [model, WAY_LABELS[way], *(_seconds(phases.get(p)) for p in PHASES), _seconds(s["phase_sum_s_median"]),
            _seconds(s["total_seconds_median"]), _seconds(s["unattributed_s_median"]),
            _seconds(s["server_start_minus_popen_s_median"]), _seconds(client["median"] if client else None)]


def markdown(result: dict[str, Any]) -> str:
    """The tables RESULTS.md carries, from a result dict."""
    m, c = result["machine"], result["config"]
    lines = [
        machine_line(result, f"server torch threads {m['torch_threads']}"),
        "",
        f"Command: `{result['command']}`",
        "",
        f"Request: {c['size']}x{c['size']}, {c['steps']} steps, sampler {c['sampler']}, CFG {c['cfg_scale']}, seed "
        f"{c['seed']}; warm-up shape `{c['warmup_shape']}`. Fresh server per cold start, {c['repeats']} per model "
        f"and way; {c['steady']} steady requests after the first. Cells: median (each repeat)."
        + (" Server environment: " + env_pairs(c["server_env"]) + "." if c.get("server_env") else ""),
    ]
    target = result["target"]
    for model, entry in result["models"].items():
        summaries = [(way, entry[way]["summary"]) for way in WAYS]
        lines += [
            "",
            f"**{model}**",
            "",
            *table(["way", "Popen -> /health", "Popen -> /initialize done", "Popen -> first image", "/initialize ms",
                    "first request ms", "steady median ms", "first / steady", "X-Cold-Start (first txt2img)"],
                   ([WAY_LABELS[way], _cell(s.get("health_s"), " s"), _cell(s.get("initialize_done_s"), " s"),
                     _cell(s.get("first_image_s"), " s"), _cell(s.get("initialize_ms"), "", 0),
                     _cell(s.get("first_request_ms"), "", 0), _cell(s.get("steady_median_ms"), "", 0),
                     _cell(s.get("first_over_steady")), _flags(s["first_cold_flags"])] for way, s in summaries),
                   "lrrrrrrrl"),
        ]
        ratio = entry["initialize_first"]["summary"]["first_over_steady"]["median"]
        spreads = "; ".join(f"{WAY_LABELS[w]} " + ", ".join(f"x{x:.2f}" for x in entry[w]["summary"]["steady_spreads"])
                            for w in WAYS)
        others = "; ".join(f"{WAY_LABELS[w]} " + ", ".join("?" if x is None else f"{x:.0%}"
                                                           for x in entry[w]["summary"]["others_cpu_max"])
                           for w in WAYS)
        disturbed = any(entry[w]["summary"]["disturbed"] for w in WAYS)
        lines += ["", f"Target: first request after /initialize <= x{target['first_over_steady_max']:.2f} the "
                      f"steady median: {'PASS' if entry['target_pass'] else 'FAIL'} (x{ratio:.2f}).",
                  "",
                  f"Noise, per server: slowest / fastest steady request {spreads}; CPU used by other processes "
                  f"(largest window) {others}"
                  + (f" - DISTURBED (other processes above {OTHERS_MAX:.0%}, or where that is unknown a spread "
                     f"above x{DISTURBED_SPREAD:.2f}: the machine was busy; rerun)." if disturbed else ".")]
    lines += [
        "",
        "Server's own breakdown (`GET /healthz` -> `cold_start`, seconds, median over repeats). `unexplained` = "
        "total - sum of phases; `start offset` = the server's start (now - `uptime_seconds`) minus the bench's "
        "clock at `Popen`; `client` = Popen -> first image (no initialize) or Popen -> /initialize done:",
        "",
        *table(["model", "way", *PHASES, "sum", "total", "unexplained", "start offset", "client"],
               (_breakdown_row(model, way, entry[way]["summary"]) for model, entry in result["models"].items()
                for way in WAYS),
               "ll" + "r" * (len(PHASES) + 5)),
    ]
    lines += ["", f"Overall: {'PASS' if target['pass'] else 'FAIL'}"
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
    add_output_arguments(p)
    a = p.parse_args(argv)
    models = tuple(s.strip() for s in a.models.split(",") if s.strip())
    if not models:
        p.error("--models: at least one checkpoint")
    if a.size < 64 or a.size % 8:
        p.error("--size: a multiple of 8, at least 64")
    if a.repeats < 1 or a.steady < 1 or a.steps < 1 or (a.threads is not None and a.threads < 1):
        p.error("--repeats, --steady, --steps and --threads must be at least 1")
    server_env = parse_server_env(p, a.server_env)
    cfg = BenchConfig(data=a.data, models=models, size=a.size, steps=a.steps, repeats=a.repeats, steady=a.steady,
                      threads=a.threads, server_timeout=a.server_timeout, server_env=server_env)
    return cfg, a.out, a.markdown, a.log_level


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg, out, md_path, log_level = parse_args(args)
    run_benchmark("bench.cold_start", args, lambda command: run(cfg, command), markdown, out=out,
                  markdown_path=md_path, log_level=log_level)
    return 0  # a missed target is a result, not a failure of the benchmark


if __name__ == "__main__":
    sys.exit(main())
