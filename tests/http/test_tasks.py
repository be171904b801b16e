"""Asynchronous tasks: 202 + task id, the result from GET /tasks/<id> (EAS-shaped, images in storage), billing
like a synchronous request, callbacks to a loopback server. (A worker killed mid-task, through real gunicorn:
tests/e2e/test_tasks_worker_death.py.)"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from tests.conftest import TINY, basic
from tests.support.waiting import wait_for


def _done(client, task_id: str, headers: dict | None = None, timeout: float = 120) -> dict:
    view: dict = {}

    def finished() -> bool:
        nonlocal view
        view = client.get(f"/tasks/{task_id}", headers=headers or {}).json
        return view.get("status") in ("succeeded", "failed")

    wait_for(finished, timeout=timeout, what=f"task {task_id}")
    return view


def test_submit_poll_and_fetch(make_app):
    app = make_app(billing={"prices": {"cpu": "0.002"}})
    client = app.test_client()
    r = client.post("/sdapi/v1/txt2img?async=true&task_id=my-tag", json={**TINY, "batch_size": 2},
                    headers={"Idempotency-Key": "job-1"})
    assert r.status_code == 202 and r.headers["Location"] == f"/tasks/{r.json['task_id']}"
    assert r.json["status"] in ("queued", "running") and r.json["tag"] == "my-tag" and r.headers["X-Charge"] == "0"
    again = client.post("/sdapi/v1/txt2img?async=true", json=TINY, headers={"Idempotency-Key": "job-1"})
    assert again.status_code == 202 and again.json["task_id"] == r.json["task_id"]  # submitting is idempotent
    view = _done(client, r.json["task_id"])
    assert view["status"] == "succeeded" and view["deliveries"] == 1 and view["error_msg"] == ""
    result = view["result"]
    params = result["parameters"]
    assert params["status"] == 0 and params["id_task"] == r.json["task_id"] and result["images"] == []
    grid, *paths = params["image_url"].split(",")  # the saved grid first, as in PAI-EAS
    assert "/txt2img-grids/" in grid and len(paths) == 2
    assert all(Path(p).is_file() for p in (grid, *paths))
    seeds = json.loads(result["info"])["all_seeds"]
    assert params["seed"] == ",".join(map(str, seeds)) and params["total_time"] > 0
    assert params["billing"]["request_id"] == "job-1" and params["billing"]["billed_ms"] >= 1
    row = next(x for x in app.extensions["sdfunc"].ledger.ledger_rows() if x["request_id"] == "job-1")
    assert row["status"] == "succeeded" and row["images"] == 2
    listed = client.get("/images?request_id=job-1").json["images"]
    assert sorted(i["image_url"] for i in listed) == sorted(paths)


def test_other_ways_to_ask_and_bad_requests(make_app):
    client = make_app().test_client()
    r = client.post("/sdapi/v1/txt2img", json=TINY, headers={"Prefer": "respond-async"})
    assert r.status_code == 202
    assert _done(client, r.json["task_id"])["status"] == "succeeded"
    # FC's async invocation: FC queued it and waits for the result to hand to its destinations, so it runs now.
    fc_async = client.post("/sdapi/v1/txt2img", json=TINY, headers={"X-Fc-Invocation-Type": "Async"})
    assert fc_async.status_code == 200 and len(fc_async.json["images"]) == 1
    bad = client.post("/sdapi/v1/txt2img?async=true", json={**TINY, "sampler_name": "nope"})
    assert bad.status_code == 422 and bad.json["error"]["field"] == "sampler_name"  # refused now, not later
    assert client.post("/sdapi/v1/img2img?async=1", json=TINY).status_code == 422
    private = client.post("/sdapi/v1/txt2img?async=true&callback_url=http://127.0.0.1:9/x", json=TINY)
    assert private.status_code == 422 and private.json["error"]["field"] == "callback_url"
    assert client.post("/sdapi/v1/txt2img?async=true&callback_url=file:///etc/passwd", json=TINY).status_code == 422
    assert client.get("/tasks/nope").status_code == 404


def test_a_consumer_sees_only_its_tasks(make_app):
    client = make_app(auth={"mode": "basic", "users": ["a:1", "b:2"]}).test_client()
    r = client.post("/sdapi/v1/txt2img?async=true", json=TINY, headers=basic("a", "1"))
    assert r.status_code == 202
    assert _done(client, r.json["task_id"], basic("a", "1"))["consumer"] == "a"
    assert client.get(f"/tasks/{r.json['task_id']}", headers=basic("b", "2")).status_code == 404


def test_callback_receives_the_result(make_app):
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = make_app(tasks={"callback_allow_private": True}).test_client()
        url = f"http://127.0.0.1:{server.server_port}/done"
        r = client.post(f"/sdapi/v1/txt2img?async=true&callback_url={url}", json=TINY)
        assert r.status_code == 202
        wait_for(lambda: received, timeout=120, what="the callback")
        assert received[0]["task_id"] == r.json["task_id"] and received[0]["status"] == "succeeded"
        wait_for(lambda: (client.get(f"/tasks/{r.json['task_id']}").json["callback_status"] or "").startswith(
            "delivered"), what="the callback status")
    finally:
        server.shutdown()


def test_a_task_that_finds_the_instance_busy_gives_up_at_the_queue_timeout(tmp_path):
    """A task waits while the instance answers Busy (full of synchronous requests), but not forever: after
    `queue.timeout_seconds` it fails with 503 `timeout`, and its ledger row is a failure with a zero charge."""
    from types import SimpleNamespace

    from handler.contract.schemas import Txt2ImgRequest
    from handler.errors import Busy
    from handler.records.db import Database
    from handler.records.ledger import Ledger
    from handler.records.tasks import TaskStore
    from handler.runtime.tasks import TaskRunner
    from handler.settings import Settings

    db = Database(f"sqlite:///{tmp_path / 'records.db'}")

    class AlwaysBusy:
        """The TaskHost a runner needs, whose generations are always refused as Busy."""

        def __init__(self) -> None:
            self.settings = Settings(data_dir=tmp_path, queue={"timeout_seconds": 1.0})
            self.instance_id = "busy-host"
            self.state = "READY"
            self.accepts_tasks = True
            self.coldstart = SimpleNamespace(done=True)
            self.ledger = Ledger(db, "CNY")
            self.tries = 0

        def task_request(self, mode: str, data: dict, task_id: str) -> Txt2ImgRequest:
            return Txt2ImgRequest.model_validate(data)

        def txt2img(self, req: Txt2ImgRequest, consumer: str) -> dict:
            self.tries += 1
            raise Busy("the instance is busy", headers={"Retry-After": "0.05"})

        img2img = txt2img

    host, store = AlwaysBusy(), TaskStore(db)
    runner = TaskRunner(host, store, host.settings.tasks)
    task, _ = store.create(consumer="anonymous", request_id="busy-1", mode="txt2img", tag=None,
                           request_json=json.dumps(TINY), callback_url=None)
    try:
        runner.wake()
        wait_for(lambda: store.get(task["id"], consumer=None)["status"] in ("succeeded", "failed"), timeout=60,
                 what="the task to end")
    finally:
        runner.stop()
    row = store.get(task["id"], consumer=None)
    result = json.loads(row["result_json"])
    assert row["status"] == "failed" and result["parameters"]["status"] == 503 and result["images"] == []
    assert "stayed busy" in row["error"] and "queue.timeout_seconds" in row["error"] and "not charged" in row["error"]
    assert result["parameters"]["error_msg"] == row["error"] and host.tries >= 2  # it waited its turn and tried again
    [billed] = host.ledger.ledger_rows()
    assert billed["request_id"] == "busy-1" and billed["status"] == "failed"
    assert (billed["http_status"], billed["error"]) == (503, "timeout")
    assert billed["amount_nanos"] == 0 and billed["billed_ms"] == 0
