"""Records overhead: what do the billing ledger and the image records cost per generation request, on SQLite
and on MariaDB, against the same request with recording off?

    python -m bench.records_overhead [--data DIR] [--records-dir DIR] [--rounds R] [--size 64] [--steps 1]
                                     [--batch 1] [--warmup-requests 2] [--shuffle-seed 0] [--threads T]
                                     [--request-id idempotency-key|fc-request-id]
                                     [--no-with-base64] [--no-mysql | --require-mysql] [--mysql-url URL]
                                     [--mysql-arg=--OPTION=VALUE ...] [--out FILE.json] [--markdown FILE]

No target: the figures are for the record (issue: "overhead of metering + ledger + records per request against
the same request with recording disabled, SQLite and MariaDB, as a ratio and in ms").

Method. In-process apps from `create_app(Settings(...))`, one per config, all on the same demo data folder
(demo-sd15), differing only in the records settings:

| config | settings |
|---|---|
| `off` (baseline) | `record_requests=False`: no ledger, no image records, no database |
| `sqlite` | a fresh SQLite file in the run's temp folder (WAL, synchronous=FULL: handler.records.db's defaults) |
| `sqlite+b64` | the same with `save_images_to_db=True` (each PNG's base64 in `generated_images`) |
| `mariadb` | a fresh database on a MariaDB server the benchmark starts (bench/harness/mariadb.py), over TCP to 127.0.0.1 |
| `mariadb+b64` | the same with `save_images_to_db=True` (a second fresh database) |

The MariaDB server runs with its defaults (InnoDB, redo log flushed at every commit) plus `--mysql-arg`s;
`--mysql-url` measures an existing MySQL / MariaDB database instead (both MariaDB configs then share it).

Everything else is the same in every config: auth mode `none` (consumer `anonymous`), a CPU price
(`billing.prices.cpu`, so every request is priced and gets its charge headers and `parameters.billing` - the
metering runs in `off` too), metrics on, request log off (no log line per request in any config), and one
device thread and one pipeline cache shared by all apps (the other apps' services are pointed at the first's
`device` and `_cache`), so that they run the very same model on the very same thread and differ in the
records code only.

Each app first serves `--warmup-requests` untimed requests (the first one migrates its database and loads the
model); then everything alive is frozen out of the garbage collector's view (`gc.freeze`), and a collection
runs between rounds, so that collections inside a timed request are rare and short. Then `--rounds` rounds; in each, every config serves one txt2img request (Euler, fixed seed, CFG 7,
`--size` square, `--steps`, `--batch` images) through `app.test_client()`, in an order shuffled per round
(seeded), each with a fresh request id in an `Idempotency-Key` header (`--request-id idempotency-key`, the
default) or in `x-fc-request-id` as FC sends it (`--request-id fc-request-id`). Either becomes the ledger's
request id; but the handler keeps the images (base64 in `generated_images`) of every request that carries an
Idempotency-Key, whatever `save_images_to_db` says, so with the default the `+b64` configs do the same work as
the others (the run says so), and `--request-id fc-request-id` is the way to measure records without the
images. Per request, with `perf_counter`:

- `total`: the whole test-client call (Flask, validation, generation, PNG, base64, ledger, JSON);
- `ledger`: the time spent inside the ledger code, measured directly: the service's `ledger.claim` (the
  duplicate check before generating: its enter and exit, not the generation it wraps), `ledger.record_success`
  (the ledger row and image rows in one transaction, committed before the response) and
  `ledger.record_failure` (never hit on success) are wrapped with timers in the benchmark process. The
  handler code is not changed.
- `pricing` (µs, every config): the metering's `pricing.charge`, wrapped the same way; it runs in `off` too,
  so it is not part of the overhead, and is reported beside it.

Per config: median and p90 of `total`, median and p90 of `ledger`, overhead = median(total) - median(total of
`off`) in ms, the ratio median(total) / median(total of `off`), a 95 % bootstrap interval of that overhead
(requests resampled as independent samples), the median of the per-round paired differences (each round's
request minus the same round's `off` request), and the ledger median as % of `off`'s median. The direct
`ledger` figure is the precise one; the `total` difference is what a client sees, with this machine's noise.
Stability: the rounds are cut into 4 blocks; when any config's slowest block median is over x1.25 its fastest
one, the run is marked UNSTABLE (rerun on a quiet machine).

Checks (a failed one makes the exit status 1): every request answered 200 with a charge; each recording
config's database holds exactly one succeeded ledger row per request sent to it (warm-up included, counted by
this run's request-id prefix) and `--batch` image rows per request, all with base64 in the `+b64` configs (in
the others the count is reported, not checked: the handler decides); claim and record_success ran once per
timed request and record_failure never; `off` has no database.

MariaDB: without mariadb-server (`mariadbd`, `mariadb-install-db`, `mariadb`), the run says so and measures
SQLite only, unless `--require-mysql` (then it is an error). Defaults (`--rounds 200`, 64x64, 1 step, 5
configs, 1000 timed requests of about 40 ms) take about a minute on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.harness.cli import add_output_arguments, run_benchmark
from bench.harness.report import finish, machine_line, result_header, table
from bench.harness.server import (
    CFG_SCALE,
    MODEL,
    PROMPT,
    SAMPLER,
    SEED,
    TXT2IMG,
    ensure_data,
    payload,
    quiet_app_loggers,
)
from bench.harness.stats import (
    BOOTSTRAP_RESAMPLES,
    DISTURBED_SPREAD,
    block_medians,
    bootstrap_interval,
    median_difference,
    spread,
    summary,
)

log = logging.getLogger("bench.records_overhead")

BASELINE = "off"
PRICE_CPU = "0.002"  # per second of generation: every request is priced, in every config
STABILITY_BLOCKS = 4
LEDGER_CALLS = ("claim", "record_success", "record_failure")
ID_HEADERS = {"idempotency-key": "Idempotency-Key", "fc-request-id": "x-fc-request-id"}  # --request-id -> header


@dataclass
class BenchConfig:
    """What one run measures. The defaults finish in about a minute on an idle 2-core CPU machine."""

    data: Path | None = None  # data root; demo-sd15 is written into a temp one when it has no checkpoint
    records_dir: Path | None = None  # where the SQLite files go (kept); None: the run's temp folder
    size: int = 64  # square txt2img; the smallest request is the worst case (the records cost is fixed)
    steps: int = 1
    batch: int = 1  # images per request (batch_size): one ledger row and `batch` image rows per request
    rounds: int = 200  # timed requests per config, one per round, order shuffled per round
    warmup_requests: int = 2  # untimed requests per config before the rounds (the first migrates and loads)
    shuffle_seed: int = 0  # seed of the per-round order
    request_id: str = "idempotency-key"  # the header carrying each request's fresh id: idempotency-key | fc-request-id
    threads: int | None = None  # torch threads; None = torch's default here
    with_base64: bool = True  # also the +b64 configs (save_images_to_db=True)
    mysql: bool = True  # measure MariaDB when it is installed (or at --mysql-url)
    require_mysql: bool = False  # no MariaDB is an error instead of a SQLite-only run
    mysql_url: str | None = None  # an existing MySQL/MariaDB database instead of a throwaway server
    mysql_args: tuple[str, ...] = ()  # extra mariadbd options for the throwaway server
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES


@dataclass
class Config:
    """One app under test."""

    name: str
    database: str | None  # None | sqlite | mariadb
    base64: bool = False
    url: str | None = None
    app: Any = None
    timer: LedgerTimer | None = None
    pricing: PricingTimer | None = None
    total_ms: list[float] = field(default_factory=list)
    ledger_ms: list[float] = field(default_factory=list)
    pricing_us: list[float] = field(default_factory=list)
    sent: int = 0  # txt2img requests sent, warm-up included
    failures: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# the timer around the ledger


class LedgerTimer:
    """Wraps one service's `Ledger` methods (on the instance; the class is untouched) and adds the seconds
    spent inside them to `seconds`; `calls` counts them. `claim` is a context manager around the whole
    generation: only its enter (the duplicate check) and exit (releasing the id) are timed."""

    def __init__(self, ledger: Any) -> None:
        self.seconds = 0.0
        self.calls = dict.fromkeys(LEDGER_CALLS, 0)
        claim, record_success, record_failure = ledger.claim, ledger.record_success, ledger.record_failure
        timer = self

        @contextlib.contextmanager
        def timed_claim(consumer: str, request_id: str) -> Iterator[None]:
            timer.calls["claim"] += 1
            cm = claim(consumer, request_id)
            started = time.perf_counter()
            try:
                cm.__enter__()
            finally:
                timer.seconds += time.perf_counter() - started
            try:
                yield
            except BaseException:
                started = time.perf_counter()
                try:
                    if not cm.__exit__(*sys.exc_info()):
                        raise
                finally:
                    timer.seconds += time.perf_counter() - started
            else:
                started = time.perf_counter()
                try:
                    cm.__exit__(None, None, None)
                finally:
                    timer.seconds += time.perf_counter() - started

        def timed(name: str, fn: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                timer.calls[name] += 1
                started = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    timer.seconds += time.perf_counter() - started
            return wrapper

        ledger.claim = timed_claim
        ledger.record_success = timed("record_success", record_success)
        ledger.record_failure = timed("record_failure", record_failure)

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = dict.fromkeys(LEDGER_CALLS, 0)


class PricingTimer:
    """Wraps one service's `pricing.charge` (the metering's price of a generation, which runs in every config,
    `off` included) and keeps the seconds of the last call."""

    def __init__(self, pricing: Any) -> None:
        self.seconds = 0.0
        charge = pricing.charge

        def timed_charge(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return charge(*args, **kwargs)
            finally:
                self.seconds = time.perf_counter() - started

        pricing.charge = timed_charge


# ---------------------------------------------------------------------------------------------------------
# statistics


def bootstrap_diff_interval(config: list[float], base: list[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = 0) -> tuple[float, float]:
    """95 % interval of median(config) - median(base), in ms, by resampling each side independently; seeded."""
    low, high = bootstrap_interval(config, base, median_difference, resamples=resamples, seed=seed)
    return round(low, 3), round(high, 3)


def summarize(cfg: BenchConfig, configs: list[Config]) -> dict[str, Any]:
    """Per config: total and ledger summaries, overhead against `off` (ms, ratio, interval, paired), and the
    stability of the block medians."""
    base = next(c for c in configs if c.name == BASELINE)
    base_median = statistics.median(base.total_ms)
    out: dict[str, Any] = {}
    worst = (1.0, "")
    for c in configs:
        median = statistics.median(c.total_ms)
        paired = [a - b for a, b in zip(c.total_ms, base.total_ms)]
        blocks = block_medians(c.total_ms, STABILITY_BLOCKS)
        blocks_spread = spread(blocks)
        if blocks_spread > worst[0]:
            worst = (blocks_spread, c.name)
        entry: dict[str, Any] = {
            "database": c.database, "base64": c.base64, "requests": len(c.total_ms),
            "total": summary(c.total_ms, tail=90), "ledger": summary(c.ledger_ms, tail=90),
            "rest": summary([t - led for t, led in zip(c.total_ms, c.ledger_ms)], tail=90),
            "pricing_us_median": round(statistics.median(c.pricing_us), 2),
            "block_medians_ms": blocks,
            "samples_ms": [round(x, 3) for x in c.total_ms],
            "ledger_samples_ms": [round(x, 3) for x in c.ledger_ms],
        }
        if c is not base:
            entry.update({
                "ratio": round(median / base_median, 4),
                "overhead_ms": round(median - base_median, 3),
                "overhead_ms_interval": list(bootstrap_diff_interval(c.total_ms, base.total_ms,
                                                                     resamples=cfg.bootstrap_resamples)),
                "paired_overhead_ms": round(statistics.median(paired), 3),
                "ledger_pct_of_off": round(statistics.median(c.ledger_ms) / base_median * 100.0, 3),
            })
        out[c.name] = entry
    return {"configs": out, "baseline": BASELINE, "baseline_median_ms": round(base_median, 3),
            "stability": {"worst_spread": round(worst[0], 3), "worst": worst[1], "threshold": DISTURBED_SPREAD,
                          "blocks": min(STABILITY_BLOCKS, cfg.rounds), "disturbed": worst[0] > DISTURBED_SPREAD}}


# ---------------------------------------------------------------------------------------------------------
# the apps


def plan_configs(cfg: BenchConfig, mysql_available: bool) -> list[Config]:
    """The configs this run measures, `off` first."""
    configs = [Config(BASELINE, None), Config("sqlite", "sqlite")]
    if cfg.with_base64:
        configs.append(Config("sqlite+b64", "sqlite", base64=True))
    if mysql_available:
        configs.append(Config("mariadb", "mariadb"))
        if cfg.with_base64:
            configs.append(Config("mariadb+b64", "mariadb", base64=True))
    return configs


def build_apps(configs: list[Config], data: Path, log_level: str) -> None:
    """One app per config; every service after the first shares the first one's device thread and pipeline
    cache, and each recording one gets a `LedgerTimer`."""
    from handler.app import create_app
    from handler.settings import Settings

    shared = None
    for c in configs:
        settings = Settings(
            data_dir=data, warmup={"on_start": False}, log_json=False, log_level=log_level,
            default_checkpoint=MODEL, metrics=True, request_log=False, billing={"prices": {"cpu": PRICE_CPU}},
            record_requests=c.database is not None, database_url=c.url, save_images_to_db=c.base64,
        )
        c.app = create_app(settings)
        service = c.app.extensions["sdfunc"]
        if shared is None:
            shared = service
        else:
            service.engine.device = shared.device  # one device thread (one OpenMP pool) ...
            service.engine._cache = shared.cache  # ... and one warm pipeline for every config
        if service.ledger is not None:
            c.timer = LedgerTimer(service.ledger)
        c.pricing = PricingTimer(service.pricing)


def _check_response(c: Config, r: Any) -> None:
    if r.status_code != 200:
        c.failures.append(f"{r.status_code}: {r.get_data(as_text=True)[:300]}")
    elif Decimal(r.headers.get("X-Charge", "0")) <= 0:
        c.failures.append(f"no charge: X-Charge={r.headers.get('X-Charge')!r}")


def send(c: Config, client: Any, body: dict[str, Any], key: str, header: str) -> tuple[float, float, float]:
    """One txt2img through the test client: (total ms, ledger ms, pricing µs)."""
    from handler.logs import set_request_id

    if c.timer is not None:
        c.timer.seconds = 0.0
    assert c.pricing is not None
    c.pricing.seconds = 0.0
    started = time.perf_counter()
    r = client.post(TXT2IMG, json=body, headers={header: key})
    total = time.perf_counter() - started
    set_request_id("-")  # the test client ran the request on this thread: the bench's own lines get no id
    c.sent += 1
    _check_response(c, r)
    return total * 1000.0, (c.timer.seconds * 1000.0 if c.timer is not None else 0.0), c.pricing.seconds * 1e6


def run_rounds(cfg: BenchConfig, configs: list[Config], prefix: str) -> list[list[str]]:
    """Warm every app, then the timed rounds in a shuffled order per round. Returns the orders."""
    body = payload(cfg.size, cfg.steps) | {"batch_size": cfg.batch}
    clients = {c.name: c.app.test_client() for c in configs}
    header = ID_HEADERS[cfg.request_id]
    for c in configs:
        for i in range(cfg.warmup_requests):
            total, ledger, _ = send(c, clients[c.name], body, f"{prefix}-{c.name}-w{i}", header)
            log.info("warm-up %-12s #%d: %7.1f ms (ledger %.1f ms)", c.name, i + 1, total, ledger)
        if c.timer is not None:
            c.timer.reset()
    rng = random.Random(cfg.shuffle_seed)
    orders = []
    # Everything alive after the warm-up (torch, the pipeline, the apps) leaves the collector's view, so that the
    # full collection between rounds is quick and one inside a request is rare and short.
    gc.collect()
    gc.freeze()
    try:
        _timed_rounds(cfg, configs, clients, body, header, prefix, rng, orders)
    finally:
        gc.unfreeze()
    return orders


def _timed_rounds(cfg: BenchConfig, configs: list[Config], clients: dict[str, Any], body: dict[str, Any],
                  header: str, prefix: str, rng: random.Random, orders: list[list[str]]) -> None:
    started = time.perf_counter()
    for r in range(cfg.rounds):
        order = list(configs)
        rng.shuffle(order)
        orders.append([c.name for c in order])
        gc.collect()  # between rounds, not inside a request
        for c in order:
            total, ledger, pricing = send(c, clients[c.name], body, f"{prefix}-{c.name}-{r}", header)
            c.total_ms.append(total)
            c.ledger_ms.append(ledger)
            c.pricing_us.append(pricing)
        if (r + 1) % max(1, cfg.rounds // 5) == 0 or r + 1 == cfg.rounds:
            log.info("round %d/%d (%.0f s): median total %s", r + 1, cfg.rounds, time.perf_counter() - started,
                     ", ".join(f"{c.name} {statistics.median(c.total_ms):.1f}" for c in configs))


# This run's rows, in the tables the app's migrations create (`ledger`: one row per generation request, `status`
# succeeded | failed; `generated_images`: one row per image, its base64 in `image_base64` when kept). Plain SQL on
# the config's database URL: the bench reads the records as any client of the database would.
COUNT_SQL = {
    "ledger_rows": "SELECT COUNT(*) FROM ledger WHERE request_id LIKE :mine AND status = 'succeeded'",
    "image_rows": "SELECT COUNT(*) FROM generated_images WHERE request_id LIKE :mine",
    "image_rows_with_base64": "SELECT COUNT(*) FROM generated_images WHERE request_id LIKE :mine "
                              "AND image_base64 IS NOT NULL",
}


def count_rows(c: Config, prefix: str) -> dict[str, int]:
    """This run's rows in a config's database, read with plain SQL on its URL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(c.url)
    try:
        with engine.connect() as conn:
            return {key: int(conn.execute(text(sql), {"mine": f"{prefix}-{c.name}-%"}).scalar_one())
                    for key, sql in COUNT_SQL.items()}
    finally:
        engine.dispose()  # before the MariaDB server stops


