"""The server under test: `python -m handler.cli serve` (gunicorn) on a free loopback port, and the request the
benchmarks send it.

Contract:

- `Server(data, workdir, warmup=..., threads=..., name=...)`: one server process in its own process group (its
  own session), logging to `workdir/server-<name>.log`, environment = this process's minus `SDFUNC_*`, plus
  HOME = `workdir`, OMP_NUM_THREADS = `threads`, JSON logs, warm-up at start on or off, the default checkpoint
  `MODEL`, then `extra_env`. `start()` returns the `perf_counter` at `Popen`; `wait_health()` polls `/health`
  (raising, with the log's tail, when the process exits, warm-up fails or time runs out); `stop()` is SIGTERM
  to the group (gunicorn drains), SIGKILL after 30 s. `running_server(...)` stops it on the way out.
- `stop_process_group(proc)`: that stop for any process that leads its own group (tests use it too).
- `ensure_data(data)`: the demo checkpoints under `data`, written by `sdfunc demo-models` in a subprocess when
  demo-sd15 is missing.
- `payload(size, steps)`: the txt2img body every scenario sends (MODEL's default checkpoint, PROMPT, SEED,
  SAMPLER, CFG_SCALE, one image); `post(...)` / `post_txt2img(...)`: one timed call, non-200 raises.
- `decode_first_image(body)`, `max_pixel_diff(a, b)`: to check that two ways made the same image.
- `quiet_app_loggers()`: an in-process app (`create_app` in the bench process) logs warnings only meanwhile.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.harness.cli import children, thread_cpu
from bench.harness.stats import ms

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
MODEL = "demo-sd15"
PROMPT = "a red house by a lake, oil painting"
SEED = 1234
SAMPLER = "Euler"
CFG_SCALE = 7.0
TXT2IMG = "/sdapi/v1/txt2img"
REQUEST_TIMEOUT = 600.0  # seconds one served call may take


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payload(size: int, steps: int) -> dict[str, Any]:
    """The txt2img request every served/app call sends (the A1111 API's defaults otherwise)."""
    return {"prompt": PROMPT, "negative_prompt": "", "steps": steps, "width": size, "height": size, "seed": SEED,
            "sampler_name": SAMPLER, "cfg_scale": CFG_SCALE, "batch_size": 1, "n_iter": 1}


def ensure_data(data: Path) -> Path:
    """`data/models/Stable-diffusion/demo-sd15.safetensors`, written by `sdfunc demo-models` when missing.

    In a subprocess on purpose: torch work on this process's main thread would grow a second OpenMP pool
    beside the device thread's, which makes every in-process generation 2-3x slower on CPU."""
    checkpoints = data / "models" / "Stable-diffusion"
    path = checkpoints / f"{MODEL}.safetensors"
    if not path.exists():
        log.info("writing the demo checkpoints into %s", checkpoints)
        subprocess.run([sys.executable, "-m", "handler.cli", "demo-models", "--data", str(data)], check=True)
    return path


def decode_first_image(body: dict[str, Any]):
    """The first image of an A1111 JSON answer, decoded (PIL)."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    image.load()
    return image


def max_pixel_diff(a, b) -> int:
    """The largest difference of one RGB channel between two images (255 when their sizes differ)."""
    import numpy as np

    if a.size != b.size:
        return 255
    pixels_a = np.asarray(a.convert("RGB"), dtype=np.int16)
    return int(np.abs(pixels_a - np.asarray(b.convert("RGB"), dtype=np.int16)).max())


# Where an instance keeps its lifecycle key, as handler.security.lifecycle_key writes it (the bench may not import
# the handler's inside): the worker serving a port writes a random key to <temp dir>/sdfunc-lifecycle-<port>.key
# (mode 0600), and the lifecycle hooks (`POST /initialize`, `GET /pre-stop`) accept it in this header, in every
# auth mode. A change there must be made here too; the hooks' end-to-end tests fail when the two disagree.
LIFECYCLE_HEADER = "X-Sdfunc-Lifecycle-Key"


def lifecycle_headers(port: int) -> dict[str, str]:
    """The lifecycle key of the instance serving `port` in its header, as FC's hooks (`sdfunc hook`) send it;
    none when no key was written (the server has not started)."""
    try:
        key = (Path(tempfile.gettempdir()) / f"sdfunc-lifecycle-{port}.key").read_text().strip()
    except FileNotFoundError:
        return {}
    return {LIFECYCLE_HEADER: key} if key else {}


class Server:
    """`python -m handler.cli serve` on a free loopback port, in its own process group, logging to a file."""

    def __init__(self, data: Path, workdir: Path, *, warmup: bool, threads: int, name: str,
                 extra_env: tuple[tuple[str, str], ...] = (), checkout: Path = REPO,
                 python: str = sys.executable) -> None:
        self.data = data
        self.checkout = checkout  # whose handler/ and pipelines/ are served (another checkout for A/B runs)
        self.python = python
        self.extra_env = dict(extra_env)
        self.workdir = workdir
        self.warmup = warmup
        self.threads = threads
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDFUNC_")}
        env.update(
            HOME=str(self.workdir), OMP_NUM_THREADS=str(self.threads),
            SDFUNC_WARMUP__ON_START="true" if self.warmup else "false", SDFUNC_LOG_JSON="true",
            SDFUNC_DEFAULT_CHECKPOINT=MODEL,
        )
        env.update(self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.checkout), env.get("PYTHONPATH", "")) if p)
        return env

    def start(self) -> float:
        """Start the process; returns the `perf_counter` at `Popen`."""
        argv = [self.python, "-m", "handler.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--data", str(self.data)]
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=self.workdir, env=self.env(), stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.info("started server %s (pid %d, warm-up %s) on %s", self.name, self.proc.pid,
                 "on" if self.warmup else "off", self.url)
        return self.started_at

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def wait_health(self, session, *, until: tuple[str, ...] | None, timeout: float) -> tuple[float, str]:
        """Poll /health every 20 ms until it answers (and, with `until`, until its status is one of those).
        Returns (seconds since `Popen`, status)."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited early:\n{self._log_tail()}")
            try:
                r = session.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    status = r.json().get("status", "?")
                    if status == "SETUP_FAILED":
                        raise RuntimeError(f"server {self.name} warm-up failed:\n{self._log_tail()}")
                    if until is None or status in until:
                        return time.perf_counter() - self.started_at, status
            except requests.RequestException:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"server {self.name} did not answer /health in {timeout:.0f} s:\n{self._log_tail()}")

    def worker_pids(self) -> list[int]:
        """The gunicorn workers (children of the master this object started); empty when it is not running."""
        return [] if self.proc is None else children(self.proc.pid)

    def worker_thread_cpu(self) -> list[dict[str, Any]] | None:
        """CPU seconds of each thread of the gunicorn worker that used more than 0.5 s (Linux /proc; None
        elsewhere). Generation on several HTTP threads shows as several busy threads (each with its own
        OpenMP team); one generation thread shows as one plus its OpenMP helpers."""
        if self.proc is None:
            return None
        try:
            return thread_cpu(self.worker_pids())
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process_group(self.proc)
        self._log_file.close()
        log.info("stopped server %s", self.name)
        self.proc = None


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group led by `proc` (gunicorn drains), SIGKILL it after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def running_server(data: Path, workdir: Path, *, warmup: bool, threads: int, name: str,
                   extra_env: tuple[tuple[str, str], ...] = ()) -> Iterator[Server]:
    """A `Server` (not started: the caller times its start) that is stopped on the way out."""
    server = Server(data, workdir, warmup=warmup, threads=threads, name=name, extra_env=extra_env)
    try:
        yield server
    finally:
        server.stop()


def post(session, url: str, path: str, body: dict[str, Any] | None,
         timeout: float = REQUEST_TIMEOUT, headers: dict[str, str] | None = None) -> tuple[float, Any]:
    """POST and wait for the whole body: (milliseconds, response). Non-200 raises."""
    started = time.perf_counter()
    r = session.post(url + path, json=body, timeout=timeout, headers=headers)
    elapsed = time.perf_counter() - started
    if r.status_code != 200:
        raise RuntimeError(f"POST {path} -> {r.status_code}: {r.text[:500]}")
    return ms(elapsed), r


def post_txt2img(session, url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """One served call: (milliseconds until the whole body arrived, parsed body). Non-200 raises."""
    elapsed, r = post(session, url, TXT2IMG, body)
    return elapsed, r.json()


@contextmanager
def quiet_app_loggers() -> Iterator[None]:
    """No service or pipeline lines from an in-process app (`create_app` in the bench process), and the root
    level as it was afterwards (create_app sets it)."""
    root, names = logging.getLogger(), ("handler", "pipelines")
    saved = root.level, {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)
