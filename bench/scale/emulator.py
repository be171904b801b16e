"""A local stand-in for Function Compute's scheduler in front of one function, for benchmarking only.

Real scale-out happens on FC (or Knative); this exists so the bench and the function's lifecycle can be
exercised on one machine. It does what FC does for one function with an HTTP trigger:

- Each instance takes at most `instance_concurrency` requests at once. A request goes to a ready instance with
  a free slot (the busiest such, so idle ones can be reclaimed), else to a starting one with a free slot, else
  a new instance is started for it, up to `max_instances`; at the maximum the answer is 429
  (`ResourceThrottled`), as FC answers when it cannot get an instance.
- `provisioned` instances are started at once and never reclaimed. Other instances idle for `idle_timeout_s`
  are reclaimed: `GET /pre-stop` first, then SIGTERM.
- Before an instance's first request: `POST /initialize` (FC's initializer), with the instance's lifecycle key
  (the file the instance's worker writes, as `handler.security.lifecycle_key` keeps it) so it works with auth on.
- Every request gets an `x-fc-request-id`; the response says which instance served it
  (`X-Fc-Emulator-Instance`) and, when it had to wait for an instance to start, for how long
  (`X-Fc-Emulator-Start-Ms`).

Instances are real gunicorn processes running the real function (`GunicornInstance`), or, for scale studies
past this machine, simulated ones (`SimulatedInstance`) whose start and generation times are drawn from a
recorded profile (`bench.scale.profile`); their responses say `X-Simulated: true`.

Admin routes, under `/_emulator/`: `GET state` (instances, counters, times on the machine's monotonic clock,
which every process shares), `GET events` (the lifecycle log), `POST reclaim` (reclaim every idle
non-provisioned instance now, e.g. between cold-start repetitions).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.harness.server import free_port, lifecycle_headers
from bench.scale.profile import Profile, shape_key

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "host", "content-encoding"}
STARTING, READY, STOPPING, STOPPED, FAILED = "starting", "ready", "stopping", "stopped", "failed"
#: A 1x1 PNG, the image of a simulated response (so the bench checks its body the same way).
_TINY_PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")).decode()


SECRET_WORDS = ("AUTH", "KEY", "TOKEN", "PASSWORD", "SECRET", "USERS", "CREDENTIAL")


def masked_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the values of names that look secret replaced by ***, for reports."""
    return {k: ("***" if any(w in k.upper() for w in SECRET_WORDS) else v) for k, v in env.items()}


@dataclass
class EmulatorConfig:
    """FC's scaling knobs for one function, and how instances are made."""

    instance_concurrency: int = 1
    max_instances: int = 3
    provisioned: int = 0
    idle_timeout_s: float = 60.0  # FC reclaims idle on-demand instances after a few minutes; short for tests
    initialize: bool = True  # call POST /initialize before an instance's first request
    pre_stop: bool = True  # call GET /pre-stop before reclaiming
    start_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    data: Path | None = None  # the function's data folder (models); required for gunicorn instances
    workdir: Path | None = None  # instance logs and home folders
    instance_env: dict[str, str] = field(default_factory=dict)
    simulate: Profile | None = None  # simulated instances from this profile instead of gunicorn
    seed: int = 0


class InstanceFailed(RuntimeError):
    """An instance could not start or initialize."""


