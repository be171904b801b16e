"""PAI-EAS's queue service in process: put, get, commit, delete, truncate, attributes, search and bad input.
(The SDK's watcher over a WebSocket, through real gunicorn and on two instances: tests/e2e/test_eas_queue_gunicorn.py.)"""

from __future__ import annotations

import json

from handler.contract.eas_queue import decode_frame
from tests.conftest import TINY, basic
from tests.support.waiting import wait_for

PUT = "/api/predict/sd_async/sdapi/v1/txt2img"
SINK = "/api/predict/sd_async/sink"


def _frames(body: bytes) -> list:
    """A DataFrameListProto's entries (field 1, repeated)."""
    from handler.contract.eas_queue import _fields

    return [decode_frame(value) for number, value in _fields(body) if number == 1]


def _sink_length(client, headers=None) -> int:
    return int(client.get(f"{SINK}?_attrs_=true", headers=headers).json["stream.length"])


def test_put_get_commit_and_the_task_behind_it(make_app):
    app = make_app(billing={"prices": {"cpu": "0.002"}})
    client = app.test_client()
    r = client.post(f"{PUT}?task_id=txt2img_0&shop=7", data=json.dumps({**TINY, "n_iter": 2}),
                    headers={"Idempotency-Key": "put-1"})
    assert r.status_code == 200 and r.mimetype == "text/plain" and int(r.get_data(as_text=True)) >= 1
    index, request_id = int(r.get_data(as_text=True)), r.headers["X-Eas-Queueservice-Request-Id"]
    again = client.post(f"{PUT}?task_id=other", data=json.dumps(TINY), headers={"Idempotency-Key": "put-1"})
    assert again.get_data(as_text=True) == str(index) and again.headers["X-Eas-Queueservice-Request-Id"] == request_id
    wait_for(lambda: _sink_length(client) == 1, timeout=120, what="the result on the sink")
    got = client.get(f"{SINK}?_index_=0&_length_=5&_auto_delete_=false",
                     headers={"Accept": "application/vnd.google.protobuf"})
    assert got.status_code == 200 and got.mimetype == "application/vnd.google.protobuf"
    [frame] = _frames(got.data)
    assert frame.tags == {"task_id": "txt2img_0", "shop": "7", "requestId": request_id}
    result = json.loads(frame.data)
    params = result["parameters"]
    assert result["images"] == [] and params["status"] == 0 and params["error_msg"] == ""
    assert len(params["seed"].split(",")) == 2 and params["image_url"]
    # the same row as an ?async=true task
    view = client.get(f"/tasks/{result['task_id']}").json
    assert view["status"] == "succeeded" and view["queue"] == "sd_async/sdapi/v1/txt2img"
    assert view["tags"]["task_id"] == "txt2img_0"
    search = client.get(f"/api/predict/sd_async/sdapi/v1/txt2img?_search_=true&_index_={index}").json
    assert search["task_id"] == result["task_id"] and search["IsPending"] is False
    # charged once
    [row] = [x for x in app.extensions["sdfunc"].ledger.ledger_rows() if x["status"] == "succeeded"]
    assert row["images"] == 2 and row["amount_nanos"] > 0
    # committing takes it off the sink; a second commit of it is fine, an unknown index is a 404
    assert client.put(f"{SINK}?_indexes_={frame.index}").status_code == 200
    assert _sink_length(client) == 0
    assert _frames(client.get(f"{SINK}?_index_=0&_length_=5").data) == []
    missing = client.put(f"{SINK}?_indexes_={frame.index},999999")
    assert missing.status_code == 404 and missing.json["error"]["field"] == "_indexes_"


def test_get_auto_deletes_and_truncate_and_delete(make_app):
    client = make_app().test_client()
    for i in range(3):
        assert client.post(f"{PUT}?task_id=t{i}", data=json.dumps(TINY)).status_code == 200
    wait_for(lambda: _sink_length(client) == 3, timeout=180, what="three results")
    first = _frames(client.get(f"{SINK}?_length_=1").data)  # _auto_delete_ defaults to true
    assert len(first) == 1 and _sink_length(client) == 2
    rest = _frames(client.get(f"{SINK}?_length_=5&_auto_delete_=false").data)
    assert [f.index for f in rest] == sorted(f.index for f in rest) and len(rest) == 2
    assert client.delete(f"{SINK}?_indexes_={rest[0].index}").status_code == 200
    assert client.delete(f"{SINK}?_index_={rest[1].index + 1}&_trunc_=true").status_code == 200
    assert _sink_length(client) == 0


