"""Where a cold start's seconds go, measured once per process.

A cold start runs from the moment the server process started (the gunicorn master, which FC starts with
the container) to the end of the first image this worker made, warm-up or real. Its phases, in seconds:

- `process_to_app`: interpreter start, gunicorn boot, fork, the light imports and the app factory;
- `imports`: torch, diffusers, transformers and the pipeline classes, imported on first use;
- `device_init`: creating the device context (CUDA init and a first allocation; next to nothing on CPU);
- `read_weights`: reading checkpoints into memory (diffusers' single-file loader);
- `to_device`: moving the weights to the device;
- `first_generation`: the first generation (the warm-up's first, or the first request's without a warm-up);
- `prefetch` (background): the prefetch process reading and hashing the first checkpoints (pipelines.prefetch),
  from the server's start; it overlaps the others.

Under gunicorn the master does the heavy imports before it forks the worker (`warmup.preimport`): the first
worker's `imports` are the master's seconds (told by `MASTER_IMPORTS_ENV`), taken out of its `process_to_app`,
so that the foreground phases still add up. A worker that replaces a dead one starts its own count at its fork,
with the modules already imported.

`total` is the wall time from process start to the end of the first generation; it also holds the gaps
between phases (waiting for the first request, when nothing warmed the worker). `critical_path_seconds` is the
sum of the foreground phases (what the first image waited for, waiting for the prefetch counted in
`read_weights`); `overlapped_seconds` is the background time that ran behind them, hidden.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any

PHASES = ("process_to_app", "imports", "device_init", "read_weights", "to_device", "first_generation", "prefetch")
BACKGROUND = frozenset({"prefetch"})

# gunicorn's master sets this (epoch seconds) so that its workers measure from the server's start, not
# from their own fork.
STARTED_AT_ENV = "SDFUNC_PROCESS_STARTED_AT"
# ... and this (seconds) when it imported the heavy modules before forking its first worker.
MASTER_IMPORTS_ENV = "SDFUNC_MASTER_IMPORT_SECONDS"


def process_start_time(pid: int | None = None) -> float:
    """Epoch seconds at which process `pid` (default: this one) started; the time of this call where
    /proc is not available."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        ticks = int(fields[19])  # field 22, starttime, counted after the closing ")" of the command name
        with open("/proc/uptime") as f:
            boot = time.time() - float(f.read().split()[0])  # /proc/stat's btime is whole seconds: ~1 s off
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def server_start_time() -> float:
    """The server's start: what the gunicorn master recorded, else this process's start."""
    recorded = os.environ.get(STARTED_AT_ENV)
    try:
        return float(recorded) if recorded else process_start_time()
    except ValueError:
        return process_start_time()


class ColdStart:
    """Phase timings of this process's cold start. Thread-safe; phases recorded after `complete()` are
    ignored, so later model loads never rewrite the cold start."""

    def __init__(self, started_at: float | None = None) -> None:
        self.started_at = started_at if started_at is not None else server_start_time()
        self._phases: dict[str, float] = {}
        self._lock = threading.Lock()
        self._import_lock = threading.Lock()
        self._imported = False
        self._classes: set[str] = set()  # architectures whose pipeline classes are imported
        self._device_ready = False
        self._prefetch_waited = 0.0
        self.total: float | None = None
        self._master_imports = _env_seconds(MASTER_IMPORTS_ENV)
        if self._master_imports:
            self._phases["imports"] = self._master_imports

    @property
    def imported(self) -> bool:
        return self._imported

    @property
    def done(self) -> bool:
        return self.total is not None

    def record(self, phase: str, seconds: float) -> None:
        """Add `seconds` to `phase` (phases can repeat: two checkpoints read, two warm-up shapes)."""
        with self._lock:
            if self.total is None:
                self._phases[phase] = self._phases.get(phase, 0.0) + max(0.0, seconds)

    def app_ready(self) -> None:
        """The app factory is done: closes `process_to_app` (less the master's imports, which have their phase)."""
        self.record("process_to_app", time.time() - self.started_at - self._master_imports)

    def import_runtime(self, archs: Iterable[str] = ()) -> None:
        """Import torch, diffusers, transformers and our generation modules, and the pipeline classes of `archs`
        ("sd1", "sdxl"), timing it as `imports`. Idempotent and thread-safe: the first caller imports, the others
        wait for it; modules the gunicorn master imported cost nothing here."""
        with self._import_lock:
            wanted = set(archs) - self._classes
            if self._imported and not wanted:
                return
            started = time.perf_counter()
            import_runtime_modules(wanted)
            self.record("imports", time.perf_counter() - started)
            self._classes |= wanted
            self._imported = True

    def prefetch_waited(self, seconds: float) -> None:
        """A load waited `seconds` for the prefetch to finish its file (counted in `read_weights` too)."""
        with self._lock:
            if self.total is None:
                self._prefetch_waited += max(0.0, seconds)

    def prefetch_span(self, started: float, ended: float) -> None:
        """The prefetch has run from `started` to `ended` (epoch seconds) so far: the background phase
        `prefetch` (a later call, with more files read, replaces it)."""
        with self._lock:
            if self.total is None:
                self._phases["prefetch"] = max(0.0, ended - started)

    def init_device(self, device: str) -> None:
        """Create the context of `device` ("cpu" or "cuda[:n]"), timing it as `device_init`. Idempotent; run it
        on the device thread (the CUDA context belongs to the thread that uses it), after `import_runtime`."""
        if self._device_ready:
            return
        import torch

        started = time.perf_counter()
        if device.startswith("cuda"):
            torch.cuda.init()
            torch.zeros(1, device=device)
            torch.cuda.synchronize()
        else:
            torch.zeros(1)
        self.record("device_init", time.perf_counter() - started)
        self._device_ready = True

    def complete(self) -> bool:
        """Mark the cold start done (its first image exists). True only for the call that completed it."""
        with self._lock:
            if self.total is not None:
                return False
            self.total = time.time() - self.started_at
            return True

    def report(self) -> dict[str, Any]:
        """`{"complete", "total_seconds", "phases": {phase: seconds}, "critical_path_seconds",
        "overlapped_seconds"}`; phases not reached are absent."""
        with self._lock:
            phases = {name: self._phases[name] for name in PHASES if name in self._phases}
            total = self.total
            waited = self._prefetch_waited
        critical = sum(v for k, v in phases.items() if k not in BACKGROUND)
        hidden = sum(v for k, v in phases.items() if k in BACKGROUND) - waited
        return {"complete": total is not None, "total_seconds": round(total, 3) if total is not None else None,
                "phases": {k: round(v, 3) for k, v in phases.items()},
                "critical_path_seconds": round(critical, 3), "overlapped_seconds": round(max(0.0, hidden), 3)}


def import_runtime_modules(archs: Iterable[str]) -> None:
    """Import torch, diffusers, transformers, our generation and loading modules, and the pipeline classes of
    `archs` ("sd1", "sdxl"; diffusers imports them lazily: 1-2 s of CLIP code). Modules only: no tensor, no
    thread (the gunicorn master runs this before it forks)."""
    import pipelines.generate
    import pipelines.loading  # noqa: F401

    pipelines.generate.import_pipeline_classes(archs)


def _env_seconds(name: str) -> float:
    try:
        return max(0.0, float(os.environ.get(name) or 0.0))
    except ValueError:
        return 0.0
