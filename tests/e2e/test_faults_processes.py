"""Faults that need real processes, each proven: the MariaDB server down (stopped, then started again in
place), SIGKILL of the worker and SIGTERM of the server mid-request (real gunicorn). The in-process faults are
in tests/http/test_faults.py; both end with the records invariant (`assert_records_agree`)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, select

from handler.records.db import generated_images
from tests.conftest import REQUIRE_MYSQL, TINY, linked_data_root
from tests.support.faults import assert_not_charged, assert_records_agree, build, pngs, txt2img
from tests.support.serving import ServeProcess
from tests.support.waiting import wait_for


@pytest.fixture
def root(tmp_path, data_dir) -> Path:
    """A data root of the test's own with the demo checkpoints linked in (its ledger starts empty)."""
    return linked_data_root(data_dir, tmp_path / "data")


# the records database down -----------------------------------------------------------------------------------
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


# SIGKILL of the worker, then SIGTERM of the server mid-request (real gunicorn) -------------------------------
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
        worker = server.worker_pid(other_than=killed)  # the one the master started in its place
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
        listener = server.listener_inode()
        assert server.polls(worker, listener), "the worker does not watch its listener: nothing to wait for below"
        os.kill(server.proc.pid, signal.SIGTERM)
        refused: dict[str, object] = {}

        def late() -> None:
            try:
                refused["status"] = post("late").status_code
            except requests.ConnectionError as exc:
                refused["error"] = exc

        wait_for(lambda: not server.polls(worker, listener), 60, "the worker to stop accepting after SIGTERM")
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
