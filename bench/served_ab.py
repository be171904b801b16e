"""Served A/B: is this checkout's served path slower than another checkout's? For refactors that must not
change speed.

    python -m bench.served_ab --baseline /path/to/other/checkout [--baseline-python PY] [--rounds 40]
                              [--sizes 64,256] [--steps 8] [--out FILE.json] [--markdown FILE.md]

Two real servers (`python -m handler.cli serve`, gunicorn) run side by side on loopback: the baseline from the
other checkout (its own interpreter, by default `<baseline>/.venv/bin/python`) and the candidate from this one,
each on its own copy of the demo checkpoints, warm-up on, request log off, the same torch threads. The same
txt2img (`bench.harness.server.payload`) is then sent to one and then the other, alternating which goes first,
`--rounds` times per size: every candidate call has a baseline call next to it in time, so the drift of a noisy
machine cancels out in the paired ratio (candidate / baseline of neighbouring calls), which is the figure to
read. Only one server works at a time: the idle one costs no CPU.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.harness.cli import add_output_arguments, parse_server_env, run_benchmark
from bench.harness.report import finish, machine_line, result_header, table
from bench.harness.server import REPO, Server, ensure_data, payload, post_txt2img
from bench.harness.stats import median, percentile

log = logging.getLogger("bench.served_ab")

WAYS = ("baseline", "candidate")
READY_TIMEOUT = 600.0  # seconds a server may take to load and warm up


@dataclass
class BenchConfig:
    baseline: Path
    baseline_python: str | None = None  # default <baseline>/.venv/bin/python
    rounds: int = 40  # alternating calls per server and size
    sizes: tuple[int, ...] = (64, 256)
    steps: int = 8
    threads: int = 0  # torch threads in both servers (0: torch's default)
    server_env: tuple[tuple[str, str], ...] = ()  # extra environment for both servers


def run(cfg: BenchConfig, command: str) -> dict[str, Any]:
    """Both servers up, the alternating calls, both servers stopped; the result with its rows and samples."""
    import torch

    threads = cfg.threads or torch.get_num_threads()
    baseline = cfg.baseline.resolve()
    python = cfg.baseline_python or str(baseline / ".venv" / "bin" / "python")
    sizes = list(cfg.sizes)
    result = result_header("served_ab", command, cfg, {"candidate": str(REPO), "baseline_python": python},
                           threads, torch.get_num_threads())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdfunc-ab-") as tmp:
        root = Path(tmp)
        demo = root / "demo"
        ensure_data(demo)
        shapes = "[" + ",".join(f'"{s}x{s}@{cfg.steps}"' for s in sizes) + "]"
        env = (("SDFUNC_REQUEST_LOG", "false"), ("SDFUNC_WARMUP__SHAPES", shapes), *cfg.server_env)
        servers: list[Server] = []
        urls: dict[str, str] = {}
        try:
            with requests.Session() as session:
                for way, exe, checkout in (("baseline", python, baseline), ("candidate", sys.executable, REPO)):
                    data, work = root / f"data-{way}", root / f"work-{way}"
                    shutil.copytree(demo / "models", data / "models")
                    work.mkdir()
                    server = Server(data, work, warmup=True, threads=threads, name=way, extra_env=env,
                                    checkout=checkout, python=exe)
                    servers.append(server)
                    server.start()
                    server.wait_health(session, until=("READY",), timeout=READY_TIMEOUT)
                    urls[way] = server.url
                samples: dict[str, dict[int, list[float]]] = {w: {s: [] for s in sizes} for w in WAYS}
                for size in sizes:  # one untimed call each: the first request of a size pays for lazy work
                    for way in WAYS:
                        post_txt2img(session, urls[way], payload(size, cfg.steps))
                for i in range(cfg.rounds):
                    for size in sizes:
                        for way in WAYS if i % 2 == 0 else WAYS[::-1]:
                            elapsed_ms, _ = post_txt2img(session, urls[way], payload(size, cfg.steps))
                            samples[way][size].append(elapsed_ms)
                    if (i + 1) % 10 == 0:
                        log.info("round %d of %d", i + 1, cfg.rounds)
        finally:
            for server in servers:
                server.stop()
    rows = []
    for size in sizes:
        base, cand = samples["baseline"][size], samples["candidate"][size]
        paired = [c / b for b, c in zip(base, cand)]
        rows.append({"size": size, "baseline_ms": median(base), "candidate_ms": median(cand),
                     "ratio_of_medians": round(median(cand) / median(base), 3),
                     "paired_ratio": round(median(paired), 3),
                     "paired_ratio_p25": round(percentile(paired, 25), 3),
                     "paired_ratio_p75": round(percentile(paired, 75), 3)})
    result["rows"] = rows
    result["samples_ms"] = {w: {str(s): samples[w][s] for s in sizes} for w in WAYS}
    finish(result, time.perf_counter() - started)
    return result


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [machine_line(result, f"torch threads {result['machine']['torch_threads']} in both servers"), "",
             f"Command: `{result['command']}`", "",
             f"Baseline `{c['baseline']}` against candidate `{c['candidate']}`; {c['rounds']} alternating calls "
             f"per server and size, {c['steps']} steps, medians. The paired ratio is the median of candidate / "
             "baseline over neighbouring calls (p25-p75 beside it).", ""]
    lines += table(["size", "baseline ms", "candidate ms", "candidate / baseline (medians)", "paired ratio",
                    "paired p25-p75"],
                   [[f"{r['size']}x{r['size']}", f"{r['baseline_ms']:.1f}", f"{r['candidate_ms']:.1f}",
                     f"{r['ratio_of_medians']:.3f}", f"{r['paired_ratio']:.3f}",
                     f"{r['paired_ratio_p25']:.3f}-{r['paired_ratio_p75']:.3f}"] for r in result["rows"]])
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench.served_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="the other checkout (its handler/ and pipelines/ are served)")
    p.add_argument("--baseline-python", default=None,
                   help="interpreter for the baseline (default <baseline>/.venv/bin/python)")
    p.add_argument("--rounds", type=int, default=40, help="alternating calls per server and size (default 40)")
    p.add_argument("--sizes", default="64,256", help="square sizes (default 64,256)")
    p.add_argument("--steps", type=int, default=8, help="sampling steps (default 8)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in both servers (default: torch's)")
    add_output_arguments(p)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.steps < 1 or not all(s.strip().isdigit() and int(s) >= 8 for s in a.sizes.split(",")):
        p.error("--rounds and --steps must be positive and --sizes comma-separated sizes of at least 8")
    if not Path(a.baseline).is_dir():
        p.error(f"--baseline {a.baseline}: not a folder")
    cfg = BenchConfig(baseline=Path(a.baseline), baseline_python=a.baseline_python, rounds=a.rounds,
                      sizes=tuple(int(s) for s in a.sizes.split(",")), steps=a.steps, threads=a.threads,
                      server_env=parse_server_env(p, a.server_env))
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, a = parse_args(argv)
    run_benchmark("bench.served_ab", sys.argv[1:] if argv is None else argv, lambda command: run(cfg, command),
                  markdown, out=a.out, markdown_path=a.markdown, log_level=a.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
