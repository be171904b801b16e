"""Worker restart: how long the server takes to replace a worker that died (SIGKILL), and how much of that is
not the model load and first generation every new worker pays, A/B of a setting in one run.

    python -m bench.worker_restart [--data DIR] [--checkpoint demo-sd15] [--size 64] [--steps 1] [--kills 10]
                                   [--before KEY=VALUE ...] [--after KEY=VALUE ...] [--threads T]
                                   [--server-env KEY=VALUE] [--out FILE.json] [--markdown FILE]

One server per configuration (`python -m handler.cli serve`, gunicorn, on a free 127.0.0.1 port), both up at
once: `before` (default `SDFUNC_WARMUP__PREIMPORT=false`) and `after` (default `SDFUNC_WARMUP__PREIMPORT=true`:
the gunicorn master imports torch, diffusers and the app before it forks, so a new worker has them already).
Both warm up at worker start (`SDFUNC_WARMUP__SHAPES=["<size>x<size>@<steps>"]`, the default checkpoint
`--checkpoint`) and are started one after the other, each to `/healthz` READY. Then `--kills` rounds, the
configurations alternating which goes first: the worker (the master's child that is not the prefetch reader,
`pipelines.prefetch`) gets SIGKILL, and from the kill the bench polls (every 20 ms, a fresh connection each, short
timeouts; the polling is the measurement) until `/health` answers 200 from a new worker (another `instance_id`,
or an uptime shorter than the time since the kill) = kill -> /health, then until `/healthz` says READY = kill ->
READY. The new worker's own `cold_start` (from that READY body) gives its model load (read_weights + to_device)
and first_generation; restart overhead = kill -> READY - model load - first generation (what a replaced worker
pays beyond the model: gunicorn's respawn, imports, app start, warm-up bookkeeping). Also reported: the new
worker's `imports` and where its clock starts after the kill (its `uptime_seconds` against the kill).

Per configuration: median and every value of kill -> /health, kill -> READY and restart overhead, and the
medians of the parts; ratios after / before of kill -> READY and of restart overhead. Target: restart overhead
of `after` at most 1.5 s. A round is marked DISTURBED when other processes (the idle other server included)
used more than 10 % of the machine's CPU between the kill and READY (from /proc). The page cache is warm: the
checkpoint was read by the worker that died. The exit status is 0 whether or not the target is met.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
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
    children,
    cpu_snapshot,
    others_share,
    parse_server_env,
    proc_stat,
    run_benchmark,
)
from bench.harness.report import env_pairs, finish, machine_line, result_header, table, verdict
from bench.harness.server import Server, ensure_data, running_server
from bench.harness.stats import median

log = logging.getLogger("bench.worker_restart")

CONFIG_NAMES = ("before", "after")
BEFORE = (("SDFUNC_WARMUP__PREIMPORT", "false"),)
AFTER = (("SDFUNC_WARMUP__PREIMPORT", "true"),)
PREFETCH_MARK = "pipelines.prefetch"  # in the prefetch reader's command line
TARGET_OVERHEAD_S = 1.5  # restart overhead of `after`
LOAD_PHASES = ("read_weights", "to_device")


@dataclass
class BenchConfig:
    """What one run measures. The defaults take a few minutes on an idle 2-core CPU machine."""

    data: Path | None = None  # data root; the demo checkpoints are written into it when missing (default: temp)
    checkpoint: str = "demo-sd15"  # default and warm-up checkpoint of both servers
    size: int = 64  # warm-up shape
    steps: int = 1
    kills: int = 10  # workers killed per configuration
    threads: int | None = None  # OMP_NUM_THREADS of the servers; None = torch's default here
    server_timeout: float = 240.0  # seconds a server may take to its first READY
    restart_timeout: float = 240.0  # seconds from a kill to READY
    poll_s: float = 0.02  # pause between two polls that did not see what they wait for
    server_env: tuple[tuple[str, str], ...] = ()  # extra environment for both servers
    before: tuple[tuple[str, str], ...] = BEFORE
    after: tuple[tuple[str, str], ...] = AFTER


# ---------------------------------------------------------------------------------------------------------
# the worker


def pick_worker(candidates: dict[int, str], instance_id: str | None) -> int:
    """The gunicorn worker among the master's live children (`pid -> command line`): the one child that is not
    the prefetch reader, or where there are several, the one whose pid is in `instance_id`
    (`<host>-<pid>-<random>`). Raises RuntimeError when that does not name exactly one."""
    pids = [pid for pid, cmd in candidates.items() if PREFETCH_MARK not in cmd]
    if len(pids) > 1 and instance_id:
        pids = [pid for pid in pids if f"-{pid}-" in instance_id]
    if len(pids) != 1:
        raise RuntimeError(f"cannot tell the worker among the master's children {candidates} "
                           f"(instance {instance_id})")
    return pids[0]


def _live_children(master: int) -> dict[int, str]:
    """The master's children that are not zombies, with their command lines."""
    out = {}
    for pid in children(master):
        try:
            if proc_stat(Path(f"/proc/{pid}/stat"))[0][0] == "Z":
                continue
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return out