class Instance:
    """One function instance: its state, slots and times (monotonic seconds)."""

    kind = "base"

    def __init__(self, name: str, emulator: Emulator, *, provisioned: bool) -> None:
        self.name = name
        self.emulator = emulator
        self.provisioned = provisioned
        self.state = STARTING
        self.ready_event = asyncio.Event()
        self.in_flight = 0
        self.requests = 0
        self.spawned = time.monotonic()
        self.ready_at: float | None = None
        self.stopped_at: float | None = None
        self.start_ms: float | None = None
        self.initialize_ms: float | None = None
        self.idle_since = self.spawned
        self.busy_since: float | None = None
        self.busy_s = 0.0
        self.error = ""
        self.initialize_info: dict[str, Any] | None = None

    # -- slots
    def acquire(self) -> None:
        if self.in_flight == 0 and self.state == READY:  # a starting instance is busy from when it is ready
            self.busy_since = time.monotonic()
        self.in_flight += 1
        self.requests += 1

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            now = time.monotonic()
            self.idle_since = now
            if self.busy_since is not None:
                self.busy_s += now - self.busy_since
                self.busy_since = None

    def alive(self) -> bool:
        """The instance's process (if it has one) is running."""
        return False

    # -- lifecycle (subclasses)
    async def boot(self) -> None:
        """Start the process (or simulate it) and wait until it answers; sets start_ms."""
        raise NotImplementedError

    async def call_initialize(self) -> None:
        raise NotImplementedError

    async def call_pre_stop(self) -> None:
        raise NotImplementedError

    async def terminate(self) -> None:
        raise NotImplementedError

    async def forward(self, method: str, path_qs: str, headers: dict[str, str],
                      body: bytes) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    async def start(self) -> None:
        """Boot, then initialize (when configured); READY on success, FAILED (and the process gone) if not."""
        events = self.emulator.event
        try:
            await asyncio.wait_for(self._start(events), timeout=self.emulator.cfg.start_timeout_s)
            self.state = READY
            self.ready_at = time.monotonic()
            self.idle_since = self.ready_at
            if self.in_flight:
                self.busy_since = self.ready_at
            events(self.name, "ready")
        except BaseException as exc:  # a failed (or cancelled) start fails the requests waiting for it
            self.state = FAILED
            self.error = f"{type(exc).__name__}: {exc}"[:500]
            events(self.name, "failed", self.error)
            log.error("instance %s failed to start: %s", self.name, self.error)
            await asyncio.shield(self.terminate())
            self.stopped_at = time.monotonic()
            if not isinstance(exc, Exception):
                raise
        finally:
            self.ready_event.set()

    async def _start(self, events) -> None:
        t = time.monotonic()
        await self.boot()
        self.start_ms = (time.monotonic() - t) * 1000
        events(self.name, "health", f"{self.start_ms:.0f} ms")
        if self.emulator.cfg.initialize:
            t = time.monotonic()
            events(self.name, "initialize")
            await self.call_initialize()
            self.initialize_ms = (time.monotonic() - t) * 1000
            events(self.name, "initialized", f"{self.initialize_ms:.0f} ms")

    async def stop(self) -> None:
        """pre-stop (when configured), then end the process."""
        self.state = STOPPING
        if self.emulator.cfg.pre_stop:
            self.emulator.event(self.name, "pre-stop")
            try:
                await self.call_pre_stop()
            except Exception as exc:  # reclaim goes on: FC does not keep an instance whose hook failed
                self.emulator.event(self.name, "pre-stop failed", str(exc)[:200])
        await self.terminate()
        self.state = STOPPED
        self.stopped_at = time.monotonic()
        self.emulator.event(self.name, "stopped")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "provisioned": self.provisioned, "state": self.state,
            "spawned": self.spawned, "ready": self.ready_at, "stopped": self.stopped_at, "start_ms": self.start_ms,
            "initialize_ms": self.initialize_ms, "requests": self.requests, "in_flight": self.in_flight,
            "busy_s": self.busy_s + (time.monotonic() - self.busy_since if self.busy_since else 0.0),
            "error": self.error, "initialize_info": self.initialize_info,
        }


