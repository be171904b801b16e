"""SIGKILL mid-request, through real gunicorn, on SQLite and MariaDB: the ledger has a complete row (with all
its image records) or none, never a charged row without its records; every 200 the client saw is charged."""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, func, select, text

from handler.records.db import generated_images, ledger
from tests.support.serving import ServeProcess
from tests.support.waiting import wait_for

BODY = {"prompt": "kill test", "steps": 3, "width": 64, "height": 64, "batch_size": 2, "seed": 11,
        "alwayson_scripts": {"save_to_db": True}}


@pytest.fixture
def data(tmp_path, data_dir) -> Path:
    root = tmp_path / "data"
    shutil.copytree(data_dir / "models" / "Stable-diffusion", root / "models" / "Stable-diffusion")
    return root


def check_ledger(url: str) -> dict[str, str]:
    """Assert the invariant on every row; returns {request_id: status}."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            counts = dict(conn.execute(select(generated_images.c.request_id, func.count())
                                       .group_by(generated_images.c.request_id)).all())
            statuses = {}
            for row in conn.execute(select(ledger)):
                statuses[row.request_id] = row.status
                if row.status == "succeeded":
                    assert row.billed_ms > 0 and row.images == 2 and counts.get(row.request_id) == 2, row
                else:
                    assert row.billed_ms == 0 and row.amount_nanos == 0 and row.request_id not in counts, row
            assert set(counts) <= set(statuses), "image records without their ledger row"
    finally:
        engine.dispose()
    return statuses


def post(server: ServeProcess, key: str) -> int | None:
    """The status code, or None when the connection died with the server. The request id is `trace-<key>`."""
    try:
        return requests.post(f"{server.url}/sdapi/v1/txt2img", json=BODY, timeout=120,
                             headers={"Idempotency-Key": key, "x-fc-request-id": f"trace-{key}"}).status_code
    except requests.RequestException:
        return None


def in_flight(server: ServeProcess) -> int:
    """The worker's admitted generation requests (0 while no worker answers)."""
    try:
        return requests.get(f"{server.url}/health", timeout=5).json()["in_flight"]
    except requests.RequestException:
        return 0


def test_sigkill_at_random_moments(data, db_url):
    server = ServeProcess(data, SDFUNC_DATABASE_URL=db_url, SDFUNC_WARMUP__SHAPES='["64x64@1"]',
                          SDFUNC_BILLING__PRICES='{"cpu": "0.01"}')
    answered: dict[str, int | None] = {}
    rng = random.Random(1234)
    try:
        for round_no in range(3):
            server.wait_state("READY")
            stop = threading.Event()

            def traffic(n: int = round_no) -> None:
                i = 0
                while not stop.is_set():
                    key = f"r{n}-{i}"
                    answered[key] = post(server, key)
                    i += 1
                    if answered[key] is None:
                        return

            t = threading.Thread(target=traffic)
            t.start()
            wait_for(lambda: in_flight(server) >= 1, 60, "the traffic to reach the worker")
            # The kill lands at a random moment of the traffic (a seeded fault injection, not a wait): before,
            # during or after a generation or its commit.
            time.sleep(rng.uniform(0.3, 1.5))
            os.kill(server.worker_pid(), signal.SIGKILL)  # gunicorn's master starts a new worker
            stop.set()
            t.join(150)
        server.wait_state("READY")
    finally:
        server.stop()
    statuses = check_ledger(db_url)
    assert any(code is None for code in answered.values()), "no request was cut off by the kill"
    for key, code in answered.items():
        if code == 200:
            assert statuses.get(key) == "succeeded", f"{key} was answered 200 but is not charged"
        if code is None:
            assert statuses.get(key) in (None, "succeeded")


def test_sigkill_inside_the_transaction(data, db_url, request):
    """Hold the database so that the worker is stopped inside its commit transaction, kill it there, and find
    nothing of that request afterwards. On MariaDB the worker has already inserted its ledger row (InnoDB
    shows the transaction with a modified row) and waits to insert the image records; on SQLite it waits for
    the write lock at its first statement."""
    server = ServeProcess(data, SDFUNC_DATABASE_URL=db_url, SDFUNC_WARMUP__SHAPES='["64x64@1"]')
    holder = create_engine(db_url)
    result: dict[str, int | None] = {}
    try:
        server.wait_state("READY")
        assert post(server, "before") == 200
        with holder.connect() as conn:
            mysql = conn.dialect.name in ("mysql", "mariadb")
            if mysql:
                # Next-key locks up to the supremum: inserting any new generated_images row waits; ledger does not.
                conn.execute(text("SET SESSION innodb_lock_wait_timeout = 100"))
                conn.execute(text("SELECT id FROM generated_images WHERE id >= 0 FOR UPDATE")).all()
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            t = threading.Thread(target=lambda: result.update(code=post(server, "inside")))
            t.start()
            # The worker logs its generation, then builds the response and commits.
            wait_for(lambda: any(e["request_id"] == "trace-inside" and e["msg"].startswith("txt2img:")
                                 for e in server.log_entries()), 60, "the worker to reach its commit")
            if mysql:  # InnoDB's view of the worker's transaction needs the PROCESS privilege: ask as root
                root = create_engine(request.getfixturevalue("mariadb").root_url)
                try:
                    with root.connect() as admin:
                        def lock_wait_rows() -> list:
                            return admin.execute(text("SELECT trx_rows_modified FROM information_schema.INNODB_TRX "
                                                      "WHERE trx_state = 'LOCK WAIT'")).all()

                        waiting = wait_for(lock_wait_rows, 60, "the worker's transaction to wait for the lock")
                finally:
                    root.dispose()
                assert waiting[0][0] >= 1, "the ledger row is inserted inside the open transaction"
            else:
                # SQLite's busy wait for the write lock is not visible from outside the worker; after the log line
                # only the response's encoding comes before it (milliseconds). A kill before the commit would
                # leave nothing either, so this grace only makes "inside the transaction" likely, it proves nothing.
                time.sleep(0.5)
            os.kill(server.worker_pid(), signal.SIGKILL)
            t.join(60)
            conn.rollback()
        assert result["code"] is None
    finally:
        holder.dispose()
        server.stop()
    statuses = check_ledger(db_url)
    assert statuses == {"before": "succeeded"}
