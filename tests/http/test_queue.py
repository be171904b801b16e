"""The bounded queue: a full instance answers 429 with a Retry-After from the measured service time; a request
past `queue.timeout_seconds` fails with 503 `timeout`, uncharged, whether it was waiting or running. (Through
gunicorn: tests/e2e/test_queue_gunicorn.py.)"""

from __future__ import annotations

import threading

from tests.conftest import TINY, device_held
from tests.support.waiting import wait_for


def test_a_full_queue_answers_429_and_the_admitted_requests_succeed(make_app):
    app = make_app(queue={"max_waiting": 2})
    service = app.extensions["sdfunc"]
    client = app.test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200  # measures one job's device time
    results: list = []
    with device_held(service):
        threads = [threading.Thread(target=lambda i=i: results.append(
            client.post("/sdapi/v1/txt2img", json={**TINY, "seed": i}))) for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: service.in_flight == 3, what="3 admitted requests")
        full = client.post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "shed"})
        assert full.status_code == 429 and full.json["error"]["code"] == "busy"
        assert 1 <= int(full.headers["Retry-After"]) <= 600 and full.headers["X-Charge"] == "0"
        assert service.retry_after() == int(full.headers["Retry-After"])
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in results) == [200, 200, 200]
    row = next(r for r in service.ledger.ledger_rows() if r["request_id"] == "shed")
    assert row["status"] == "failed" and row["http_status"] == 429 and row["billed_ms"] == 0
    assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200  # room again


def test_a_request_that_waits_too_long_fails_uncharged(make_app):
    app = make_app()
    service = app.extensions["sdfunc"]
    client = app.test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200  # loaded, so the retry below is quick
    service.settings.queue.timeout_seconds = 2.0  # after the load: the limit is about the wait, not this CPU's speed
    with device_held(service):
        r = client.post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "late"})
    assert r.status_code == 503 and r.json["error"]["code"] == "timeout" and "waited" in r.json["error"]["message"]
    assert r.headers["Retry-After"] and r.headers["X-Charge"] == "0"
    assert service.ledger.ledger_rows()[-1]["status"] == "failed"
    assert client.post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "late"}).status_code == 200


def test_a_running_generation_past_the_limit_is_stopped_and_not_charged(make_app):
    app = make_app()
    service = app.extensions["sdfunc"]
    client = app.test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200  # loaded: the limit is spent sampling
    service.settings.queue.timeout_seconds = 1.0  # set after the load, which a busy CPU may take longer than that
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "steps": 150, "width": 256, "height": 256},
                    headers={"Idempotency-Key": "long"})
    assert r.status_code == 503 and r.json["error"]["code"] == "timeout"
    assert "stopped" in r.json["error"]["message"] and r.headers["X-Billed-Duration-Ms"] == "0"
    assert service.progress.snapshot()["state"]["job_count"] == 0  # the device is free
    row = next(x for x in service.ledger.ledger_rows() if x["request_id"] == "long")
    assert row["status"] == "failed" and row["amount_nanos"] == 0
    after = client.post("/sdapi/v1/txt2img", json=TINY)
    assert after.status_code == 200 and len(after.json["images"]) == 1  # the next job is not interrupted