def _get(url: str, timeout: tuple[float, float] = (1.0, 2.0)) -> dict[str, Any] | None:
    """GET on a fresh connection (no keep-alive to a dead worker): the JSON body, or None without an answer."""
    import requests

    try:
        r = requests.get(url, timeout=timeout, headers={"Connection": "close"})
        return r.json() if r.status_code in (200, 503) else None
    except (requests.RequestException, ValueError):
        return None


def is_new_worker(body: dict[str, Any], old_id: str | None, since_kill_s: float) -> bool:
    """Whether a `/health(z)` body comes from a worker started after the kill: another `instance_id`, or (where
    the id is fixed by SDFUNC_INSTANCE_ID) an uptime shorter than the time since the kill (a respawned worker
    counts from its own start)."""
    if body.get("instance_id") != old_id:
        return True
    uptime = body.get("uptime_seconds")
    return isinstance(uptime, (int, float)) and uptime <= since_kill_s


def restart_parts(ready_s: float, cold_start: dict[str, Any]) -> dict[str, float | None]:
    """From kill -> READY and the new worker's `cold_start`: its model load (read_weights + to_device), first
    generation, imports, and the restart overhead = kill -> READY - model load - first generation (None where the
    report lacks a phase)."""
    phases = cold_start.get("phases", {})
    load = sum(phases[p] for p in LOAD_PHASES) if all(p in phases for p in LOAD_PHASES) else None
    first = phases.get("first_generation")
    overhead = round(ready_s - load - first, 3) if load is not None and first is not None else None
    return {"model_load_s": None if load is None else round(load, 3), "first_generation_s": first,
            "imports_s": phases.get("imports"), "restart_overhead_s": overhead}


def kill_once(cfg: BenchConfig, server: Server) -> dict[str, Any]:
    """SIGKILL `server`'s worker; kill -> /health from a new worker, kill -> READY, and the new worker's parts."""
    assert server.proc is not None
    master = server.proc.pid
    body = _get(f"{server.url}/healthz")
    old_id = body.get("instance_id") if body else None
    pid = pick_worker(_live_children(master), old_id)
    cpu_start = cpu_snapshot(master)
    kill_epoch = time.time()
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    deadline = t0 + cfg.restart_timeout
    health_s = ready_s = None
    while ready_s is None:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server {server.name}: the master exited after the worker was killed")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"server {server.name}: no READY worker {cfg.restart_timeout:.0f} s after the kill")
        body = _get(f"{server.url}/healthz" if health_s is not None else f"{server.url}/health")
        now = time.perf_counter()
        if body is not None and is_new_worker(body, old_id, now - t0):
            if health_s is None:
                health_s = now - t0
                continue  # now READY: poll /healthz at once
            if body.get("status") in ("FAILED", "SETUP_FAILED"):
                raise RuntimeError(f"server {server.name}: the new worker says {body.get('status')}")
            if body.get("status") == "READY":
                ready_s = now - t0
                break
        time.sleep(cfg.poll_s)
    received = time.time()
    cpu_end = cpu_snapshot(master)
    cold = body.get("cold_start") or {}
    out = {"killed_pid": pid, "kill_to_health_s": round(health_s, 3), "kill_to_ready_s": round(ready_s, 3),
           **restart_parts(ready_s, cold), "cold_start": cold,
           "worker_start_after_kill_s": round(received - body["uptime_seconds"] - kill_epoch, 3)
           if "uptime_seconds" in body else None,
           "others_cpu_share": others_share(cpu_start, cpu_end)}
    log.info("%s: killed worker %d; /health after %.2f s, READY after %.2f s (model load %s s, first generation %s "
             "s, overhead %s s)", server.name, pid, health_s, ready_s, out["model_load_s"], out["first_generation_s"],
             out["restart_overhead_s"])
    return out


# ---------------------------------------------------------------------------------------------------------
# the whole run


def _stat(values: list[float | None]) -> dict[str, Any] | None:
    present = [v for v in values if v is not None]
    return {"median": median(present), "values": present} if present else None


