"""Soak run (issue 9, item 7): one served instance held at its maximum queue depth for minutes.

    .venv/bin/python -m bench.soak [--data DIR] [--minutes 5] [--size 64] [--steps 1] [--max-waiting 4]
                                   [--sample-seconds 5] [--rss-bound-mib 64] [--threads T] [--out FILE.json]
                                   [--markdown FILE]

One `sdfunc serve` (gunicorn, demo SD 1.5, queue `--max-waiting`) on 127.0.0.1 and `--max-waiting + 2` client
threads in a closed loop: one running, `--max-waiting` waiting and one more that the queue refuses (429), so
the instance stays at its maximum depth and its shedding path is exercised too. Every `--sample-seconds` the
worker process's RSS, threads and open file descriptors are read from /proc. After a warm-up minute (the
baseline of the same run: allocator and caches settle), the checks are:

- RSS growth from the end of the warm-up to the end at most `--rss-bound-mib` MiB (and the growth per 1000
  requests is reported);
- threads at the end no more than at the end of the warm-up, and so for file descriptors other than sockets
  and the records database's files; those two stay within their bounds (the clients' connections and the
  listener; 3 files per connection of SQLAlchemy's pool of at most 15);
- no stuck request: every request answered within its timeout, none left in flight; the server's
  `in_flight` and `queued` are 0 once the clients stop;
- no 5xx: every answer is 200 or 429.

The exit status is 1 when a check fails. Progress goes to stderr, the Markdown to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.cli import add_output_arguments, children, run_benchmark
from bench.harness.report import finish, machine_line, result_header, table
from bench.harness.server import TXT2IMG, Server, ensure_data, payload

log = logging.getLogger("bench.soak")
MIB = 1024 * 1024
DATABASE_SUFFIXES = (".sqlite3", ".sqlite3-wal", ".sqlite3-shm")  # the records database's pooled connections
POOL_CONNECTIONS = 15  # SQLAlchemy's QueuePool: pool_size 5 + max_overflow 10 (handler/records/db.py keeps the defaults)


@dataclass
class BenchConfig:
    data: Path | None = None
    minutes: float = 5.0
    warmup_minutes: float = 1.0
    size: int = 64
    steps: int = 1
    max_waiting: int = 4
    sample_seconds: float = 5.0
    rss_bound_mib: float = 64.0
    threads: int = 0
    timeout_s: float = 120.0


def worker_pid(master: int) -> int | None:
    """The gunicorn worker of `master` (its only child), from /proc."""
    workers = children(master)
    return workers[0] if workers else None


def sample(pid: int) -> dict[str, float]:
    """RSS (MiB), threads and open file descriptors of `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kib = int(fields["VmRSS"].split()[0])
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed in between
            continue
    sockets = sum(t.startswith("socket:") for t in targets)
    database = sum(t.endswith(DATABASE_SUFFIXES) for t in targets)
    return {"rss_mib": rss_kib / 1024, "threads": int(fields["Threads"]), "fds": len(targets),
            "socket_fds": sockets, "database_fds": database, "other_fds": len(targets) - sockets - database}


class Clients:
    """`n` closed-loop client threads, each with its own session, until `stop` is set."""

    def __init__(self, url: str, body: dict[str, Any], n: int, timeout: float) -> None:
        self.url, self.body, self.n, self.timeout = url, body, n, timeout
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.statuses: dict[str, int] = {}
        self.latencies: list[float] = []
        self.in_flight = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(n)]

    def _loop(self, i: int) -> None:
        import requests

        session = requests.Session()
        seed = 1000 * i
        while not self.stop.is_set():
            seed += 1
            with self.lock:
                self.in_flight += 1
            started = time.perf_counter()
            try:
                r = session.post(self.url + TXT2IMG, json={**self.body, "seed": seed}, timeout=self.timeout)
                key = str(r.status_code)
                if r.status_code == 429:
                    time.sleep(float(r.headers.get("Retry-After", "0.2")) / 10)  # keep knocking, not spinning
            except requests.RequestException as exc:
                key = type(exc).__name__
                with self.lock:
                    self.failures.append(f"{key}: {exc}"[:200])
            with self.lock:
                self.in_flight -= 1
                self.statuses[key] = self.statuses.get(key, 0) + 1
                if key == "200":
                    self.latencies.append(time.perf_counter() - started)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> bool:
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout + 10)
        return not any(t.is_alive() for t in self.threads)

    def answered(self) -> int:
        with self.lock:
            return sum(self.statuses.values())


def run(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    import requests
    import torch

    work = Path(tempfile.mkdtemp(prefix="sdfunc-soak-"))
    data = cfg.data or work / "data"
    ensure_data(data)
    threads = cfg.threads or torch.get_num_threads()
    env = (("SDFUNC_QUEUE__MAX_WAITING", str(cfg.max_waiting)),
           ("SDFUNC_WARMUP__SHAPES", json.dumps([f"{cfg.size}x{cfg.size}@{cfg.steps}"])),
           ("SDFUNC_REQUEST_LOG", "false"))
    result = result_header("soak", command, cfg, {"clients": cfg.max_waiting + 2}, threads, torch.get_num_threads())
    server = Server(data, work, warmup=True, threads=threads, name="soak", extra_env=env)
    server.start()
    try:
        session = requests.Session()
        server.wait_health(session, until=("READY",), timeout=300)
        pid = worker_pid(server.proc.pid)
        if pid is None:
            raise RuntimeError("no gunicorn worker found")
        clients = Clients(server.url, payload(cfg.size, cfg.steps), cfg.max_waiting + 2, cfg.timeout_s)
        clients.start()
        started = time.monotonic()
        end = started + cfg.minutes * 60
        samples: list[dict[str, float]] = []
        while time.monotonic() < end:
            point = {"t": round(time.monotonic() - started, 1), "requests": clients.answered(), **sample(pid)}
            samples.append(point)
            log.info("t=%5.0f s  requests %6d  rss %.1f MiB  threads %d  fds %d", point["t"], point["requests"],
                     point["rss_mib"], point["threads"], point["fds"])
            time.sleep(min(cfg.sample_seconds, max(0.0, end - time.monotonic())))
        joined = clients.join()
        samples.append({"t": round(time.monotonic() - started, 1), "requests": clients.answered(), **sample(pid)})
        health = session.get(server.url + "/health", timeout=10).json()
    finally:
        server.stop()
    finish(result, time.monotonic() - started)
    result["samples"] = samples
    result["statuses"] = clients.statuses
    result["failures"] = clients.failures[:20]
    result["summary"] = summarize(cfg, samples, clients, joined, health)
    return result


def summarize(cfg: BenchConfig, samples: list[dict[str, float]], clients: Clients, joined: bool,
              health: dict[str, Any]) -> dict[str, Any]:
    warm = [s for s in samples if s["t"] >= cfg.warmup_minutes * 60] or samples[-1:]
    base, last = warm[0], samples[-1]
    growth = last["rss_mib"] - base["rss_mib"]
    requests_after = max(1, last["requests"] - base["requests"])
    lat = sorted(clients.latencies)
    five_xx = sum(n for code, n in clients.statuses.items() if code.startswith("5"))
    other = sum(n for code, n in clients.statuses.items() if code not in ("200", "429") and not code.startswith("5"))
    checks = {
        "rss_growth_within_bound": growth <= cfg.rss_bound_mib,
        "threads_not_growing": last["threads"] <= base["threads"],
        # Sockets and the database's pooled connections come and go within their bounds (the clients'
        # keep-alive connections and the listener; the pool); every other descriptor must not grow.
        "fds_not_growing": last["other_fds"] <= base["other_fds"],
        "sockets_bounded": max(s["socket_fds"] for s in samples) <= clients.n + 2,
        "database_fds_bounded": max(s["database_fds"] for s in samples) <= 3 * POOL_CONNECTIONS,
        "no_stuck_request": joined and clients.in_flight == 0 and not clients.failures,
        "server_idle_after": health.get("in_flight") == 0 and health.get("queued") == 0,
        "no_5xx": five_xx == 0 and other == 0,
    }
    return {
        "requests": last["requests"], "ok": clients.statuses.get("200", 0), "shed_429": clients.statuses.get("429", 0),
        "five_xx": five_xx, "other": other,
        "rss_start_mib": round(samples[0]["rss_mib"], 1), "rss_base_mib": round(base["rss_mib"], 1),
        "rss_end_mib": round(last["rss_mib"], 1), "rss_max_mib": round(max(s["rss_mib"] for s in samples), 1),
        "rss_growth_mib": round(growth, 1), "rss_end_over_base": round(last["rss_mib"] / base["rss_mib"], 4),
        "rss_growth_kib_per_1000": round(growth * 1024 * 1000 / requests_after, 1),
        "threads_base": base["threads"], "threads_end": last["threads"],
        "threads_max": max(s["threads"] for s in samples),
        **{f"{kind}_{at}": value for kind in ("fds", "other_fds", "socket_fds", "database_fds")
           for at, value in (("base", base[kind]), ("end", last[kind]), ("max", max(s[kind] for s in samples)))},
        "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "max_s": round(lat[-1], 3) if lat else None,
        "checks": checks, "ok_all": all(checks.values()),
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    cfg = result["config"]
    lines = [machine_line(result, f"torch threads {result['machine']['torch_threads']}"), "",
             f"Command: `{result['command']}`", "",
             f"{cfg['minutes']:g} min at queue depth {cfg['max_waiting']} + 1 running ({cfg['clients']} clients), "
             f"{cfg['size']}x{cfg['size']}, {cfg['steps']} step(s); baseline = the sample at "
             f"{cfg['warmup_minutes']:g} min.", "",
             *table(["requests", "200", "429", "5xx", "other", "p50 s", "max s"],
                    [[s["requests"], s["ok"], s["shed_429"], s["five_xx"], s["other"], s["p50_s"], s["max_s"]]]),
             "",
             *table(["", "start", "baseline", "end", "max", "end / baseline"], [
                 ["RSS MiB", s["rss_start_mib"], s["rss_base_mib"], s["rss_end_mib"], s["rss_max_mib"],
                  f"x{s['rss_end_over_base']} (+{s['rss_growth_mib']} MiB, {s['rss_growth_kib_per_1000']} KiB per "
                  "1000 requests)"],
                 *([label, "-", s[f"{kind}_base"], s[f"{kind}_end"], s[f"{kind}_max"], "-"]
                   for label, kind in (("threads", "threads"), ("open fds", "fds"), ("of which sockets", "socket_fds"),
                                       ("of which database files", "database_fds"), ("other fds", "other_fds"))),
             ]),
             ""]
    lines += [f"- {name}: {'OK' if ok else 'FAIL'}" for name, ok in s["checks"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None, Path | None, str]:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--warmup-minutes", type=float, default=1.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--max-waiting", type=int, default=4)
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--rss-bound-mib", type=float, default=64.0)
    p.add_argument("--threads", type=int, default=0)
    add_output_arguments(p)
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.warmup_minutes < 0 or a.warmup_minutes >= a.minutes or a.max_waiting < 0:
        p.error("--minutes > --warmup-minutes >= 0, --max-waiting >= 0")
    cfg = BenchConfig(data=a.data, minutes=a.minutes, warmup_minutes=a.warmup_minutes, size=a.size, steps=a.steps,
                      max_waiting=a.max_waiting, sample_seconds=a.sample_seconds, rss_bound_mib=a.rss_bound_mib,
                      threads=a.threads)
    return cfg, a.out, a.markdown, a.log_level


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    cfg, out, md, level = parse_args(args)
    result = run_benchmark("bench.soak", args, lambda command: run(cfg, command), markdown, out=out,
                           markdown_path=md, log_level=level)
    return 0 if result["summary"]["ok_all"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
