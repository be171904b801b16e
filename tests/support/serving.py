"""`sdfunc serve` (real gunicorn) on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.harness.server import free_port, lifecycle_headers, stop_process_group
from tests.support.waiting import wait_for


class ServeProcess:
    """One server process (its own process group), logging JSON lines to `<data>/server-<port>.log`."""

    def __init__(self, data: Path, **env: str) -> None:
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data / f"server-{self.port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SDFUNC_")}
        full_env.update(SDFUNC_LOG_JSON="true", HOME=str(data), **env)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "handler.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--data", str(data)],
            cwd=data, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_answering(self, timeout: float = 240) -> dict[str, Any]:
        """Poll `GET /health` (liveness) until the server answers; returns that first body."""

        def answer() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                return requests.get(f"{self.url}/health", timeout=2).json()
            except requests.RequestException:
                return None

        return wait_for(answer, timeout, lambda: f"the server to answer:\n{self.log_tail()}", interval=0.05)

    def wait_state(self, *states: str, timeout: float = 240) -> dict[str, Any]:
        """Poll `GET /health` until its status is one of `states`."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}

        def in_state() -> dict[str, Any] | None:
            last["body"] = self.wait_answering(timeout=max(1.0, deadline - time.monotonic()))
            return last["body"] if last["body"]["status"] in states else None

        return wait_for(in_state, timeout, lambda: f"{states} (the server stayed "
                        f"{last.get('body', {}).get('status')}):\n{self.log_tail()}", interval=0.1)

    def workers(self) -> list[int]:
        """The gunicorn workers: the children of the master (`sdfunc serve` execs gunicorn in this process) but
        the prefetch process it starts beside them (pipelines.prefetch)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(c) for c in children if _is_worker(int(c))]

    def worker_pid(self, timeout: float = 60, other_than: int | None = None) -> int:
        """The gunicorn worker (the one child of the master); with `other_than`, one that is not that pid (the
        worker the master starts in place of a dead one)."""
        def fresh() -> int | None:
            return next((pid for pid in self.workers() if pid != other_than), None)

        return wait_for(fresh, timeout, lambda: f"a gunicorn worker:\n{self.log_tail()}", interval=0.05)

    def listener_inode(self) -> int:
        """The inode of the server's listening socket (from /proc/net/tcp; it exists while anyone holds it)."""
        local = f"0100007F:{self.port:04X}"
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":  # 0A: LISTEN
                return int(fields[9])
        raise AssertionError(f"nothing listens on 127.0.0.1:{self.port}")

    @staticmethod
    def polls(pid: int, inode: int) -> bool:
        """Whether process `pid` watches the socket `inode` in one of its epoll sets (Linux /proc fdinfo lists
        each watched file's inode). gunicorn's worker watches its listener exactly while it accepts connections:
        it drops it when it stops accepting on SIGTERM, then drains."""
        watched = re.compile(rf"^tfd:.*\bino:{inode:x}\b", re.M)
        for info in Path(f"/proc/{pid}/fdinfo").iterdir():
            try:
                if watched.search(info.read_text()):
                    return True
            except OSError:  # closed while we looked
                continue
        return False

    def hook_headers(self) -> dict[str, str]:
        """The header that opens this server's lifecycle hooks, as `sdfunc hook` sends it."""
        return lifecycle_headers(self.port)

    def log_entries(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        return json_log_entries(self.log_path)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log.close()


def _is_worker(pid: int) -> bool:
    """A child of the master that is a worker: alive, and not the prefetch process."""
    try:
        return b"pipelines.prefetch" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return False


def json_log_entries(path: Path) -> list[dict[str, Any]]:
    """The complete JSON log lines of a server's log file (a line still being written is left for the next
    read; gunicorn's own lines are plain text)."""
    text = path.read_text(errors="replace")
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.startswith('{"ts"')]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text with prometheus_client's own parser: {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0.0 when the series does not exist yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