class GunicornInstance(Instance):
    """The real function: `python -m handler.cli serve` on a free loopback port, in its own process group."""

    kind = "gunicorn"

    def __init__(self, name: str, emulator: Emulator, *, provisioned: bool) -> None:
        super().__init__(name, emulator, provisioned=provisioned)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.home = (emulator.cfg.workdir or Path(".")) / name

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HOME=str(self.home), SDFUNC_LOG_JSON="true",
                   SDFUNC_DATABASE_URL=f"sqlite:///{self.home / 'records.sqlite3'}")
        env.update(self.emulator.cfg.instance_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _lifecycle_headers(self) -> dict[str, str]:
        """The instance's lifecycle key in its header, as FC's hooks (`sdfunc hook`) send it."""
        return lifecycle_headers(self.port)

    def log_tail(self) -> str:
        try:
            return (self.home / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    async def boot(self) -> None:
        import aiohttp

        if self.emulator.cfg.data is None:
            raise InstanceFailed("gunicorn instances need the data folder (--data)")
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "handler.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--data", str(self.emulator.cfg.data)]
        with open(self.home / "server.log", "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=self.home, env=self._env(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.emulator.event(self.name, "spawn", f"pid {self.proc.pid} port {self.port}")
        session = self.emulator.session
        while True:
            if self.proc.poll() is not None:
                raise InstanceFailed(f"exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                async with session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)

    async def call_initialize(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.emulator.cfg.start_timeout_s)
        async with self.emulator.session.post(f"{self.url}/initialize", headers=self._lifecycle_headers(),
                                              timeout=timeout) as r:
            body = await r.read()
            if r.status != 200:
                raise InstanceFailed(f"POST /initialize answered {r.status}: {body[:300]!r}")
            try:
                self.initialize_info = json.loads(body)
            except ValueError:
                self.initialize_info = None

    async def call_pre_stop(self) -> None:
        import aiohttp

        async with self.emulator.session.get(f"{self.url}/pre-stop", headers=self._lifecycle_headers(),
                                             timeout=aiohttp.ClientTimeout(total=120)) as r:
            await r.read()
            if r.status != 200:
                raise InstanceFailed(f"GET /pre-stop answered {r.status}")

    async def terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(600):  # gunicorn drains; 30 s, then SIGKILL
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)

    async def forward(self, method: str, path_qs: str, headers: dict[str, str],
                      body: bytes) -> tuple[int, dict[str, str], bytes]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.emulator.cfg.request_timeout_s)
        async with self.emulator.session.request(method, self.url + path_qs, headers=headers, data=body,
                                                 timeout=timeout) as r:
            return r.status, dict(r.headers), await r.read()


class SimulatedInstance(Instance):
    """A simulated instance: start and generation times drawn from a recorded profile; one device, so
    requests run one at a time in arrival order, as the real function's executor runs them."""

    kind = "simulated"

    def __init__(self, name: str, emulator: Emulator, *, provisioned: bool) -> None:
        super().__init__(name, emulator, provisioned=provisioned)
        self.profile = emulator.cfg.simulate
        self.rng = random.Random(f"{emulator.cfg.seed}-{name}")
        self.device = asyncio.Lock()

    async def boot(self) -> None:
        self.emulator.event(self.name, "spawn", "simulated")
        await asyncio.sleep(self.profile.sample("start_ms", self.rng) / 1000)

    async def call_initialize(self) -> None:
        await asyncio.sleep(self.profile.sample("initialize_ms", self.rng) / 1000)

    async def call_pre_stop(self) -> None:
        return None

    async def terminate(self) -> None:
        return None

    async def forward(self, method: str, path_qs: str, headers: dict[str, str],
                      body: bytes) -> tuple[int, dict[str, str], bytes]:
        common = {"X-Instance-Id": self.name, "X-Simulated": "true", "X-Cold-Start": "false",
                  "Content-Type": "application/json"}
        try:
            request = json.loads(body or b"{}")
            key = shape_key(request)
        except (ValueError, TypeError, AttributeError):
            return 422, common, b'{"error": "simulated instance: a JSON txt2img body"}'
        samples = self.profile.generation.get(key)
        if samples is None:
            detail = f"simulated instance: shape {key} is not in profile {self.profile.name}"
            return 422, common, json.dumps({"error": "shape_not_in_profile", "detail": detail}).encode()
        arrived = time.monotonic()
        async with self.device:
            queued = time.monotonic() - arrived
            gen_ms = self.rng.choice(samples["gen_ms"])
            await asyncio.sleep(gen_ms / 1000)
        overhead_ms = self.rng.choice(samples["overhead_ms"]) if samples.get("overhead_ms") else 0.0
        await asyncio.sleep(overhead_ms / 1000)
        total_ms = (time.monotonic() - arrived) * 1000
        images = int(request.get("batch_size", 1) or 1) * int(request.get("n_iter", 1) or 1)
        billed = max(1, round(gen_ms))
        out = {"images": [_TINY_PNG] * images, "info": "{}", "parameters": {
            "billing": {"billed_ms": billed, "generation_ms": gen_ms, "images": images, "device": "simulated"}}}
        timing = f"queue;dur={queued * 1000:.1f}, gen;dur={gen_ms:.1f}, total;dur={total_ms:.1f}"
        return 200, {**common, "X-Billed-Duration-Ms": str(billed), "Server-Timing": timing}, json.dumps(out).encode()


class Emulator:
    """The scheduler: instances, routing, reclaim, admin routes. Runs on one asyncio loop."""

    def __init__(self, cfg: EmulatorConfig) -> None:
        if cfg.instance_concurrency < 1 or cfg.max_instances < 1 or not 0 <= cfg.provisioned <= cfg.max_instances:
            raise ValueError("instance_concurrency >= 1, max_instances >= 1, 0 <= provisioned <= max_instances")
        self.cfg = cfg
        self.instances: list[Instance] = []
        self.events: list[dict[str, Any]] = []
        self.counters = {"requests": 0, "throttled": 0, "spawned": 0, "reclaimed": 0, "start_failures": 0}
        self._names = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._starts: dict[str, asyncio.Task] = {}
        self._reaper_task: asyncio.Task | None = None
        self.session = None
        self.started = time.monotonic()

    def event(self, instance: str, what: str, detail: str = "") -> None:
        self.events.append({"t": time.monotonic(), "instance": instance, "event": what, "detail": detail})
        log.info("%s %s %s", instance, what, detail)

    def _spawn(self, *, provisioned: bool) -> Instance:
        kind = SimulatedInstance if self.cfg.simulate is not None else GunicornInstance
        instance = kind(f"i{next(self._names)}", self, provisioned=provisioned)
        self.instances.append(instance)
        self.counters["spawned"] += 1
        self._starts[instance.name] = self._background(instance.start())
        return instance

    def _background(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def alive(self) -> list[Instance]:
        return [i for i in self.instances if i.state in (STARTING, READY, STOPPING)]

    def route(self) -> Instance | None:
        """An instance with a free slot (a slot is taken), a new one, or None at max_instances."""
        limit = self.cfg.instance_concurrency
        ready = [i for i in self.instances if i.state == READY and i.in_flight < limit]
        starting = [i for i in self.instances if i.state == STARTING and i.in_flight < limit]
        if ready:
            chosen = max(ready, key=lambda i: (i.in_flight, -i.spawned))
        elif starting:
            chosen = starting[0]
        elif len(self.alive()) < self.cfg.max_instances:
            chosen = self._spawn(provisioned=False)
        else:
            return None
        chosen.acquire()
        return chosen

    async def handle(self, method: str, path_qs: str, headers: dict[str, str],
                     body: bytes) -> tuple[int, dict[str, str], bytes]:
        """One client request, as FC's HTTP trigger would treat it."""
        self.counters["requests"] += 1
        request_id = headers.get("x-fc-request-id") or uuid.uuid4().hex
        out_headers = {"x-fc-request-id": request_id}
        instance = self.route()
        if instance is None:
            self.counters["throttled"] += 1
            body = json.dumps({"ErrorCode": "ResourceThrottled",
                               "ErrorMessage": f"all {self.cfg.max_instances} instances are busy"}).encode()
            return 429, {**out_headers, "Content-Type": "application/json"}, body
        arrived = time.monotonic()
        try:
            if instance.state == STARTING:
                await instance.ready_event.wait()
                out_headers["X-Fc-Emulator-Start-Ms"] = f"{(time.monotonic() - arrived) * 1000:.1f}"
            if instance.state != READY:
                self.counters["start_failures"] += 1
                body = json.dumps({"ErrorCode": "InstanceStartFailed",
                                   "ErrorMessage": f"instance {instance.name} did not start"}).encode()
                return 503, {**out_headers, "Content-Type": "application/json"}, body
            forward_headers = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            forward_headers["x-fc-request-id"] = request_id
            try:
                status, resp_headers, payload = await instance.forward(method, path_qs, forward_headers, body)
            except Exception as exc:  # the instance died or timed out: FC answers 502-ish, never hangs
                self.event(instance.name, "request failed", f"{type(exc).__name__}: {exc}"[:200])
                if instance.state == READY and not instance.alive():
                    instance.state = FAILED  # FC replaces a dead instance: no more requests go to it
                    instance.stopped_at = time.monotonic()
                    self.event(instance.name, "died")
                body = json.dumps({"ErrorCode": "FunctionNotReachable", "ErrorMessage": type(exc).__name__}).encode()
                return 502, {**out_headers, "Content-Type": "application/json"}, body
            resp_headers = {k: v for k, v in resp_headers.items() if k.lower() not in HOP_BY_HOP}
            resp_headers.update(out_headers)
            resp_headers["X-Fc-Emulator-Instance"] = instance.name
            return status, resp_headers, payload
        finally:
            instance.release()

    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        for _ in range(self.cfg.provisioned):
            self._spawn(provisioned=True)
        self._reaper_task = asyncio.create_task(self._reaper())

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for instance in list(self.instances):
                if (instance.state == READY and not instance.provisioned and instance.in_flight == 0
                        and now - instance.idle_since >= self.cfg.idle_timeout_s):
                    instance.state = STOPPING  # before the task runs: no request may be routed to it now
                    self._background(self._reclaim(instance, checked=True))

    async def _reclaim(self, instance: Instance, *, checked: bool = False) -> None:
        if not checked and (instance.state != READY or instance.in_flight):
            return
        self.counters["reclaimed"] += 1
        self.event(instance.name, "reclaim", f"idle {time.monotonic() - instance.idle_since:.1f} s")
        await instance.stop()

    async def reclaim_idle(self) -> int:
        """Reclaim every idle, ready, non-provisioned instance now; the number reclaimed."""
        idle = [i for i in self.instances if i.state == READY and not i.provisioned and i.in_flight == 0]
        for instance in idle:
            instance.state = STOPPING
        await asyncio.gather(*(self._reclaim(i, checked=True) for i in idle))
        return len(idle)

    async def close(self) -> None:
        """Stop every instance (pre-stop first) and the reaper."""
        if self._reaper_task is not None:
            self._reaper_task.cancel()
        for instance in self.instances:  # a start in progress is not waited for: it is cancelled and killed
            task = self._starts.get(instance.name)
            if instance.state == STARTING and task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in list(self._tasks) if t is not self._reaper_task), return_exceptions=True)
        await asyncio.gather(*(i.stop() for i in self.instances if i.state == READY), return_exceptions=True)
        for instance in self.instances:
            if instance.alive():
                await instance.terminate()
        if self.session is not None:
            await self.session.close()

    def state(self) -> dict[str, Any]:
        cfg = asdict(self.cfg)
        cfg.update(data=str(self.cfg.data) if self.cfg.data else None, workdir=str(self.cfg.workdir or ""),
                   instance_env=masked_env(self.cfg.instance_env),
                   simulate=self.cfg.simulate.name if self.cfg.simulate else None)
        return {"now": time.monotonic(), "started": self.started, "config": cfg, "counters": dict(self.counters),
                "alive": len(self.alive()), "instances": [i.as_dict() for i in self.instances]}


