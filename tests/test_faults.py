"""Faults, each proven: out of device memory, a corrupt checkpoint, the records database down (MariaDB and
SQLite), the outputs mount full, SIGKILL of the worker and SIGTERM of the server mid-request (real gunicorn).

Every test ends by checking the records it left: each succeeded ledger row has exactly its image rows, each
failed row has neither images nor a charge, and no image row lacks its ledger row (`assert_records_agree`).
Already proven elsewhere and not repeated here: OOM -> 503 (test_http_txt2img), a read-only outputs folder
(test_outputs), the database lost mid-generation (test_records), SIGKILL inside the commit (test_e2e_ledger_kill),
pre-stop draining (test_e2e_lifecycle)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, func, select

from handler.records.db import generated_images, ledger
from tests.conftest import REQUIRE_MYSQL, TINY, close_apps, linked_data_root, make_settings, wait_for
from tests.serving import ServeProcess, metric, metric_samples

PRICE = {"prices": {"cpu": "0.01"}}


# helpers ----------------------------------------------------------------------------------------------------
def assert_records_agree(url: str) -> dict[str, dict]:
    """The ledger and the image records agree (see the module docstring); returns {request_id: ledger row}."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            images = {(c, r): n for c, r, n in conn.execute(
                select(generated_images.c.consumer, generated_images.c.request_id, func.count())
                .group_by(generated_images.c.consumer, generated_images.c.request_id)).all()}
            rows = [dict(r._mapping) for r in conn.execute(select(ledger).order_by(ledger.c.id))]
    finally:
        engine.dispose()
    for row in rows:
        count = images.pop((row["consumer"], row["request_id"]), 0)
        if row["status"] == "succeeded":
            assert row["images"] >= 1 and count == row["images"] and row["billed_ms"] >= 1, row
        else:
            assert row["status"] == "failed" and count == 0, row
            assert row["billed_ms"] == 0 and row["amount_nanos"] == 0 and row["images"] == 0, row
    assert not images, f"image records without their ledger row: {images}"
    return {row["request_id"]: row for row in rows}


def build(root: Path, **overrides):
    from handler.app import create_app

    overrides.setdefault("database_url", f"sqlite:///{root / 'records.sqlite3'}")
    return create_app(make_settings(root, billing=PRICE, **overrides))


@pytest.fixture
def apps():
    """Apps a test builds; their task runners and database connections are closed afterwards."""
    made: list = []
    yield made
    close_apps(made)


@pytest.fixture
def root(tmp_path, data_dir) -> Path:
    """A data root of the test's own with the demo checkpoints linked in (its ledger starts empty)."""
    return linked_data_root(data_dir, tmp_path / "data")


def txt2img(client, key: str, checkpoint: str | None = None, **body):
    """POST a tiny txt2img whose ledger id is `key` (the request id)."""
    if checkpoint is not None:
        body["override_settings"] = {"sd_model_checkpoint": checkpoint}
    return client.post("/sdapi/v1/txt2img", json={**TINY, **body}, headers={"x-fc-request-id": key})


def assert_not_charged(r, status: int, code: str) -> None:
    assert r.status_code == status, r.get_json()
    error = r.get_json()["error"]
    assert error["code"] == code and "Traceback" not in error["message"]
    assert r.headers["X-Charge"] == "0" and r.headers["X-Billed-Duration-Ms"] == "0"


def names(models) -> list[str]:
    return sorted(m.entry.name for m in models)


def pngs(root: Path) -> set[Path]:
    return set((root / "outputs").rglob("*.png"))


