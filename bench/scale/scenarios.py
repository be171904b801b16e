"""The three scenarios of `python -m bench`: coldstart, throughput and autoscale.

Each runs against a target (`Target`: a URL, or the local emulator it starts and stops), sends txt2img
requests open-loop (`bench.scale.load`), collects one row per request and the instances' timeline, and writes
a report folder (`bench.scale.report.write_run`). Times in rows are seconds from the run's origin, a
`time.monotonic()` value, the same clock the emulator's times are on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.scale.emulator import EmulatorConfig, EmulatorThread, masked_env
from bench.scale.load import Call, LoadConfig, Shape, arrivals, run_open_loop
from bench.scale.profile import record, shape_key

log = logging.getLogger(__name__)

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@dataclass
class RequestSpec:
    """The txt2img request every scenario sends (a distinct seed each)."""

    path: str = "/sdapi/v1/txt2img"
    size: int = 256
    steps: int = 8
    sampler: str = "Euler"
    prompt: str = PROMPT
    batch_size: int = 1
    model: str | None = None

    def body(self, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": self.prompt, "steps": self.steps, "width": self.size, "height": self.size,
                                "sampler_name": self.sampler, "cfg_scale": 7, "seed": seed,
                                "batch_size": self.batch_size, "n_iter": 1}
        if self.model:
            body["override_settings"] = {"sd_model_checkpoint": self.model}
        return body

    def call(self, seed: int, level: str) -> Call:
        return Call(self.path, self.body(seed), level)

    @property
    def key(self) -> str:
        return shape_key(self.body(0))


@dataclass
class Target:
    """Where requests go: `url` (a deployed function) or, when `url` is None, a local emulator built from
    `emulator` (gunicorn instances on `emulator.data`, or simulated ones when `emulator.simulate` is set)."""

    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    emulator: EmulatorConfig | None = None
    fc_idle_s: float = 0.0  # a real target: how long FC keeps an idle instance (for observed instance time)
    timeout_s: float = 600.0

    @property
    def local(self) -> bool:
        return self.url is None

    @property
    def simulated(self) -> bool:
        return self.emulator is not None and self.emulator.simulate is not None

    def describe(self) -> str:
        if self.url:
            return self.url
        return f"simulation ({self.emulator.simulate.name})" if self.simulated else "local emulator"


class Run:
    """One scenario run: the origin of its clock, its rows, the emulator when local, a progress bar."""

    def __init__(self, target: Target, spec: RequestSpec, *, progress: bool = True) -> None:
        self.target = target
        self.spec = spec
        self.progress = progress
        self.rows: list[dict[str, Any]] = []
        self.emulator: EmulatorThread | None = None
        self.origin = 0.0
        self.seed = 1000
        self._bar = None

    def __enter__(self) -> Run:
        if self.target.local:
            cfg = self.target.emulator
            self.emulator = EmulatorThread(cfg).__enter__()
            if cfg.provisioned:
                self._wait_provisioned(cfg.provisioned, cfg.start_timeout_s)
        self.origin = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.emulator is not None:
            self.emulator.__exit__(*exc)

    def _wait_provisioned(self, count: int, timeout: float) -> None:
        """Provisioned instances are on before the load comes: wait until they are ready."""
        log.info("waiting for %d provisioned instance(s) to start", count)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [i["state"] for i in self.emulator.state()["instances"] if i["provisioned"]]
            if "failed" in states:
                raise RuntimeError("a provisioned instance failed to start (see its server.log)")
            if states.count("ready") >= count:
                return
            time.sleep(0.2)
        raise RuntimeError(f"provisioned instances not ready after {timeout:.0f} s")

    @property
    def url(self) -> str:
        return self.target.url or self.emulator.url

    def now(self) -> float:
        return time.monotonic() - self.origin

    def bar(self, total: int, desc: str):
        from tqdm import tqdm

        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(total=total, desc=desc, unit="req", disable=not self.progress, leave=False)
        return self._bar

    def send(self, times: list[float], level: str) -> list[dict[str, Any]]:
        """Send one request per time (seconds from the origin) open-loop; rows appended and returned."""
        schedule = []
        for at in times:
            schedule.append((at, self.spec.call(self.seed, level)))
            self.seed += 1
        bar = self.bar(len(schedule), level)
        counts = {"ok": 0, "429": 0, "err": 0}

        def done(row: dict[str, Any]) -> None:
            key = "ok" if row["ok"] else "429" if row["status"] == 429 else "err"
            counts[key] += 1
            bar.update(1)
            bar.set_postfix(counts, refresh=False)

        cfg = LoadConfig(self.url, headers=self.target.headers, timeout_s=self.target.timeout_s,
                         drain_s=self.target.timeout_s)
        rows = asyncio.run(run_open_loop(cfg, schedule, on_done=done, t0=self.origin))
        base = len(self.rows)
        for i, row in enumerate(rows):
            row["id"] = base + i
        self.rows.extend(rows)
        return rows

    def instances(self) -> list[dict[str, Any]]:
        """The instance timeline (analysis.INSTANCE_FIELDS): from the emulator, or observed from the rows."""
        if self.emulator is not None:
            state = self.emulator.state()
            return [self._emulated(i) for i in state["instances"]]
        return observed_instances(self.rows, self.target.fc_idle_s)

    def _emulated(self, i: dict[str, Any]) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - self.origin, 3)

        return {"name": i["name"], "kind": i["kind"], "provisioned": i["provisioned"], "spawned_s": rel(i["spawned"]),
                "ready_s": rel(i["ready"]), "stopped_s": rel(i["stopped"]), "start_ms": i["start_ms"],
                "initialize_ms": i["initialize_ms"], "requests": i["requests"], "busy_s": round(i["busy_s"], 3)}


def observed_instances(rows: list[dict[str, Any]], idle_s: float) -> list[dict[str, Any]]:
    """Instances of a real target, known only by the `X-Instance-Id` of their answers: alive from the first
    request they answered (its send time) to their last answer plus `idle_s`; busy while one of their
    requests was in flight (client-side times, so network time included)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["instance"] and row["sent_s"] is not None:
            by_name.setdefault(row["instance"], []).append(row)
    out = []
    for name, own in by_name.items():
        spans = sorted((r["sent_s"], r["done_s"]) for r in own)
        busy, end = 0.0, float("-inf")
        for start, stop in spans:  # union of the in-flight intervals
            if start > end:
                busy += stop - start
                end = stop
            elif stop > end:
                busy += stop - end
                end = stop
        out.append({"name": name, "kind": "observed", "provisioned": False, "spawned_s": round(spans[0][0], 3),
                    "ready_s": round(spans[0][0], 3), "stopped_s": round(max(s for _, s in spans) + idle_s, 3),
                    "start_ms": None, "initialize_ms": None, "requests": len(own), "busy_s": round(busy, 3)})
    return out


