"""What every benchmark's command line does the same way, and what it reads about processes.

Contract:

- `add_output_arguments(parser)`: `--server-env`, `--out`, `--markdown` (unless `markdown_file=False`) and
  `--log-level`; `parse_server_env(parser, items)` turns `KEY=VALUE` strings into pairs (anything else is a usage
  error).
- `Shape` and `parse_shapes(text, steps, requests)`: `SIZE[@STEPS][:N]` items, comma-separated (`64@1:32,256@8`);
  `shapes_valid(shapes)` says whether they are distinct multiples of 8, at least 64, with at least 1 step and 1
  request.
- `run_benchmark(module, args, run, markdown, ...)`: logging set up, SIGTERM unwinding like Ctrl-C (so servers in
  their own process groups are stopped on the way out), `run(command)`, then the JSON result and the Markdown
  written (`bench.harness.report`).
- `RoundsConfig`, `parse_rounds_args(module, description, config, argv)` and `rounds_main(...)`: the command line
  and entry of the in-process benchmarks that time shuffled rounds per kind on SD 1.5 and/or SDXL.
- Linux /proc readings (None, or nothing, elsewhere): `proc_stat(path)`, `children(pid)`, `thread_cpu(pids)`,
  and `cpu_snapshot(pgid)` / `others_share(before, after)`: the share of the machine's CPU that processes other
  than a server and the bench used between two snapshots (`OTHERS_MAX` and above: the window was disturbed).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

OTHERS_MAX = 0.10  # share of the machine's CPU other processes may use during a window before it is disturbed


# ---------------------------------------------------------------------------------------------------------
# arguments


def add_output_arguments(parser: argparse.ArgumentParser, *, markdown_file: bool = True) -> None:
    """`--server-env`, `--out`, `--markdown` (unless `markdown_file` is False) and `--log-level`."""
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the servers, e.g. SDFUNC_THREADS=1 (repeatable; for A/B runs)")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    if markdown_file:
        parser.add_argument("--markdown", type=Path, help="write the Markdown here instead of stdout")
    parser.add_argument("--log-level", default="INFO")


def parse_server_env(parser: argparse.ArgumentParser, items: list[str]) -> tuple[tuple[str, str], ...]:
    """`KEY=VALUE` strings -> pairs; anything else is a usage error."""
    pairs = tuple(tuple(item.split("=", 1)) for item in items)
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        parser.error("--server-env: KEY=VALUE")
    return pairs  # type: ignore[return-value]


class Shape(NamedTuple):
    """One kind of request: a square size, its steps, and how many requests (per block or per cell)."""

    size: int
    steps: int
    requests: int


def parse_shapes(text: str, default_steps: int, default_requests: int) -> tuple[Shape, ...]:
    """`SIZE[@STEPS][:N]` items, comma-separated: `64@1:32,256@8`; the defaults fill what an item leaves out.
    A part that is not an integer raises ValueError."""
    shapes = []
    for item in text.split(","):
        if not item.strip():
            continue
        head, _, requests = item.strip().partition(":")
        size, _, steps = head.partition("@")
        shapes.append(Shape(int(size), int(steps) if steps else default_steps,
                            int(requests) if requests else default_requests))
    return tuple(shapes)


def shapes_valid(shapes: tuple[Shape, ...]) -> bool:
    """At least one shape; distinct sizes, each a multiple of 8 and at least 64; at least 1 step and 1 request."""
    return bool(shapes) and all(s.size >= 64 and s.size % 8 == 0 and s.steps >= 1 and s.requests >= 1
                                for s in shapes) and len({s.size for s in shapes}) == len(shapes)


# ---------------------------------------------------------------------------------------------------------
# running one benchmark


def run_benchmark(module: str, args: list[str], run: Callable[[str], dict[str, Any]],
                  markdown: Callable[[dict[str, Any]], str], *, out: Path | None, markdown_path: Path | None,
                  log_level: str) -> dict[str, Any]:
    """Run `run(command)` with logging set up and SIGTERM unwinding like Ctrl-C (so servers in their own process
    groups are stopped on the way out); write the JSON result to `out` and the Markdown to `markdown_path`, or
    to stdout."""
    from bench.harness.report import write_json, write_markdown
    from handler.logs import configure_logging

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    configure_logging(log_level, as_json=False)
    result = run(shlex.join(["python", "-m", module, *args]))
    write_json(result, out)  # first: a report that fails to render loses no measurement
    write_markdown(markdown(result), markdown_path)
    return result


@dataclass
class RoundsConfig:
    """An in-process benchmark that times identical requests per kind, in shuffled rounds, on SD 1.5 and/or SDXL
    (`bench.lora_overhead`, `bench.prompt_language`): its command line."""

    rounds: int = 10
    size: int = 256
    steps: int = 8
    arch: str = "both"  # sd15, sdxl or both
    threads: int | None = None
    shuffle_seed: int = 0


def parse_rounds_args(module: str, description: str, config: type[RoundsConfig],
                      argv: list[str]) -> tuple[RoundsConfig, argparse.Namespace]:
    """`--rounds` (default `config`'s), `--size`, `--steps`, `--arch`, `--threads`, `--shuffle-seed` and the
    output arguments -> (a `config`, the parsed namespace)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--rounds", type=int, default=config.rounds)
    parser.add_argument("--size", type=int, default=config.size)
    parser.add_argument("--steps", type=int, default=config.steps)
    parser.add_argument("--arch", choices=["sd15", "sdxl", "both"], default=config.arch)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--shuffle-seed", type=int, default=config.shuffle_seed)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.size < 64 or args.size % 8:
        parser.error("--rounds and --steps at least 1; --size a multiple of 8, at least 64")
    return config(rounds=args.rounds, size=args.size, steps=args.steps, arch=args.arch, threads=args.threads,
                  shuffle_seed=args.shuffle_seed), args


def rounds_main(module: str, argv: list[str] | None,
                parse: Callable[[list[str]], tuple[RoundsConfig, argparse.Namespace]],
                run: Callable[[Any, str], dict[str, Any]], markdown: Callable[[dict[str, Any]], str]) -> None:
    """The command-line entry of such a benchmark: parse, run, write the result (run_benchmark)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg, args = parse(argv)
    run_benchmark(module, argv, lambda command: run(cfg, command), markdown, out=args.out,
                  markdown_path=args.markdown, log_level=args.log_level)


# ---------------------------------------------------------------------------------------------------------
# /proc


def proc_stat(path: Path) -> tuple[list[str], int]:
    """The fields of a /proc stat file after the command name, and the parent pid."""
    fields = path.read_text().rsplit(")", 1)[1].split()
    return fields, int(fields[1])


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (processes that vanish meanwhile are skipped)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if proc_stat(Path(f"/proc/{entry}/stat"))[1] == pid:
                    out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


def thread_cpu(pids: Iterable[int], *, min_seconds: float = 0.5) -> list[dict[str, Any]]:
    """CPU seconds (user + system) of each thread of `pids` that used more than `min_seconds`, busiest first."""
    tick = os.sysconf("SC_CLK_TCK")
    threads = []
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            fields = proc_stat(Path(f"/proc/{pid}/task/{tid}/stat"))[0]
            cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            if cpu > min_seconds:
                threads.append({"tid": int(tid), "cpu_s": round(cpu, 1)})
    return sorted(threads, key=lambda t: -t["cpu_s"])


def cpu_snapshot(pgid: int | None) -> tuple[float, float, float] | None:
    """(perf_counter, busy CPU seconds of the whole machine since boot, CPU seconds of process group `pgid` and
    of this process, with the children they reaped). Linux /proc only; None elsewhere."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        ours = 0
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                fields = proc_stat(Path("/proc", d, "stat"))[0]
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            if int(d) == os.getpid() or (pgid is not None and int(fields[2]) == pgid):
                # utime + stime of all threads, + cutime + cstime: children it reaped (a server's short-lived
                # helpers, such as the prefetch process, count as the server's, not as other processes')
                ours += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        return time.perf_counter(), (user + nice + system + irq + softirq + steal) / tick, ours / tick
    except (OSError, ValueError):
        return None


def others_share(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float | None:
    """Share of the machine's CPU capacity that processes other than the server and the bench used between two
    snapshots: a competing process slows CPU generation many times over, so a window above OTHERS_MAX is
    not a measurement of the server."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return round(max(0.0, others) / ((after[0] - before[0]) * (os.cpu_count() or 1)), 3)