def make_checks(cfg: BenchConfig, configs: list[Config], prefix: str) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for c in configs:
        service = c.app.extensions["sdfunc"]
        check: dict[str, Any] = {"sent": c.sent, "failures": c.failures[:5], "failed": len(c.failures)}
        ok = not c.failures
        if c.database is None:
            check["database"] = None if service.db is None else service.db.dialect
            ok = ok and service.db is None and service.ledger is None
        else:
            counts = count_rows(c, prefix)
            calls = dict(c.timer.calls) if c.timer is not None else {}
            images = c.sent * cfg.batch
            # save_images_to_db=True must keep every image; without it the handler decides (it keeps those of
            # requests that carry an Idempotency-Key), so that count is reported, not checked.
            check.update(counts, ledger_calls=calls, expected={
                "ledger_rows": c.sent, "image_rows": images, "image_rows_with_base64": images if c.base64 else None,
                "ledger_calls": {"claim": cfg.rounds, "record_success": cfg.rounds, "record_failure": 0}})
            ok = (ok and counts["ledger_rows"] == c.sent and counts["image_rows"] == images
                  and (not c.base64 or counts["image_rows_with_base64"] == images)
                  and calls == check["expected"]["ledger_calls"])
        check["ok"] = bool(ok)
        if not ok:
            log.error("check %s failed: %s", c.name, check)
        checks[c.name] = check
    checks["ok"] = all(v["ok"] for v in checks.values())
    return checks