def _gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi (no CUDA context in the bench process); None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def machine() -> dict[str, Any]:
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch_version, "cuda": _gpu_name()}


def _meta(scenario: str, run: Run, command: str, config: dict[str, Any]) -> dict[str, Any]:
    machine_info = machine()
    emulator = None
    if run.target.emulator is not None:
        e = run.target.emulator
        emulator = {"instance_concurrency": e.instance_concurrency, "max_instances": e.max_instances,
                    "provisioned": e.provisioned, "idle_timeout_s": e.idle_timeout_s, "initialize": e.initialize,
                    "instance_env": masked_env(e.instance_env), "simulate": e.simulate.name if e.simulate else None,
                    "profile_source": e.simulate.source if e.simulate else None}
    return {"scenario": scenario, "target": run.target.describe(), "simulated": run.target.simulated,
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
            "duration_s": round(run.now(), 3), "config": {**config, "request": run.spec.body(0),
                                                         "shape": run.spec.key, "emulator": emulator},
            "machine": machine_info}


def _finish(scenario: str, run: Run, out_dir: Path, command: str, config: dict[str, Any],
            extra: dict[str, Any] | None = None, **meta_extra: Any) -> dict[str, Any]:
    from bench.scale.report import write_run

    instances = run.instances()
    meta = {**_meta(scenario, run, command, config), **meta_extra}
    summary = write_run(out_dir, meta, run.rows, instances, extra=extra or {})
    if run.target.local and not run.target.simulated and any(r["ok"] for r in run.rows):
        profile = record(f"{scenario}-{out_dir.name}", run.rows, instances, run.spec.key,
                         {"device": meta["machine"]["cuda"] or "cpu", "scenario": scenario, "command": command,
                          "date": meta["started_at"], "machine": meta["machine"]})
        profile.save(out_dir / "profile.json")
    log.info("wrote %s", out_dir)
    return summary


def coldstart(run: Run, *, reps: int, warm: int, idle_wait_s: float, out_dir: Path, command: str) -> dict[str, Any]:
    """Scale from zero `reps` times: one request to a function with no instance (`cold`), then `warm`
    requests one after another on the instance it started (`warm`). Local: the emulator reclaims every idle
    instance before each repetition. A real target: wait `idle_wait_s` between repetitions for FC to reclaim
    its instances; a repetition answered by an instance seen before was not cold, and the report says so."""
    breakdowns: list[dict[str, Any]] = []
    seen: set[str] = set()
    really_cold = []
    for rep in range(reps):
        if rep and not run.target.local and idle_wait_s > 0:
            log.info("waiting %.0f s for FC to reclaim idle instances", idle_wait_s)
            time.sleep(idle_wait_s)
        if run.emulator is not None:
            run.emulator.reclaim_idle()
            alive = run.emulator.state()["alive"]
            if alive:
                raise RuntimeError(f"{alive} instances still alive before a cold start (provisioned?)")
        (row,) = run.send([run.now() + 0.01], "cold")
        really_cold.append(bool(row["instance"]) and row["instance"] not in seen)
        seen.add(row["instance"])
        for _ in range(warm):
            run.send([run.now() + 0.01], "warm")
        breakdowns.append(_server_breakdown(run, row))
    extra = {"cold_start_breakdown": breakdowns, "really_cold": really_cold}
    return _finish("coldstart", run, out_dir, command, {"reps": reps, "warm": warm, "idle_wait_s": idle_wait_s},
                   extra)