def test_bad_input_is_refused_and_nothing_is_queued_or_charged(make_app):
    app = make_app()
    client = app.test_client()
    not_json = client.post(PUT, data=b"prompt=cat")
    assert not_json.status_code == 422 and not_json.json["error"]["field"] == "body"
    bad_field = client.post(PUT, data=json.dumps({**TINY, "steps": "many"}))
    assert bad_field.status_code == 422 and bad_field.json["error"]["field"] == "steps"
    assert client.post("/api/predict/sd_async/sdapi/v1/options", data=b"{}").status_code == 404
    assert client.post(SINK, data=json.dumps(TINY)).status_code == 422
    assert client.post("/api/predict/bad name!/sdapi/v1/txt2img", data=b"{}").status_code == 404
    link = client.post(f"{PUT}", data=json.dumps({**TINY, "alwayson_scripts": {"image_link": "http://x/y.png"}}))
    assert link.status_code == 422 and link.json["error"]["field"] == "alwayson_scripts.image_link"
    img2img = client.post("/api/predict/sd_async/sdapi/v1/img2img", data=json.dumps(TINY))
    assert img2img.status_code == 422 and img2img.json["error"]["field"] == "init_images"
    watch_over_http = client.get(f"{SINK}?_watch_=true")
    assert watch_over_http.status_code == 422 and watch_over_http.json["error"]["field"] == "_watch_"
    for query, field in (("_indexes_=x", "_indexes_"), ("_indexes_=", "_indexes_"), ("_indexes_=-1", "_indexes_")):
        r = client.put(f"{SINK}?{query}")
        assert r.status_code == 422 and r.json["error"]["field"] == field
    assert client.get(f"{SINK}?_index_=abc").status_code == 422
    assert client.get(f"{SINK}?_length_=100000").status_code == 422
    assert client.put(f"{PUT}?_indexes_=1").status_code == 422  # commits are for sinks
    assert client.get(f"{SINK}?_search_=true&_index_=424242").status_code == 404
    assert app.extensions["sdfunc"].ledger.ledger_rows() == []
    assert int(client.get(f"{PUT}?_attrs_=true").json["stream.length"]) == 0


def test_a_consumer_sees_only_its_own_entries(make_app):
    client = make_app(auth={"mode": "basic", "users": ["a:1", "b:2"], "admins": ["a"]}).test_client()
    assert client.post(PUT, data=json.dumps(TINY)).status_code == 401
    assert client.post(PUT, data=json.dumps(TINY), headers=basic("b", "2")).status_code == 200
    wait_for(lambda: _sink_length(client, basic("b", "2")) == 1, timeout=120, what="b's result")
    [mine] = _frames(client.get(f"{SINK}?_auto_delete_=false", headers=basic("b", "2")).data)
    assert _sink_length(client, basic("a", "1")) == 1  # an admin sees every consumer's entries
    client.post(PUT, data=json.dumps(TINY), headers=basic("a", "1"))
    wait_for(lambda: _sink_length(client, basic("a", "1")) == 2, timeout=120, what="a's result")
    assert _sink_length(client, basic("b", "2")) == 1
    others = [f for f in _frames(client.get(f"{SINK}?_length_=5&_auto_delete_=false", headers=basic("a", "1")).data)
              if f.index != mine.index]
    refused = client.put(f"{SINK}?_indexes_={others[0].index}", headers=basic("b", "2"))
    assert refused.status_code == 404  # b cannot commit a's result