@contextlib.contextmanager
def mariadb_urls(cfg: BenchConfig, configs_wanted: int) -> Iterator[tuple[list[str], dict[str, Any]]]:
    """URLs of fresh databases for the MariaDB configs (empty when there are none), and what was used."""
    if not cfg.mysql:
        yield [], {"available": False, "reason": "--no-mysql"}
        return
    if cfg.mysql_url:
        yield [cfg.mysql_url] * configs_wanted, {"available": True, "server": "external",
                                                 "url": _redact(cfg.mysql_url)}
        return
    from bench.harness.mariadb import MariaDB, find_server

    if find_server() is None:
        reason = "mariadb-server is not installed (mariadbd, mariadb-install-db, mariadb)"
        if cfg.require_mysql:
            raise SystemExit(f"{reason} and --require-mysql was given")
        log.warning("%s: measuring SQLite only", reason)
        yield [], {"available": False, "reason": reason}
        return
    server = MariaDB(server_args=cfg.mysql_args)
    server.start()
    try:
        version = server.sql("SELECT VERSION()").strip()
        token = uuid.uuid4().hex[:8]
        urls = [server.create_database(f"bench_{token}_{i}") for i in range(configs_wanted)]
        yield urls, {"available": True, "server": "throwaway", "version": version, "transport": "tcp 127.0.0.1",
                     "server_args": list(cfg.mysql_args)}
    finally:
        server.stop()