def make_app(emulator: Emulator):
    """The aiohttp application: admin routes under /_emulator/, everything else to an instance."""
    from aiohttp import web

    async def state(_request):
        return web.json_response(emulator.state())

    async def events(_request):
        return web.json_response(emulator.events)

    async def reclaim(_request):
        return web.json_response({"reclaimed": await emulator.reclaim_idle()})

    async def front(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()}
        status, out_headers, payload = await emulator.handle(request.method, request.path_qs, headers, body)
        return web.Response(status=status, headers=out_headers, body=payload)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/_emulator/state", state)
    app.router.add_get("/_emulator/events", events)
    app.router.add_post("/_emulator/reclaim", reclaim)
    app.router.add_route("*", "/{tail:.*}", front)
    return app


class EmulatorThread:
    """The emulator on its own event loop in a background thread, listening on 127.0.0.1 (`url`).

    Use as a context manager; leaving it stops every instance (pre-stop first)."""

    def __init__(self, cfg: EmulatorConfig, port: int = 0) -> None:
        self.cfg = cfg
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.emulator: Emulator | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="fc-emulator", daemon=True)
        self._runner = None

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        self.call(self._start())
        log.info("FC emulator on %s (%s instances, max %d, concurrency %d, idle timeout %g s)%s", self.url,
                 "simulated" if self.cfg.simulate else "gunicorn", self.cfg.max_instances,
                 self.cfg.instance_concurrency, self.cfg.idle_timeout_s,
                 "" if self.cfg.simulate else f"; instance logs in {self.cfg.workdir}")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def call(self, coro, timeout: float | None = None):
        """Run `coro` on the emulator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        from aiohttp import web

        self.emulator = Emulator(self.cfg)
        await self.emulator.start()
        self._runner = web.AppRunner(make_app(self.emulator), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.emulator is not None:
            await self.emulator.close()

    def state(self) -> dict[str, Any]:
        return self.call(self._state())

    async def _state(self) -> dict[str, Any]:
        return self.emulator.state()

    def events(self) -> list[dict[str, Any]]:
        return self.call(self._events())

    async def _events(self) -> list[dict[str, Any]]:
        return list(self.emulator.events)

    def reclaim_idle(self) -> int:
        return self.call(self.emulator.reclaim_idle())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self._close(), timeout=300)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