def summarize(kills: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and every value of each timing over one configuration's kills, and whether any was disturbed."""
    out: dict[str, Any] = {key: _stat([k.get(key) for k in kills])
                           for key in ("kill_to_health_s", "kill_to_ready_s", "restart_overhead_s", "model_load_s",
                                       "first_generation_s", "imports_s", "worker_start_after_kill_s")}
    out["others_cpu_share"] = [k["others_cpu_share"] for k in kills]
    out["disturbed"] = any(x is not None and x > OTHERS_MAX for x in out["others_cpu_share"])
    return out


def ratio_of(after: dict[str, Any] | None, before: dict[str, Any] | None) -> float | None:
    """median(after) / median(before) of two stats; None when either is missing or before is not positive."""
    if not after or not before or before["median"] <= 0:
        return None
    return round(after["median"] / before["median"], 3)


def compare(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios after / before and the target, from the two configurations' summaries."""
    before, after = configs["before"]["summary"], configs["after"]["summary"]
    overhead = after.get("restart_overhead_s")
    return {"kill_to_ready_after_over_before": ratio_of(after["kill_to_ready_s"], before["kill_to_ready_s"]),
            "restart_overhead_after_over_before": ratio_of(overhead, before.get("restart_overhead_s")),
            "target": {"restart_overhead_after_max_s": TARGET_OVERHEAD_S,
                       "pass": None if not overhead else overhead["median"] <= TARGET_OVERHEAD_S}}


def _env(cfg: BenchConfig, config: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    env = {"SDFUNC_DEFAULT_CHECKPOINT": cfg.checkpoint,
           "SDFUNC_WARMUP__SHAPES": json.dumps([f"{cfg.size}x{cfg.size}@{cfg.steps}"])}
    env.update(dict(cfg.server_env))
    env.update(dict(config))
    return tuple(env.items())


def run(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Both servers up, then `kills` alternating rounds of kill -> READY. Returns the JSON-able result."""
    import requests
    import torch

    default_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads
    started = time.perf_counter()
    envs = {"before": cfg.before, "after": cfg.after}
    result: dict[str, Any] = {
        **result_header("worker_restart", command, cfg, {"threads": threads,
                        "warmup_shape": f"{cfg.size}x{cfg.size}@{cfg.steps}"}, threads, default_threads),
    }
    kills: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIG_NAMES}
    first_ready: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sdfunc-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        data = Path(cfg.data).resolve() if cfg.data else work / "data"
        ensure_data(data)
        if not (data / "models" / "Stable-diffusion" / f"{cfg.checkpoint}.safetensors").exists():
            raise FileNotFoundError(f"no checkpoint {cfg.checkpoint} under {data}/models/Stable-diffusion")
        servers: dict[str, Server] = {}
        for name in CONFIG_NAMES:  # one after the other: a start is CPU work the other one would disturb
            server = stack.enter_context(running_server(data, work, warmup=True, threads=threads, name=name,
                                                        extra_env=_env(cfg, envs[name])))
            server.start()
            with requests.Session() as session:
                first_ready[name], _ = server.wait_health(session, until=("READY",), timeout=cfg.server_timeout)
            log.info("%s: READY %.2f s after Popen", name, first_ready[name])
            servers[name] = server
        for round_ in range(cfg.kills):
            order = CONFIG_NAMES if round_ % 2 == 0 else tuple(reversed(CONFIG_NAMES))
            for name in order:
                kills[name].append({"round": round_ + 1, **kill_once(cfg, servers[name])})
    configs = {name: {"env": [list(p) for p in envs[name]], "first_ready_s": round(first_ready[name], 3),
                      "summary": summarize(kills[name]), "kills": kills[name]} for name in CONFIG_NAMES}
    result["configs"] = configs
    result["comparison"] = compare(configs)
    result["disturbed"] = any(c["summary"]["disturbed"] for c in configs.values())
    finish(result, time.perf_counter() - started)
    return result


# ---------------------------------------------------------------------------------------------------------
# report


def _cell(stat: dict[str, Any] | None, all_values: bool = True) -> str:
    """`median (v1, v2, ...)` in seconds, or `-` when not measured."""
    if not stat:
        return "-"
    text = f"{stat['median']:.2f}"
    if all_values and len(stat["values"]) > 1:
        text += f" ({', '.join(f'{v:.2f}' for v in stat['values'])})"
    return text


def _share(value: float | None) -> str:
    return "?" if value is None else f"{value:.0%}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The tables RESULTS.md carries, from a result dict."""
    m, c = result["machine"], result["config"]
    configs, comparison = result["configs"], result["comparison"]
    lines = [
        machine_line(result, f"server torch threads {m['torch_threads']}"),
        "",
        f"Command: `{result['command']}`",
        "",
        f"Checkpoint `{c['checkpoint']}`, warm-up at worker start with shape `{c['warmup_shape']}`; "
        f"{c['kills']} SIGKILLs of the worker per configuration, alternating; polled every "
        f"{c['poll_s'] * 1000:.0f} ms. Seconds from the kill; cells: median (each kill)."
        + (" Both servers: " + env_pairs(c["server_env"]) + "." if c.get("server_env") else ""),
        "",
        *table(["config", "environment", "first start -> READY", "kill -> /health", "kill -> READY",
                "restart overhead"],
               ([name, env_pairs(conf["env"]) or "-", f"{conf['first_ready_s']:.2f}",
                 _cell(conf["summary"]["kill_to_health_s"]), _cell(conf["summary"]["kill_to_ready_s"]),
                 _cell(conf["summary"]["restart_overhead_s"])] for name, conf in configs.items()),
               "llrrrr"),
        "",
        "The new worker's own clock (`GET /healthz` -> `cold_start`, median seconds; `-`: not reported): `worker "
        "start` = where its clock starts after the kill; restart overhead = kill -> READY - model load - first "
        "generation:",
        "",
        *table(["config", "worker start", "imports", "model load (read_weights + to_device)", "first generation",
                "restart overhead", "other processes' CPU (max)"],
               ([name, _cell(s["worker_start_after_kill_s"], False), _cell(s["imports_s"], False),
                 _cell(s["model_load_s"], False), _cell(s["first_generation_s"], False),
                 _cell(s["restart_overhead_s"], False),
                 _share(max((x for x in s["others_cpu_share"] if x is not None), default=None))]
                for name, conf in configs.items() for s in [conf["summary"]]),
               "lrrrrrr"),
        "",
        f"After / before: kill -> READY {_ratio(comparison['kill_to_ready_after_over_before'])}, restart overhead "
        f"{_ratio(comparison['restart_overhead_after_over_before'])}.",
        "",
        f"Target: restart overhead (after) <= {comparison['target']['restart_overhead_after_max_s']:.1f} s: "
        f"{verdict(comparison['target']['pass'])}"
        + (f" ({configs['after']['summary']['restart_overhead_s']['median']:.2f} s)"
           if configs["after"]["summary"]["restart_overhead_s"] else "")
        + (f" - but the run was DISTURBED (other processes above {OTHERS_MAX:.0%} of the CPU during a restart); "
           "rerun on a quiet machine." if result["disturbed"] else "."),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None, Path | None, str]:
    """(config, --out, --markdown, --log-level) from the command line."""
    p = argparse.ArgumentParser(prog="python -m bench.worker_restart", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="data root (demo checkpoints are written there; default: a temp dir)")
    p.add_argument("--checkpoint", default=BenchConfig.checkpoint,
                   help="default and warm-up checkpoint (default %(default)s)")
    p.add_argument("--size", type=int, default=BenchConfig.size, help="warm-up size (default %(default)s)")
    p.add_argument("--steps", type=int, default=BenchConfig.steps, help="warm-up steps (default %(default)s)")
    p.add_argument("--kills", type=int, default=BenchConfig.kills,
                   help="worker kills per configuration (default %(default)s)")
    p.add_argument("--before", action="append", default=[], metavar="KEY=VALUE",
                   help=f"environment of the `before` server (repeatable; default {env_pairs(BEFORE)})")
    p.add_argument("--after", action="append", default=[], metavar="KEY=VALUE",
                   help=f"environment of the `after` server (repeatable; default {env_pairs(AFTER)})")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the servers (default: torch's default)")
    p.add_argument("--server-timeout", type=float, default=BenchConfig.server_timeout,
                   help="seconds a server may take to its first READY, and a worker from its kill to READY "
                        "(default %(default)s)")
    add_output_arguments(p)
    a = p.parse_args(argv)
    if a.size < 64 or a.size % 8:
        p.error("--size: a multiple of 8, at least 64")
    if a.kills < 1 or a.steps < 1 or (a.threads is not None and a.threads < 1):
        p.error("--kills, --steps and --threads must be at least 1")
    cfg = BenchConfig(data=a.data, checkpoint=a.checkpoint, size=a.size, steps=a.steps, kills=a.kills,
                      threads=a.threads, server_timeout=a.server_timeout, restart_timeout=a.server_timeout,
                      server_env=parse_server_env(p, a.server_env),
                      before=parse_server_env(p, a.before) or BEFORE, after=parse_server_env(p, a.after) or AFTER)
    return cfg, a.out, a.markdown, a.log_level


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg, out, md_path, log_level = parse_args(args)
    run_benchmark("bench.worker_restart", args, lambda command: run(cfg, command), markdown, out=out,
                  markdown_path=md_path, log_level=log_level)
    return 0  # a missed target is a result, not a failure of the benchmark


if __name__ == "__main__":
    sys.exit(main())
