"""A charge's COMMIT that loses its acknowledgement (the database dies between committing the ledger row and
answering the commit), on SQLite and MariaDB, injected by `LostAck` (tests/support/faults.py): the ledger is read
back for the row of this very attempt, so a charged request is answered as the success it was, an uncharged one
as 503 `database_unavailable`, and one whose outcome cannot be read as 503 `charge_unknown`, never "not charged";
a retry with the same Idempotency-Key settles it. The asynchronous task path likewise."""

from __future__ import annotations

import logging
import threading

import pytest
from sqlalchemy import select

from handler.records import ledger as ledger_module
from handler.records.db import Database, ledger, tasks, utcnow
from tests.conftest import TINY
from tests.support.faults import PRICE, LostAck, assert_records_agree
from tests.support.waiting import wait_for


@pytest.fixture(autouse=True)
def quick_read_back(monkeypatch):
    """Two reads (0.5 s apart) before a charge is called unknown, instead of four over 3.5 s."""
    monkeypatch.setattr(ledger_module, "ACK_READ_TRIES", 2)


def warm(make_app, **overrides):
    """An app with prices whose schema is made and model loaded (the fault then meets the request's own commit)."""
    app = make_app(billing=PRICE, **overrides)
    client = app.test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "warm"}).status_code == 200
    return app, client


def post(client, key: str):
    return client.post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": key})


def charged_rows(app, key: str) -> list[dict]:
    return [r for r in app.extensions["sdfunc"].ledger.ledger_rows() if r["request_id"] == key]


def request_log(caplog, key: str) -> dict:
    """The request log line of the generation with Idempotency-Key `key`."""
    return next(r.fields for r in caplog.records
                if r.name == "sdfunc.request" and r.fields.get("idempotency_key") == key)


def test_a_lost_ack_of_a_landed_charge_is_answered_as_the_success(make_app, db_url, caplog):
    app, client = warm(make_app)
    with caplog.at_level(logging.INFO), LostAck(app.extensions["sdfunc"].db.engine) as fault:
        r = post(client, "landed")
    assert fault.fired.is_set()
    assert r.status_code == 200, r.json
    billing = r.json["parameters"]["billing"]
    assert len(r.json["images"]) == 1 and billing["request_id"] == "landed"
    assert r.headers["X-Charge"] == billing["amount"] != "0"
    assert r.headers["X-Billed-Duration-Ms"] == str(billing["billed_ms"])
    assert request_log(caplog, "landed")["charged"] == billing["amount"]
    [row] = charged_rows(app, "landed")
    assert row["status"] == "succeeded" and row["billed_ms"] == billing["billed_ms"] and row["attempt_id"]
    assert post(client, "landed").status_code == 409  # charged once
    assert_records_agree(db_url)


def test_a_lost_ack_of_a_commit_that_did_not_land_is_not_charged(make_app, db_url, caplog):
    app, client = warm(make_app)
    with caplog.at_level(logging.INFO), LostAck(app.extensions["sdfunc"].db.engine, lands=False) as fault:
        r = post(client, "rolled-back")
    assert fault.fired.is_set()
    assert r.status_code == 503 and r.json["error"]["code"] == "database_unavailable", r.json
    assert "not charged" in r.json["error"]["message"] and r.headers["Retry-After"]
    assert r.headers["X-Charge"] == "0" and request_log(caplog, "rolled-back")["charged"] == "0"
    # It was read back, not assumed: the operator's log says the commit did not land.
    assert any("did not land" in rec.getMessage() for rec in caplog.records if rec.name == "handler.records.ledger")
    assert [row["status"] for row in charged_rows(app, "rolled-back")] == ["failed"]
    again = post(client, "rolled-back")
    assert again.status_code == 200 and again.headers["X-Charge"] != "0"
    assert [row["status"] for row in charged_rows(app, "rolled-back")] == ["succeeded"]
    assert_records_agree(db_url)


def test_another_instances_row_for_the_same_id_is_not_this_attempts_charge(make_app, db_url, caplog):
    """Attempt A's commit did not land, and a row for the same id is there: another instance's (B). A is told
    it was not charged (it was not), and its retry gets B's charge as a 409."""
    app, client = warm(make_app)
    other = make_app(billing=PRICE)
    service = app.extensions["sdfunc"]
    real, attempts, answered = service.ledger.landed, [], {}

    def other_instance_commits_first(meter) -> bool:
        attempts.append(meter.attempt_id)
        if not answered:  # B's request, on its own thread as another instance's would be
            b = threading.Thread(target=lambda: answered.update(b=post(other.test_client(), "shared")))
            b.start()
            b.join(120)
        return real(meter)

    service.ledger.landed = other_instance_commits_first
    with LostAck(service.db.engine, lands=False) as fault:
        r = post(client, "shared")
    assert fault.fired.is_set() and attempts, "the ledger was not read back"
    assert answered["b"].status_code == 200
    assert r.status_code == 503 and r.json["error"]["code"] == "database_unavailable", r.json
    assert r.headers["X-Charge"] == "0"
    [row] = charged_rows(app, "shared")
    assert row["status"] == "succeeded" and row["attempt_id"] not in attempts  # B's row, not A's
    again = post(client, "shared")
    assert again.status_code == 409 and again.json["error"]["details"][0]["amount"] != "0"
    assert_records_agree(db_url)