# 1. out of device memory ------------------------------------------------------------------------------------
def test_out_of_memory_while_generating_trims_the_cache_and_charges_nothing(root, apps, monkeypatch, caplog):
    import torch

    import pipelines.generate

    app = build(root)
    apps.append(app)
    service, client = app.extensions["sdfunc"], app.test_client()
    assert txt2img(client, "warm-xl", "demo-sdxl").status_code == 200
    assert txt2img(client, "warm-15", "demo-sd15").status_code == 200
    cache = service.cache
    assert names(cache.loaded()) == ["demo-sd15.safetensors", "demo-sdxl.safetensors"]
    before = cache.report()

    real, calls, held = pipelines.generate.generate, [], []

    def oom_once(model, job, **kw):
        calls.append(model.entry.name)
        if len(calls) > 1:
            return real(model, job, **kw)
        activations = torch.ones(256, 256)  # what a real job holds when the allocator gives up
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    trim, released = cache.trim, []

    def watched_trim(keep=None):
        released.append(held[0]() is None)  # the failed job's tensors are gone before the cache is trimmed
        return trim(keep=keep)

    monkeypatch.setattr(pipelines.generate, "generate", oom_once)
    monkeypatch.setattr(cache, "trim", watched_trim)
    with caplog.at_level("WARNING", logger="handler.runtime.service"):
        r = txt2img(client, "oom", "demo-sd15", save_images=True)
    assert_not_charged(r, 503, "out_of_memory")
    assert r.headers["Retry-After"] and "GiB" not in r.get_json()["error"]["message"]
    assert released == [True]
    # Every other pipeline left the device; the one the job ran on stays for the retry.
    assert names(cache.loaded()) == ["demo-sd15.safetensors"]
    after = cache.report()
    assert after["evictions"] == before["evictions"] + 1 and after["trims"] == before["trims"] + 1
    assert any("out of device memory" in rec.getMessage() and "1 pipeline(s) left the device" in rec.getMessage()
               for rec in caplog.records)
    assert not pngs(root), "nothing is saved for a failed generation"
    samples = metric_samples(client.get("/metrics").get_data(as_text=True))
    assert metric(samples, "sdfunc_pipeline_cache_evictions_total") == after["evictions"]

    # The next request runs on the kept pipeline (no load), and the evicted one loads again when asked for.
    again = txt2img(client, "after-oom", "demo-sd15")
    assert again.status_code == 200 and float(again.headers["X-Charge"]) > 0
    assert cache.report()["loads"] == after["loads"]
    assert txt2img(client, "after-oom-xl", "demo-sdxl").status_code == 200
    rows = assert_records_agree(service.settings.resolved_database_url)
    assert rows["oom"]["status"] == "failed" and rows["oom"]["error"] == "out_of_memory"
    assert rows["oom"]["http_status"] == 503
    assert rows["after-oom"]["status"] == rows["after-oom-xl"]["status"] == "succeeded"


def test_out_of_memory_while_loading_empties_the_device(root, apps, monkeypatch):
    import torch

    import pipelines.loading

    app = build(root)
    apps.append(app)
    service, client = app.extensions["sdfunc"], app.test_client()
    assert txt2img(client, "warm-15", "demo-sd15").status_code == 200
    real, calls = pipelines.loading.load_pipeline, []

    def oom_once(path, **kw):
        calls.append(path)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory while moving the UNet")
        return real(path, **kw)

    monkeypatch.setattr(pipelines.loading, "load_pipeline", oom_once)
    assert_not_charged(txt2img(client, "oom-load", "demo-sdxl"), 503, "out_of_memory")
    assert service.cache.loaded() == [] and service.cache.report()["trims"] == 1  # room for the retry's load
    assert txt2img(client, "retry", "demo-sdxl").status_code == 200
    rows = assert_records_agree(service.settings.resolved_database_url)
    assert rows["oom-load"]["error"] == "out_of_memory" and rows["retry"]["status"] == "succeeded"


def test_host_memory_running_out_while_generating_is_503_and_charges_nothing(root, apps, monkeypatch):
    """MemoryError (host RAM) is answered as device OOM is: 503 out_of_memory, not charged, cache trimmed."""
    import pipelines.generate

    app = build(root)
    apps.append(app)
    service, client = app.extensions["sdfunc"], app.test_client()
    real, calls = pipelines.generate.generate, []

    def oom_once(model, job, **kw):
        calls.append(model.entry.name)
        if len(calls) > 1:
            return real(model, job, **kw)
        raise MemoryError()

    monkeypatch.setattr(pipelines.generate, "generate", oom_once)
    assert_not_charged(txt2img(client, "host-oom", "demo-sd15"), 503, "out_of_memory")
    assert service.cache.report()["trims"] == 1
    assert txt2img(client, "after-host-oom", "demo-sd15").status_code == 200
    rows = assert_records_agree(service.settings.resolved_database_url)
    assert rows["host-oom"]["error"] == "out_of_memory" and rows["after-host-oom"]["status"] == "succeeded"


