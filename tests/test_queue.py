"""The bounded queue: a full instance answers 429 with a Retry-After from the measured service time; a request
past `queue.timeout_seconds` fails with 503 `timeout`, uncharged, whether it was waiting or running."""

from __future__ import annotations

import threading

import requests

from conftest import TINY, device_held, wait_for
from tests.serving import ServeProcess


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
    app = make_app(queue={"timeout_seconds": 2.0})
    service = app.extensions["sdfunc"]
    client = app.test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200  # loaded, so the retry below is quick
    with device_held(service):
        r = client.post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "late"})
    assert r.status_code == 503 and r.json["error"]["code"] == "timeout" and "waited" in r.json["error"]["message"]
    assert r.headers["Retry-After"] and r.headers["X-Charge"] == "0"
    assert service.ledger.ledger_rows()[-1]["status"] == "failed"
    assert client.post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "late"}).status_code == 200


def test_a_running_generation_past_the_limit_is_stopped_and_not_charged(make_app):
    app = make_app(queue={"timeout_seconds": 1.0})
    service = app.extensions["sdfunc"]
    client = app.test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200  # loaded: the limit is spent sampling
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "steps": 150, "width": 256, "height": 256},
                    headers={"Idempotency-Key": "long"})
    assert r.status_code == 503 and r.json["error"]["code"] == "timeout"
    assert "stopped" in r.json["error"]["message"] and r.headers["X-Billed-Duration-Ms"] == "0"
    assert service.progress.snapshot()["state"]["job_count"] == 0  # the device is free
    row = next(x for x in service.ledger.ledger_rows() if x["request_id"] == "long")
    assert row["status"] == "failed" and row["amount_nanos"] == 0
    after = client.post("/sdapi/v1/txt2img", json=TINY)
    assert after.status_code == 200 and len(after.json["images"]) == 1  # the next job is not interrupted


def test_through_gunicorn_twice_the_queue_gets_the_right_number_of_429s(tmp_path, data_dir):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_dir / "models" / "Stable-diffusion", root / "models" / "Stable-diffusion")
    server = ServeProcess(root, SDFUNC_QUEUE__MAX_WAITING="2", SDFUNC_WARMUP__SHAPES='["64x64@1"]')
    try:
        server.wait_state("READY")
        url = f"{server.url}/sdapi/v1/txt2img"
        codes: list[int] = []

        def post(body: dict) -> None:
            codes.append(requests.post(url, json=body, timeout=180).status_code)

        first = threading.Thread(target=post, args=({**TINY, "steps": 20, "width": 256, "height": 256},))
        first.start()
        assert server.wait_state("BUSY")["in_flight"] == 1  # the long one holds the device
        rest = [threading.Thread(target=post, args=({**TINY, "seed": i},)) for i in range(3)]  # 2 x max_waiting in all
        for t in rest:
            t.start()
        for t in [first, *rest]:
            t.join(180)
        assert sorted(codes) == [200, 200, 200, 429], codes
    finally:
        server.stop()