def _redact(url: str | None) -> str | None:
    """A database URL with its password hidden (results and commands are published)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def redact_args(args: list[str]) -> list[str]:
    """The command line with the password of `--mysql-url` hidden."""
    out, hide_next = [], False
    for arg in args:
        if hide_next:
            out.append(_redact(arg) or arg)
        elif arg.startswith("--mysql-url="):
            out.append("--mysql-url=" + (_redact(arg.split("=", 1)[1]) or ""))
        else:
            out.append(arg)
        hide_next = arg == "--mysql-url"
    return out


def _device_threads(configs: list[Config]) -> int:
    import torch

    return configs[0].app.extensions["sdfunc"].device.run(torch.get_num_threads)


# ---------------------------------------------------------------------------------------------------------
# the whole run


def run(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Build the apps, warm them, time the rounds, check the rows. Returns the JSON-able result."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    default_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads
    torch.set_num_threads(threads)
    diffusers_logging.disable_progress_bar()
    started = time.perf_counter()
    result: dict[str, Any] = result_header(
        "records_overhead", command, cfg, {"model": MODEL, "sampler": SAMPLER, "seed": SEED, "cfg_scale": CFG_SCALE,
                                           "prompt": PROMPT, "threads": threads, "price_cpu": PRICE_CPU,
                                           "mysql_url": _redact(cfg.mysql_url)},
        threads, default_threads)
    prefix = f"rb-{uuid.uuid4().hex[:10]}"
    root_level = logging.getLevelName(logging.getLogger().level)
    configs: list[Config] = []
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdfunc-bench-")))
        data = Path(cfg.data).resolve() if cfg.data else work / "data"
        ensure_data(data)
        mysql_wanted = 2 if cfg.with_base64 else 1
        urls, result["mariadb"] = stack.enter_context(mariadb_urls(cfg, mysql_wanted))
        configs = plan_configs(cfg, bool(urls))
        records_dir = Path(cfg.records_dir).resolve() if cfg.records_dir else work
        records_dir.mkdir(parents=True, exist_ok=True)
        sqlite_files = iter(records_dir / f"{prefix}-{i}.sqlite3" for i in range(len(configs)))
        mysql_urls = iter(urls)
        for c in configs:
            if c.database == "sqlite":
                c.url = f"sqlite:///{next(sqlite_files)}"
            elif c.database == "mariadb":
                c.url = next(mysql_urls)
        stack.enter_context(quiet_app_loggers())
        try:
            build_apps(configs, data, root_level)
            result["device_thread_torch_threads"] = _device_threads(configs)
            log.info("configs: %s; %d rounds of %dx%d@%d, batch %d (torch threads on the device thread: %d)",
                     ", ".join(c.name for c in configs), cfg.rounds, cfg.size, cfg.size, cfg.steps, cfg.batch,
                     result["device_thread_torch_threads"])
            result["round_orders"] = run_rounds(cfg, configs, prefix)
            result["checks"] = make_checks(cfg, configs, prefix)
        finally:
            for c in configs:
                service = c.app.extensions["sdfunc"] if c.app is not None else None
                if service is not None and service.db is not None:
                    service.db.dispose()  # before the MariaDB server stops
    result["id_prefix"] = prefix
    result["configs"] = [{"name": c.name, "database": c.database, "save_images_to_db": c.base64,
                          "url": _redact(c.url), "sent": c.sent} for c in configs]
    kept = {name: check["image_rows_with_base64"] for name, check in result["checks"].items()
            if isinstance(check, dict) and "image_rows_with_base64" in check}
    result["images_kept_base64"] = kept
    unasked = [c.name for c in configs if c.database is not None and not c.base64 and kept.get(c.name)]
    if unasked:
        log.warning("%s kept the images' base64 although save_images_to_db is off (the handler keeps them for "
                    "requests with an Idempotency-Key): with --request-id %s, the +b64 configs measure the same "
                    "work; --request-id fc-request-id measures records without the images", ", ".join(unasked),
                    cfg.request_id)
    result["summary"] = summarize(cfg, configs)
    finish(result, time.perf_counter() - started)
    log_table(result)
    return result


# ---------------------------------------------------------------------------------------------------------
# report


def _rows(result: dict[str, Any]) -> list[list[str]]:
    s = result["summary"]
    rows = []
    for name, e in s["configs"].items():
        t, led = e["total"], e["ledger"]
        if name == s["baseline"]:
            extra = ["1 (baseline)", "-", "-", "-", "-"]
        else:
            lo, hi = e["overhead_ms_interval"]
            extra = [f"{e['ratio']:.4f}", f"{e['overhead_ms']:+.2f}", f"{lo:+.2f} .. {hi:+.2f}",
                     f"{e['paired_overhead_ms']:+.2f}", f"{e['ledger_pct_of_off']:.2f}"]
        rows.append([name, str(e["requests"]), f"{t['median_ms']:.2f}", f"{t['p90_ms']:.2f}",
                     f"{led['median_ms']:.2f}", f"{led['p90_ms']:.2f}", *extra])
    return rows


HEADERS = ["config", "n", "total median ms", "total p90 ms", "ledger median ms", "ledger p90 ms",
           "ratio vs off", "overhead ms", "95 % interval ms", "paired overhead ms", "ledger % of off"]


def log_table(result: dict[str, Any]) -> None:
    """The human table, on stderr through logging."""
    rows = [HEADERS, *_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    for r in rows:
        log.info("%s", "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))))
    stab = result["summary"]["stability"]
    if stab["disturbed"]:
        log.warning("UNSTABLE: block medians of %s spread x%.2f (> x%g); rerun on a quiet machine", stab["worst"],
                    stab["worst_spread"], stab["threshold"])


def markdown(result: dict[str, Any]) -> str:
    """The section RESULTS.md carries, from a result dict."""
    m, c, s = result["machine"], result["config"], result["summary"]
    stab, my = s["stability"], result["mariadb"]
    if my.get("available"):
        mysql = (f"MariaDB {my.get('version', '')} ({my['server']}"
                 + (f", {my['transport']}" if my.get("transport") else "")
                 + (", server options " + " ".join(f"`{a}`" for a in my["server_args"])
                    if my.get("server_args") else "")
                 + ")")
    else:
        mysql = f"MariaDB not measured: {my.get('reason')}"
    lines = [
        machine_line(result, f"torch threads {m['torch_threads']} (torch default here: {m['torch_default_threads']}; "
                             f"on the device thread: {result['device_thread_torch_threads']})"),
        "",
        f"Command: `{result['command']}`",
        "",
        f"In-process apps (test client), model {c['model']} (random weights), txt2img {c['size']}x{c['size']}, "
        f"{c['steps']} step(s), batch {c['batch']}, sampler {c['sampler']}, CFG {c['cfg_scale']}, seed {c['seed']}, "
        f"a fresh request id per request in `{ID_HEADERS[c['request_id']]}`; "
        f"{c['rounds']} rounds, one request per config per round in a shuffled order (seed {c['shuffle_seed']}), after "
        f"{c['warmup_requests']} untimed requests per config; request log off, metrics on and a CPU price in every "
        f"config; one shared device thread and pipeline. {mysql}. SQLite: WAL, synchronous=FULL.",
        "",
        *table(HEADERS, _rows(result), "l" + "r" * (len(HEADERS) - 1)),
        "",
        "`total`: the whole test-client call; `ledger`: time inside `ledger.claim` (enter and exit) + "
        "`ledger.record_success`, timed directly; overhead = median total - median total of `off`; the interval "
        "is a 95 % bootstrap of that difference over single requests; paired = median of the per-round "
        "differences; ledger % of off = median ledger / median total of `off`.",
        "",
        "Outside the ledger calls (median of total - ledger per request): "
        + ", ".join(f"{name} {e['rest']['median_ms']:.2f} ms" for name, e in s["configs"].items())
        + " (what the records cost beyond their own calls, e.g. garbage collection of their objects, shows here).",
        "",
        "Metering, in every config (`off` included, so not in the overhead): pricing a generation "
        "(`pricing.charge`, timed directly) takes a median of "
        + ", ".join(f"{e['pricing_us_median']:.0f} µs ({name})" for name, e in s["configs"].items())
        + "; the charge headers and `parameters.billing` are not timed apart.",
        "",
        f"Block medians of total ms ({stab['blocks']} blocks of consecutive rounds): "
        + "; ".join(f"{name} {', '.join(f'{x:.1f}' for x in e['block_medians_ms'])}"
                    for name, e in s["configs"].items())
        + f". Slowest / fastest block: x{stab['worst_spread']:.2f} ({stab['worst']})"
        + (" - UNSTABLE, rerun on a quiet machine" if stab["disturbed"] else "") + ".",
        "",
        "Checks (a failed one makes the exit status 1): " + "; ".join(_check_lines(result["checks"])) + ".",
    ]
    return "\n".join(lines) + "\n"


def _check_lines(checks: dict[str, Any]) -> list[str]:
    lines = []
    for name, check in checks.items():
        if name == "ok":
            continue
        verdict = "OK" if check["ok"] else "FAILED"
        if "ledger_rows" in check:
            lines.append(f"`{name}`: {check['sent']} requests, {check['ledger_rows']} ledger rows, "
                         f"{check['image_rows']} image rows ({check['image_rows_with_base64']} with base64"
                         + ("" if check["expected"]["image_rows_with_base64"] is not None else
                            ", save_images_to_db off")
                         + f"): {verdict}")
        else:
            lines.append(f"`{name}`: {check['sent']} requests, no database: {verdict}")
    return lines


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None, Path | None, str]:
    """(config, --out, --markdown, --log-level) from the command line."""
    p = argparse.ArgumentParser(prog="python -m bench.records_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="data root (demo-sd15 is written there if missing; default: a temp dir)")
    p.add_argument("--records-dir", type=Path,
                   help="keep the SQLite files here (default: in the run's temp folder, removed afterwards)")
    p.add_argument("--rounds", type=int, default=BenchConfig.rounds,
                   help="timed requests per config, one per round (default %(default)s)")
    p.add_argument("--size", type=int, default=BenchConfig.size, help="square size in pixels (default %(default)s)")
    p.add_argument("--steps", type=int, default=BenchConfig.steps, help="sampling steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=BenchConfig.batch,
                   help="images per request (batch_size; default %(default)s)")
    p.add_argument("--warmup-requests", type=int, default=BenchConfig.warmup_requests,
                   help="untimed requests per config before the rounds (default %(default)s)")
    p.add_argument("--shuffle-seed", type=int, default=BenchConfig.shuffle_seed,
                   help="seed of the per-round order (default %(default)s)")
    p.add_argument("--request-id", choices=sorted(ID_HEADERS), default=BenchConfig.request_id,
                   help="the header that carries each request's fresh id: Idempotency-Key (the handler then keeps "
                        "the images in the database) or x-fc-request-id, as FC sends it (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--with-base64", action=argparse.BooleanOptionalAction, default=BenchConfig.with_base64,
                   help="also measure save_images_to_db=True (sqlite+b64, mariadb+b64; default on)")
    p.add_argument("--mysql", action=argparse.BooleanOptionalAction, default=BenchConfig.mysql,
                   help="measure MariaDB when installed (default on; --no-mysql: SQLite only)")
    p.add_argument("--require-mysql", action="store_true",
                   help="fail instead of measuring SQLite only when mariadb-server is not installed")
    p.add_argument("--mysql-url", help="use this MySQL/MariaDB database (SQLAlchemy URL) instead of a throwaway "
                                       "server; rows are told apart by this run's Idempotency-Key prefix")
    p.add_argument("--mysql-arg", action="append", default=[], metavar="--OPTION=VALUE",
                   help="extra mariadbd option for the throwaway server (repeatable; --mysql-arg=--OPTION=VALUE)")
    p.add_argument("--bootstrap-resamples", type=int, default=BOOTSTRAP_RESAMPLES, help=argparse.SUPPRESS)
    add_output_arguments(p)
    a = p.parse_args(argv)
    if a.server_env:
        p.error("--server-env: this benchmark starts no sdfunc server (the apps are in-process)")
    if a.size < 64 or a.size % 8:
        p.error("--size: a multiple of 8, at least 64")
    if min(a.rounds, a.steps, a.batch, a.warmup_requests, a.bootstrap_resamples) < 1 or (
            a.threads is not None and a.threads < 1):
        p.error("--rounds, --steps, --batch, --warmup-requests and --threads must be at least 1")
    if a.require_mysql and not a.mysql:
        p.error("--require-mysql and --no-mysql contradict each other")
    cfg = BenchConfig(data=a.data, records_dir=a.records_dir, size=a.size, steps=a.steps, batch=a.batch,
                      rounds=a.rounds, warmup_requests=a.warmup_requests, shuffle_seed=a.shuffle_seed,
                      request_id=a.request_id,
                      threads=a.threads, with_base64=a.with_base64,
                      mysql=a.mysql, require_mysql=a.require_mysql, mysql_url=a.mysql_url,
                      mysql_args=tuple(a.mysql_arg), bootstrap_resamples=a.bootstrap_resamples)
    return cfg, a.out, a.markdown, a.log_level


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg, out, markdown_path, log_level = parse_args(args)
    result = run_benchmark("bench.records_overhead", redact_args(args), lambda command: run(cfg, command), markdown,
                           out=out, markdown_path=markdown_path, log_level=log_level)
    return 0 if result["checks"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