def test_trim_parks_the_others_in_host_ram_and_keeps_what_the_kept_pipeline_shares(root):
    """`PipelineCache.trim` with the host tier on (forced on CPU, moves recorded instead of made): every other
    pipeline goes to host RAM, and of the kept pipeline's base checkpoint only what it does not share moves."""
    from pipelines.cache import PipelineCache
    from pipelines.builders.demo import write_demo_vae
    from pipelines.hashing import HashCache
    from pipelines.store import ModelStore

    write_demo_vae(root / "models" / "VAE")
    store = ModelStore(root / "models" / "Stable-diffusion", root / "models" / "VAE", HashCache(None))
    moves: list[tuple[int, str]] = []
    cache = PipelineCache(store, device="cpu", dtype="float32", capacity=None, device_bytes=2**40,
                          host_bytes=2**40, host_tier=True, host_device="host",
                          mover=lambda module, device: moves.append((id(module), device)))
    sd15, sdxl, vae = store.find_checkpoint("demo-sd15"), store.find_checkpoint("demo-sdxl"), store.find_vae("demo-vae")
    xl = cache.get(sdxl)
    base = cache.get(sd15)
    kept = cache.get(sd15, vae)  # shares the UNet and text encoder with `base`, has its own VAE
    assert len(cache.loaded()) == 3 and moves == []
    assert cache.trim(keep=kept) == 2
    assert cache.loaded() == [kept] and {id(m) for m in cache.parked()} == {id(xl), id(base)}
    assert {module for module, _ in moves} == set(xl.component_bytes) | {id(base.pipe.vae)}
    assert {device for _, device in moves} == {"host"}
    report = cache.report()
    assert (report["evictions"], report["trims"], report["host_models"]) == (2, 1, 2)
    assert cache.trim() == 1 and cache.loaded() == []  # keep=None: everything leaves


# 2. a corrupt checkpoint ------------------------------------------------------------------------------------
def test_corrupt_checkpoints_are_refused_by_name_and_evict_nothing(root, apps):
    folder = root / "models" / "Stable-diffusion"
    whole = (folder / "demo-sd15.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])  # a copy cut off mid-way
    (folder / "garbage.safetensors").write_bytes(os.urandom(4096))
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "not-json.safetensors").write_bytes((12).to_bytes(8, "little") + b"{not json!!}" + b"\0" * 64)
    app = build(root)
    apps.append(app)
    service, client = app.extensions["sdfunc"], app.test_client()
    listed = [m["model_name"] for m in client.get("/sdapi/v1/sd-models").get_json()]
    assert {"truncated", "garbage", "empty", "not-json"} <= set(listed)  # listed: only a load can tell
    assert txt2img(client, "warm-15", "demo-sd15").status_code == 200
    assert txt2img(client, "warm-xl", "demo-sdxl").status_code == 200
    before = service.cache.report()
    for name in ("truncated", "garbage", "empty", "not-json"):
        r = txt2img(client, f"bad-{name}", name)
        assert_not_charged(r, 422, "invalid_checkpoint")
        message = r.get_json()["error"]["message"]
        assert message.startswith(f"{name}.safetensors: "), message
        assert str(root) not in message  # the file's name, not where the mount is
    # Nothing was evicted for them (max_loaded_models is 2 and both slots were taken), nothing loaded.
    after = service.cache.report()
    assert names(service.cache.loaded()) == ["demo-sd15.safetensors", "demo-sdxl.safetensors"]
    assert (after["evictions"], after["loads"]) == (before["evictions"], before["loads"])
    assert txt2img(client, "after-15", "demo-sd15").status_code == 200
    assert txt2img(client, "after-xl", "demo-sdxl").status_code == 200
    assert service.cache.report()["hits"] == before["hits"] + 2
    rows = assert_records_agree(service.settings.resolved_database_url)
    assert {k for k, v in rows.items() if v["status"] == "failed"} == {
        "bad-truncated", "bad-garbage", "bad-empty", "bad-not-json"}


