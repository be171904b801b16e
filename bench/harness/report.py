"""What every benchmark's result and report share: the result's header (benchmark, date, command, config,
machine), its first Markdown line, Markdown tables and cells, and writing the result out.

Contract:

- `result_header(benchmark, command, cfg, config, threads, default_threads)`: the keys every result starts with;
  `machine_info` is its `machine` (CPU, versions, torch threads, load average); `finish(result, wall_s)` adds
  the load average at the end and the wall time.
- `machine_line(result, threads)`: the first line of every report.
- `table(header, rows, align)`: a Markdown table as lines; `align` has one letter per column, `l` (`---`) or
  `r` (`---:`), all `l` when not given. Cells are written as `str()` gives them.
- `num(value, digits)`: a cell: None -> `-`, a bool -> yes/no, an int as it is, a float with `digits` decimals.
  `verdict(ok)`: PASS, FAIL, or n/a for None. `env_pairs(pairs)`: `` `KEY=VALUE` `` items, comma-separated.
- `write_json(result, out)`: the JSON result to `out` (when given); `write_markdown(text, path)`: the Markdown to
  `path`, or to stdout.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import sys
from collections.abc import Iterable, Sequence
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


def finish(result: dict[str, Any], wall_s: float) -> None:
    """The keys every result ends with: the load average at the end (in `machine`) and the wall time."""
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(wall_s, 1)


def machine_line(result: dict[str, Any], threads: str) -> str:
    """The first line of every result: date, machine, versions, `threads` (how torch threads were set), load."""
    m = result["machine"]
    return (f"Date: {result['date']} · machine: {m['cpus']} cores, {m['cpu']}, {m['device'].upper()} only · "
            f"torch {m['torch']}, diffusers {m['diffusers']}, Python {m['python']} · {threads} · load average at "
            f"start {m['load_average'][0]}, at end {m.get('load_average_end', ['?'])[0]} · "
            f"wall {result.get('wall_s', '?')} s")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """A Markdown table: the header, the alignment row (`l`: `---`, `r`: `---:` per column) and `rows`."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"{len(header)} columns, {len(align)} alignments")
    return [_row(header), "|" + "".join("---:|" if a == "r" else "---|" for a in align), *map(_row, rows)]


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def num(value: Any, digits: int = 3) -> str:
    """A number for a Markdown cell: None -> '-', bools as yes/no, ints as they are, floats with `digits`
    decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def verdict(ok: bool | None) -> str:
    """PASS or FAIL; n/a when there was nothing to judge."""
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def env_pairs(pairs: Iterable[Sequence[str]], sep: str = ", ") -> str:
    """`KEY=VALUE` pairs as code, joined by `sep`."""
    return sep.join(f"`{k}={v}`" for k, v in pairs)


def write_json(result: dict[str, Any], out: Path | None) -> None:
    """The JSON result to `out`, when given."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", out)


def write_markdown(text: str, markdown_path: Path | None) -> None:
    """The Markdown `text` to `markdown_path`, or to stdout."""
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(text)
        log.info("wrote %s", markdown_path)
    else:
        sys.stdout.write(text)
