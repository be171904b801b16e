"""What every benchmark's command line does the same way: `--server-env` parsing, and running one benchmark
with its result written as JSON and Markdown."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def machine_info(threads: int, default_threads: int) -> dict[str, Any]:
    """CPU, versions, torch threads and load average, for the first line of a result."""
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(), "cpu": cpu, "device": "cpu", "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "platform": platform.platform(),
        "torch_threads": threads, "torch_default_threads": default_threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def result_header(benchmark: str, command: str, cfg: Any, config: dict[str, Any], threads: int,
                  default_threads: int) -> dict[str, Any]:
    """The keys every result starts with: benchmark, date, command, config (the dataclass `cfg`, paths as
    text, plus `config`) and machine."""
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}, **config},
        "machine": machine_info(threads, default_threads),
    }


def add_output_arguments(parser: argparse.ArgumentParser, *, markdown_file: bool = True) -> None:
    """`--server-env`, `--out`, `--markdown` (unless `markdown_file` is False) and `--log-level`."""
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the servers, e.g. SDFUNC_THREADS=1 (repeatable; for A/B runs)")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    if markdown_file:
        parser.add_argument("--markdown", type=Path, help="write the Markdown here instead of stdout")
    parser.add_argument("--log-level", default="INFO")


def machine_line(result: dict[str, Any], threads: str) -> str:
    """The first line of every result: date, machine, versions, `threads` (how torch threads were set), load."""
    m = result["machine"]
    return (f"Date: {result['date']} · machine: {m['cpus']} cores, {m['cpu']}, {m['device'].upper()} only · "
            f"torch {m['torch']}, diffusers {m['diffusers']}, Python {m['python']} · {threads} · load average at "
            f"start {m['load_average'][0]}, at end {m.get('load_average_end', ['?'])[0]} · "
            f"wall {result.get('wall_s', '?')} s")


def parse_server_env(parser: argparse.ArgumentParser, items: list[str]) -> tuple[tuple[str, str], ...]:
    """`KEY=VALUE` strings -> pairs; anything else is a usage error."""
    pairs = tuple(tuple(item.split("=", 1)) for item in items)
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        parser.error("--server-env: KEY=VALUE")
    return pairs  # type: ignore[return-value]


def run_benchmark(module: str, args: list[str], run: Callable[[str], dict[str, Any]],
                  markdown: Callable[[dict[str, Any]], str], *, out: Path | None, markdown_path: Path | None,
                  log_level: str) -> dict[str, Any]:
    """Run `run(command)` with logging set up and SIGTERM unwinding like Ctrl-C (so servers in their own process
    groups are stopped on the way out); write the JSON result to `out` and the Markdown to `markdown_path`, or
    to stdout."""
    from handler.logs import configure_logging

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    configure_logging(log_level, as_json=False)
    result = run(shlex.join(["python", "-m", module, *args]))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", out)
    text = markdown(result)
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(text)
        log.info("wrote %s", markdown_path)
    else:
        sys.stdout.write(text)
    return result