def test_a_watcher_keeps_to_its_window_and_a_new_one_gets_the_uncommitted_again(make_app):
    """QueueService.watch without a socket: results finished straight in the task table (no generation)."""
    from handler.runtime.eas_queue import WatchParams, queue_name

    service = make_app().extensions["sdfunc"]
    store, queues = service.tasks, service.queues
    for i in range(3):
        store.create(consumer="anonymous", request_id=f"w{i}", mode="txt2img", tag=f"t{i}", request_json="{}",
                     callback_url=None, queue="svc/sdapi/v1/txt2img", tags={"task_id": f"t{i}"})
        task = store.claim("runner-x")
        assert store.finish(task["id"], "runner-x", status="succeeded", result={"n": i}, error=None)
    sink = queue_name("svc", "sink")

    def watch(window: int, looks: int, commit_first: bool = False) -> list:
        """One watcher for `looks` looks at the sink; with `commit_first` it commits what it gets at once."""
        got: list = []
        left = [looks]

        def wait(_seconds: float) -> bool:
            left[0] -= 1
            return left[0] > 0

        def send(frame) -> None:
            got.append(frame)
            if commit_first:
                queues.store.commit(sink.name, None, [frame.index])

        params = WatchParams.parse(sink, {"_window_": str(window)})
        queues.watch(sink, None, params, send, wait)
        return got

    held = watch(window=2, looks=3)  # nothing committed: two in flight, the third waits
    assert [f.tags["task_id"] for f in held] == ["t0", "t1"] and json.loads(held[0].data) == {"n": 0}
    again = watch(window=5, looks=2)  # a new watcher: every uncommitted result again, in index order
    assert [f.tags["task_id"] for f in again] == ["t0", "t1", "t2"]
    assert [f.tags["task_id"] for f in watch(window=1, looks=4, commit_first=True)] == ["t0", "t1", "t2"]
    assert watch(window=5, looks=2) == []  # all committed: nothing is delivered again


def test_a_dead_workers_queued_task_is_failed_onto_the_sink_and_only_held_tasks_stay_alive(make_app):
    """A runner marks alive only the tasks it holds; one it lost goes stale and, out of runs, is failed with a
    PAI-EAS failure result that reaches the sink (its watcher is told, not left waiting)."""
    import datetime as dt

    from sqlalchemy import update

    from handler.records.db import tasks

    service = make_app().extensions["sdfunc"]
    store = service.tasks
    ids = []
    for i in range(2):
        store.create(consumer="anonymous", request_id=f"d{i}", mode="txt2img", tag=f"d{i}", request_json="{}",
                     callback_url=None, queue="svc/sdapi/v1/txt2img", tags={"task_id": f"d{i}"})
        ids.append(store.claim("runner-dead")["id"])
    with service.db.begin() as conn:
        conn.execute(update(tasks).values(heartbeat_at=dt.datetime(2000, 1, 1)))
    store.heartbeat("runner-dead", [ids[0]])  # it still holds the first one only
    assert store.reap(stale_seconds=60, max_delivery=1) == []
    held, lost = store.get(ids[0], consumer=None), store.get(ids[1], consumer=None)
    assert held["status"] == "running" and lost["status"] == "failed" and "stopped" in lost["error"]
    [entry] = service.queues.store.pending("svc/sink", None, start=0, limit=5)
    result = json.loads(entry.data)
    assert entry.task_id == ids[1] and entry.tags == {"task_id": "d1"}
    assert result["parameters"]["status"] == 503 and result["images"] == [] and result["parameters"]["error_msg"]


def test_queue_inputs_are_bounded(make_app):
    app = make_app()
    client = app.test_client()
    deep = json.dumps({**TINY, "styles": [json.loads("[" * 100 + "]" * 100)]})
    r = client.post(PUT, data=deep)
    assert r.status_code == 422 and r.json["error"]["field"] == "body"
    very_deep = b"[" * 5000 + b"]" * 5000
    assert client.post(PUT, data=very_deep).status_code == 422
    assert client.get(f"{SINK}?_index_={2**70}").status_code == 422
    assert client.put(f"{SINK}?_indexes_={2**70}").status_code == 422
    assert client.get(f"{SINK}?_timeout_=forever").status_code == 422
    # an Idempotency-Key used for an ?async=true task is not a put's
    assert client.post("/sdapi/v1/txt2img?async=true", json=TINY, headers={"Idempotency-Key": "k1"}).status_code == 202
    reused = client.post(PUT, data=json.dumps(TINY), headers={"Idempotency-Key": "k1"})
    assert reused.status_code == 409 and reused.json["error"]["field"] == "Idempotency-Key"