# 3. the records database down -------------------------------------------------------------------------------
@pytest.fixture
def own_mariadb(tmp_path):
    """A MariaDB server of the test's own (it is stopped and started again), with its data kept in tmp_path.
    Skipped without mariadb-server, unless SDFUNC_REQUIRE_MYSQL=1."""
    from bench.harness.mariadb import MariaDB, find_server

    if find_server() is None:
        message = "mariadb-server is not installed"
        if REQUIRE_MYSQL:
            pytest.fail(message + " and SDFUNC_REQUIRE_MYSQL=1")
        pytest.skip(message)
    server = MariaDB(base_dir=tmp_path / "mariadb").start()
    yield server
    server.stop()


def restart_in_place(server, port: int, password: str, monkeypatch) -> None:
    """Start the stopped `server` again on its data directory, `port` and user `password`: the app's URL works
    again unchanged."""
    import bench.harness.mariadb

    monkeypatch.setattr(bench.harness.mariadb, "_free_port", lambda: port)
    server.start()  # a new password for the user: set the old one back
    server.sql(*(f"ALTER USER 'sdfunc'@'{host}' IDENTIFIED BY '{password}'" for host in ("127.0.0.1", "localhost")))
    assert server.port == port


def test_mariadb_down_refuses_before_any_work_and_recovers_on_restart(root, apps, own_mariadb, monkeypatch):
    url = own_mariadb.url
    app = build(root, database_url=url)
    apps.append(app)
    service, client = app.extensions["sdfunc"], app.test_client()
    assert txt2img(client, "before").status_code == 200
    hits = service.cache.report()["hits"]
    port, password = own_mariadb.port, own_mariadb.password
    own_mariadb.stop()
    r = txt2img(client, "down", save_images=True)
    assert_not_charged(r, 503, "database_unavailable")
    assert r.headers["Retry-After"] and password not in r.get_data(as_text=True)
    # Refused at the ledger claim, before the device: nothing generated, nothing saved.
    assert service.cache.report()["hits"] == hits and not pngs(root)

    restart_in_place(own_mariadb, port, password, monkeypatch)
    again = txt2img(client, "down", save_images=True)  # the client retries with the same id
    assert again.status_code == 200, again.get_json()
    assert float(again.headers["X-Charge"]) > 0
    [saved] = pngs(root)
    rows = assert_records_agree(url)
    assert set(rows) == {"before", "down"} and rows["down"]["status"] == "succeeded"
    engine = create_engine(url)
    with engine.connect() as conn:
        [image_url] = conn.execute(select(generated_images.c.image_url)
                                   .where(generated_images.c.request_id == "down")).scalars().all()
    engine.dispose()
    assert image_url == str(saved)


def test_sqlite_that_cannot_be_opened_is_503_until_it_can(root, apps):
    path = root / "records.sqlite3"
    path.mkdir()  # a folder where the database file should be: sqlite cannot open it (even as root)
    url = f"sqlite:///{path}"
    app = build(root, database_url=url)
    apps.append(app)
    client = app.test_client()
    r = txt2img(client, "blocked", save_images=True)
    assert_not_charged(r, 503, "database_unavailable")
    assert not pngs(root)
    path.rmdir()
    assert txt2img(client, "blocked").status_code == 200  # the schema is made on this first use
    assert set(assert_records_agree(url)) == {"blocked"}