def _server_breakdown(run: Run, row: dict[str, Any]) -> dict[str, Any] | None:
    """The function's own cold-start breakdown for the instance that answered `row`: from the emulator (the
    `/initialize` answer) or from the target's `GET /healthz` when the same instance answers it."""
    if run.emulator is not None:
        alive = [i for i in run.emulator.state()["instances"] if i["state"] == "ready"]
        if not alive:
            return None
        i = max(alive, key=lambda i: i["spawned"])  # the repetition's only instance: the others were reclaimed
        info = i.get("initialize_info") or {}
        return {"instance": i["name"], "start_ms": i["start_ms"], "initialize_ms": i["initialize_ms"],
                "cold_start": info.get("cold_start")}
    import requests

    try:
        r = requests.get(run.url.rstrip("/") + "/healthz", headers=run.target.headers, timeout=30)
        body = r.json()
    except (requests.RequestException, ValueError):
        return None
    if body.get("instance_id") != row["instance"]:
        return {"instance": row["instance"], "cold_start": None, "note": "/healthz answered by another instance"}
    return {"instance": row["instance"], "cold_start": body.get("cold_start")}


def throughput(run: Run, *, rates: list[float], level_s: float, max_per_level: int, process: str, seed: int,
               out_dir: Path, command: str) -> dict[str, Any]:
    """A sweep of open-loop arrival rates, `level_s` seconds each (at most `max_per_level` requests), one
    after another on the same target (instances started by one level serve the next)."""
    offered = []
    for k, rate in enumerate(rates):
        start = run.now() + 0.05
        shape = Shape("constant", {"rate": rate}, level_s)
        times = arrivals(shape, process=process, seed=seed + k, start=start, max_requests=max_per_level)
        level = f"rate={rate:g}"
        offered.append({"level": level, "rate_rps": rate, "duration_s": level_s})
        run.send(times, level)
    config = {"rates": rates, "level_s": level_s, "max_per_level": max_per_level, "process": process, "seed": seed}
    return _finish("throughput", run, out_dir, command, config, offered=offered)


def autoscale(run: Run, *, shape: Shape, max_requests: int, process: str, seed: int, settle_s: float,
              out_dir: Path, command: str) -> dict[str, Any]:
    """One load shape over time; then `settle_s` seconds without load, so the report shows instances being
    reclaimed (local emulator)."""
    start = run.now() + 0.05
    times = arrivals(shape, process=process, seed=seed, start=start, max_requests=max_requests)
    run.send(times, shape.describe())
    if settle_s > 0:
        time.sleep(settle_s)
    step = shape.step_at()
    config = {"shape": shape.describe(), "duration_s": shape.duration, "max_requests": max_requests,
              "process": process, "seed": seed, "settle_s": settle_s}
    window = shape.duration if len(times) < max_requests or len(times) < 2 else times[-1] - start
    offered = [{"level": shape.describe(), "rate_rps": round(len(times) / window, 3) if window > 0 else None,
                "duration_s": round(window, 3)}]
    return _finish("autoscale", run, out_dir, command, config, offered=offered,
                   step_at_s=None if step is None else round(start + step, 3))


def default_instance_env(cfg: EmulatorConfig, spec: RequestSpec) -> dict[str, str]:
    """What s.yaml sets for an instance, adapted to this machine: FC's initializer warms the bench's request
    shape (and `--model`), the queue matches the instance concurrency, and the instances share the CPU cores
    (torch's threads, OMP_NUM_THREADS)."""
    threads = max(1, (os.cpu_count() or 1) // cfg.max_instances)
    env = {"SDFUNC_WARMUP__ON_START": "false", "SDFUNC_WARMUP__SHAPES": json.dumps([f"{spec.size}x{spec.size}@2"]),
           "SDFUNC_QUEUE__MAX_WAITING": str(max(0, cfg.instance_concurrency - 1)), "OMP_NUM_THREADS": str(threads),
           "SDFUNC_METRICS": "true", "SDFUNC_REQUEST_LOG": "true"}
    if spec.model:
        env["SDFUNC_WARMUP__CHECKPOINTS"] = json.dumps([spec.model])
    return env


def results_dir(root: Path, scenario: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / f"{scenario}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{scenario}-{stamp}-{n}"
    return path


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sdfunc-bench-"))


