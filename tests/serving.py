"""`sdfunc serve` (real gunicorn) on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.harness.server import stop_process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                return requests.get(f"{self.url}/health", timeout=2).json()
            except requests.RequestException:
                time.sleep(0.05)
        raise AssertionError(f"server did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def wait_state(self, *states: str, timeout: float = 240) -> dict[str, Any]:
        """Poll `GET /health` until its status is one of `states`."""
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.wait_answering(timeout=max(1.0, deadline - time.monotonic()))
            if body["status"] in states:
                return body
            time.sleep(0.1)
        raise AssertionError(f"server stayed {body.get('status')}, wanted {states}:\n{self.log_tail()}")

    def worker_pid(self, timeout: float = 60) -> int:
        """The gunicorn worker: the one child of the master (`sdfunc serve` execs gunicorn in this process)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.05)
        raise AssertionError("no gunicorn worker")

    def log_entries(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        return [json.loads(line) for line in self.log_path.read_text(errors="replace").splitlines()
                if line.startswith('{"ts"')]

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log.close()


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