# 4. the outputs mount full ----------------------------------------------------------------------------------
@contextlib.contextmanager
def full_disk(folder: Path, monkeypatch, storage):
    """`folder` on a filesystem with no space left: a 1 MiB tmpfs mounted there and filled, when the process
    may mount (root); else the storage's writes raise ENOSPC. Yields a function that frees the space."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        real = storage.put

        def no_space(key, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)

        monkeypatch.setattr(storage, "put", no_space)
        yield lambda: monkeypatch.setattr(storage, "put", real)
        return
    try:
        filler = folder / "filler"
        with open(filler, "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        yield filler.unlink
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_outputs_mount_full_is_503_and_charges_nothing(root, apps, monkeypatch):
    app = build(root)
    apps.append(app)
    service, client = app.extensions["sdfunc"], app.test_client()
    outputs = root / "outputs"
    with full_disk(outputs, monkeypatch, service.storage) as free_space:
        r = txt2img(client, "full", save_images=True)
        assert_not_charged(r, 503, "storage_unavailable")
        message = r.get_json()["error"]["message"]
        assert "No space left on device" in message and "not charged" in message
        assert not list(outputs.rglob("*.png")) and not list(outputs.rglob(".put-*")), "no partial files"
        free_space()
        ok = txt2img(client, "room-again", save_images=True)
        assert ok.status_code == 200 and float(ok.headers["X-Charge"]) > 0
        assert len(list(outputs.rglob("*.png"))) == 1
    rows = assert_records_agree(service.settings.resolved_database_url)
    assert rows["full"]["status"] == "failed" and rows["full"]["error"] == "storage_unavailable"
    assert rows["room-again"]["status"] == "succeeded"


# 5 + 6. SIGKILL of the worker, then SIGTERM of the server mid-request (real gunicorn) ------------------------
def new_worker(server: ServeProcess, old: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        fresh = [int(c) for c in children if int(c) != old]
        if fresh:
            return fresh[0]
        time.sleep(0.05)
    raise AssertionError(f"no new worker:\n{server.log_tail()}")


def test_worker_sigkill_is_replaced_and_sigterm_drains_the_request_in_flight(tmp_path, data_dir):
    data = tmp_path / "data"
    shutil.copytree(data_dir / "models" / "Stable-diffusion", data / "models" / "Stable-diffusion")
    server = ServeProcess(data, SDFUNC_WARMUP__SHAPES='["64x64@1"]', SDFUNC_BILLING__PRICES='{"cpu": "0.01"}')
    url = f"sqlite:///{data / 'sdfunc.sqlite3'}"

    def post(key: str, **body) -> requests.Response:
        return requests.post(f"{server.url}/sdapi/v1/txt2img", json={**TINY, **body}, timeout=180,
                             headers={"x-fc-request-id": key})

    try:
        server.wait_state("READY")
        assert post("first").status_code == 200
        # SIGKILL: gunicorn's master starts a new worker, which warms up and serves the next request.
        killed = server.worker_pid()
        os.kill(killed, signal.SIGKILL)
        worker = new_worker(server, killed)
        server.wait_state("READY")
        r = post("after-kill")
        assert r.status_code == 200 and float(r.headers["X-Charge"]) > 0
        assert server.worker_pid() == worker

        # SIGTERM to the master while a slow request runs: it is answered and charged; the server takes no more.
        # A request sent during the drain is never served: gunicorn 27's worker stops accepting but keeps its
        # listening socket open until it exits, so that connection is reset then (not refused at once).
        result: dict[str, requests.Response] = {}
        slow = threading.Thread(target=lambda: result.update(r=post("in-flight", width=256, height=256, steps=8)))
        slow.start()
        wait_for(lambda: requests.get(f"{server.url}/health", timeout=5).json()["in_flight"] >= 1, 60,
                 "the slow request to start")
        os.kill(server.proc.pid, signal.SIGTERM)
        refused: dict[str, object] = {}

        def late() -> None:
            try:
                refused["status"] = post("late").status_code
            except requests.ConnectionError as exc:
                refused["error"] = exc

        time.sleep(0.3)  # the master has closed its listener by now
        late_thread = threading.Thread(target=late)
        late_thread.start()
        assert slow.is_alive(), "the slow request ended before the drain could be seen"
        slow.join(180)
        late_thread.join(60)
        assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 1
        assert "error" in refused, f"a request after SIGTERM was served: {refused}"
        assert server.proc.wait(60) == 0, server.log_tail()
        with pytest.raises(requests.ConnectionError):  # refused: nothing listens any more
            requests.get(f"{server.url}/health", timeout=5)
    finally:
        server.stop()
    rows = assert_records_agree(url)
    assert set(rows) == {"first", "after-kill", "in-flight"}  # warm-ups are not requests; "late" never ran
    assert all(row["status"] == "succeeded" for row in rows.values())