@pytest.mark.parametrize("lands", [True, False], ids=["landed", "not-landed"])
def test_a_lost_ack_with_the_database_gone_is_charge_unknown_until_the_retry(make_app, db_url, caplog, lands):
    app, client = warm(make_app)
    with caplog.at_level(logging.INFO), LostAck(app.extensions["sdfunc"].db.engine, lands=lands,
                                                then_down=True) as fault:
        r = post(client, "unknown")
        fault.up()
    assert r.status_code == 503 and r.json["error"]["code"] == "charge_unknown", r.json
    message = r.json["error"]["message"]
    assert "not charged" not in message and "Idempotency-Key: unknown" in message and r.headers["Retry-After"]
    assert r.headers["X-Charge"] == r.headers["X-Billed-Duration-Ms"] == "unknown"
    logged = request_log(caplog, "unknown")
    assert logged["charged"] == "unknown" and logged["error"] == "charge_unknown"
    again = post(client, "unknown")
    if lands:  # charged: the retry gets the charge and the images it paid for
        assert again.status_code == 409, again.json
        [details] = again.json["error"]["details"]
        [row] = charged_rows(app, "unknown")
        assert details["billed_ms"] == row["billed_ms"] >= 1 and details["images_kept"] == 1
        assert len(client.get("/images?request_id=unknown").json["images"]) == 1
    else:  # not charged: the retry is a new generation, charged once
        assert again.status_code == 200 and again.headers["X-Charge"] != "0"
        assert [row["status"] for row in charged_rows(app, "unknown")] == ["succeeded"]
    assert_records_agree(db_url)


@pytest.mark.parametrize(("lands", "then_down"), [(True, False), (True, True), (False, True)],
                         ids=["landed", "landed-then-down", "not-landed-then-down"])
def test_a_task_whose_charge_lost_its_ack(make_app, db_url, caplog, lands, then_down):
    """A charged task succeeds with its result; an uncharged one fails, saying so; while the database is down the
    runner waits for the ledger to tell."""
    app, client = warm(make_app, tasks={"stale_seconds": 120})
    with caplog.at_level(logging.INFO), LostAck(app.extensions["sdfunc"].db.engine, lands=lands,
                                                then_down=then_down) as fault:
        submitted = client.post("/sdapi/v1/txt2img?async=true", json=TINY, headers={"Idempotency-Key": "task"})
        assert submitted.status_code == 202
        wait_for(fault.fired.is_set, what="the task's charge to be committed")
        if then_down:
            wait_for(lambda: any("is unknown" in rec.getMessage() for rec in caplog.records
                                 if rec.name == "handler.records.ledger"), what="the charge to be called unknown")
            fault.up()

        def finished() -> dict | None:
            view = client.get(f"/tasks/{submitted.json['task_id']}").json
            return view if view["status"] in ("succeeded", "failed") else None

        view = wait_for(finished, what="the task to finish")
    rows = charged_rows(app, "task")
    if lands:
        assert view["status"] == "succeeded", view
        billing = view["result"]["parameters"]["billing"]
        assert [row["status"] for row in rows] == ["succeeded"] and rows[0]["billed_ms"] == billing["billed_ms"]
        assert view["result"]["parameters"]["image_url"]
    else:
        assert view["status"] == "failed" and "not charged" in view["error_msg"], view
        assert view["result"]["parameters"]["status"] == 503
        assert [row["status"] for row in rows] == ["failed"]
    assert_records_agree(db_url)


def test_a_dead_workers_task_that_was_charged_says_so(db_url):
    """A task taken back after its runner stopped (or lost the database) past the charge's COMMIT fails saying it
    was charged and where its images are, not that it was not charged."""
    from handler.records.tasks import TaskStore

    db = Database(db_url)
    try:
        store = TaskStore(db)
        for key in ("paid", "unpaid"):
            task, _ = store.create(consumer="c", request_id=key, mode="txt2img", tag=None, request_json="{}",
                                   callback_url=None)
            assert store.claim("gone")["id"] == task["id"]
        now = utcnow()
        with db.begin() as conn:
            conn.execute(ledger.insert().values(request_id="paid", consumer="c", status="succeeded", images=1,
                                                billed_ms=5, price_per_second="1", currency="CNY", amount_nanos=5,
                                                attempts=1, started_at=now, finished_at=now))
        assert store.reap(stale_seconds=-1, max_delivery=1) == []  # -1: every claimed task is stale now
        with db.connect() as conn:
            errors = dict(conn.execute(select(tasks.c.request_id, tasks.c.error)).all())
    finally:
        db.dispose()
    assert "was charged" in errors["paid"] and "GET /images?request_id=paid" in errors["paid"]
    assert "not charged" not in errors["paid"] and "not charged" in errors["unpaid"]
