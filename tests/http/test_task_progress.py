"""Progress per task: the registry (handler/runtime/progress.py), A1111's `POST /internal/progress`, the `progress`
of `GET /tasks/<id>` (this instance's registry, else the task's database row), and who may see which job."""

from __future__ import annotations

import json
import threading

import pytest

from handler.runtime.progress import Progress
from tests.conftest import TINY, basic, device_held
from tests.support.waiting import wait_for

UNKNOWN = {"active": False, "queued": False, "completed": False, "progress": None, "eta": None, "live_preview": None,
           "id_live_preview": -1, "textinfo": "Waiting..."}  # A1111 v1.10.1's answer for an id it does not know
COMPLETED = {**UNKNOWN, "completed": True}
LONG = {**TINY, "steps": 40, "n_iter": 4}  # long enough to be seen sampling; interrupted once seen


class Clock:
    """A clock the test moves (the ETA's elapsed time)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def internal(client, id_task: str | None, headers: dict | None = None, **extra) -> dict:
    r = client.post("/internal/progress", json={"id_task": id_task, **extra}, headers=headers or {})
    assert r.status_code == 200, r.json
    return r.json


def in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target)
    thread.start()
    return thread


def sampling(service) -> bool:
    state = service.progress.snapshot()["state"]
    return bool(state["job_count"] and state["sampling_step"] >= 1)


# The registry ---------------------------------------------------------------------------------------------------
def test_a_task_is_queued_then_active_then_completed():
    clock = Clock()
    progress = Progress(clock=clock)
    a = progress.enqueue(["a", "a-forced"], "x")
    b = progress.enqueue(["b"], "y")
    progress.enqueue([], "z")  # a request without ids still takes a place in the queue, as in A1111
    assert progress.task_state("b") == {
        "active": False, "queued": True, "completed": False, "position": 2, "waiting": 3, "step": None,
        "steps": None, "progress": None, "eta": None, "textinfo": "In queue: 2/3", "owner": "y"}
    assert progress.task_snapshot("a") is None  # not running

    progress.activate([a])  # the device starts a's job: its model loads, no step yet
    loading = progress.task_state("a-forced")
    assert loading["active"] and not loading["queued"] and loading["textinfo"] is None
    assert (loading["progress"], loading["eta"], loading["step"]) == (0.0, None, 0)
    assert progress.task_state("b")["textinfo"] == "In queue: 1/2"

    progress.begin("txt2img", job_count=2, sampling_steps=10, owner="x", tasks=[a])
    clock.now += 10
    progress.step(5, 10, 1)  # half of the second of two batches: A1111's job_no / count + step / steps / count
    running = progress.task_state("a")
    assert running["progress"] == pytest.approx(0.75) and running["eta"] == pytest.approx(10 / 0.75 - 10)
    assert progress.task_snapshot("a") == {"step": 5, "steps": 10, "progress": running["progress"],
                                           "eta": running["eta"]}
    assert json.loads(json.dumps(progress.task_snapshot("a"))) == progress.task_snapshot("a")

    progress.step(10, 10, 1)
    progress.end()  # the device is done; the response is still being made
    assert progress.task_state("a") == {
        "active": True, "queued": False, "completed": False, "position": None, "waiting": None, "step": 10,
        "steps": 10, "progress": 1.0, "eta": 0.0, "textinfo": None, "owner": "x"}
    progress.complete(a)
    assert progress.task_state("a") == {
        "active": False, "queued": False, "completed": True, "position": None, "waiting": None, "step": None,
        "steps": None, "progress": None, "eta": None, "textinfo": "Waiting...", "owner": "x"}
    assert progress.task_snapshot("a") is None
    progress.complete(b)  # a request that gave up in the queue is completed, and a late start leaves it so
    progress.activate([b])
    assert progress.task_state("b")["completed"] and progress.task_state("unknown") is None


def test_ids_are_per_consumer_and_the_finished_memory_is_bounded():
    progress = Progress(finished_memory=3)
    with progress.tracking(["same"], "x"), progress.tracking(["same"], "y"):
        assert progress.task_state("same", "x")["owner"] == "x" and progress.task_state("same", "y")["owner"] == "y"
        assert progress.task_state("same", "z") is None
        assert progress.task_state("same")["owner"] == "y"  # an admin: the latest
        assert progress.task_state("same", "x")["textinfo"] == "In queue: 1/2"
    for n in range(5):
        with progress.tracking([f"t{n}"], "x"):
            pass
    assert [progress.task_state(f"t{n}", "x") is not None for n in range(5)] == [False, False, True, True, True]
    assert progress.task_state("same", "x") is None  # forgotten too: the memory holds the last three


def test_a_job_of_another_consumer_reads_as_idle():
    progress = Progress()
    mine = progress.enqueue(["m"], "a")
    progress.begin("txt2img", job_count=1, sampling_steps=4, owner="<batch>", tasks=[mine])
    progress.step(1, 4, 0)
    assert progress.snapshot("a")["state"]["job_count"] == 1  # a batch it is part of
    assert progress.snapshot(None)["progress"] > 0  # an admin
    hidden = progress.snapshot("b")
    assert hidden["progress"] == 0.0 and hidden["state"]["job_count"] == 0 and hidden["state"]["job"] == ""
    assert hidden == {"progress": 0.0, "eta_relative": 0.0, "state": Progress().snapshot()["state"],
                      "current_image": None, "textinfo": None}


def test_the_ids_a_request_is_followed_by():
    from handler.contract.a1111 import task_ids
    from handler.contract.schemas import Txt2ImgRequest

    def ids(**fields) -> list[str]:
        return task_ids(Txt2ImgRequest(**TINY, **fields))

    assert ids(alwayson_scripts={"id_task": "t1"}, force_task_id="f1") == ["t1", "f1"]
    assert ids(alwayson_scripts={"id_task": {"args": ["t1"]}}, force_task_id="t1") == ["t1"]
    assert ids(alwayson_scripts={"id_task": ["not", "an", "id"]}) == [] == ids(alwayson_scripts={"id_task": "x" * 201})


# POST /internal/progress ----------------------------------------------------------------------------------------
def test_an_unknown_id_gets_a1111s_answer(client):
    answer = internal(client, "task(nobody-knows)")
    assert answer == UNKNOWN and list(answer) == list(UNKNOWN)  # A1111's field order too
    assert internal(client, None) == UNKNOWN
    assert client.post("/internal/progress", json={"id_task": 5}).status_code == 422


def test_a_synchronous_request_with_force_task_id(app, client, service):
    """Queued while the device is busy ("In queue: i/n" counts every waiting request), active while sampling
    (progress and ETA, the caller's id_live_preview), completed once answered."""
    results = {}
    first, second = "task(sync-first)", "task(sync-second)"
    service.engine.import_runtime()  # done before: each request's only device job is then its generation
    with device_held(service):
        one = in_thread(lambda: results.update(one=app.test_client().post(
            "/sdapi/v1/txt2img", json={**LONG, "force_task_id": first})))
        wait_for(lambda: service.device.queued == 1, what="the first request waiting for the device")
        two = in_thread(lambda: results.update(two=app.test_client().post(
            "/sdapi/v1/txt2img", json={**TINY, "force_task_id": second})))
        wait_for(lambda: service.device.queued == 2, what="the second request waiting for the device")
        assert internal(client, first) == {**UNKNOWN, "queued": True, "textinfo": "In queue: 1/2"}
        assert internal(client, second)["textinfo"] == "In queue: 2/2"
    wait_for(lambda: sampling(service), what="the first request sampling")
    answer = internal(client, first, id_live_preview=7)
    assert answer["active"] and not answer["queued"] and not answer["completed"]
    assert 0 < answer["progress"] <= 1 and answer["eta"] >= 0
    assert (answer["live_preview"], answer["id_live_preview"], answer["textinfo"]) == (None, 7, None)
    assert internal(client, second)["textinfo"] == "In queue: 1/1"
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    one.join(120)
    two.join(120)
    assert results["one"].status_code == 200 and results["two"].status_code == 200
    assert internal(client, first) == COMPLETED and internal(client, second) == COMPLETED


def test_an_asynchronous_task(make_app):
    app = make_app()
    service, client = app.extensions["sdfunc"], app.test_client()
    service.engine.import_runtime()  # submitting imports it on the device thread, which is held below
    with device_held(service):
        task_id = client.post("/sdapi/v1/txt2img?async=true", json=TINY).json["task_id"]
        wait_for(lambda: service.progress.task_state(task_id), what="the task admitted")
        assert internal(client, task_id)["textinfo"] == "In queue: 1/1"
        view = client.get(f"/tasks/{task_id}").json
        assert view["progress"] == {"active": False, "queued": True, "completed": False, "position": 1, "step": None,
                                    "steps": None, "progress": 0.0, "eta": None, "textinfo": "In queue: 1/1"}
    wait_for(lambda: client.get(f"/tasks/{task_id}").json["status"] == "succeeded", what="the task done")
    assert internal(client, task_id) == COMPLETED
    assert client.get(f"/tasks/{task_id}").json["progress"] == {
        "active": False, "queued": False, "completed": True, "position": None, "step": None, "steps": None,
        "progress": 1.0, "eta": 0.0, "textinfo": "Waiting..."}


def test_tasks_of_other_instances_are_answered_from_the_database(make_app):
    """Tasks this instance never ran: a waiting one by its place among the tasks no worker has taken, a running
    one by the snapshot its runner stored, a finished one as completed."""
    app = make_app()
    client, store = app.test_client(), app.extensions["sdfunc"].tasks
    running = store.create(consumer="anonymous", request_id="r", mode="txt2img", tag=None, callback_url=None,
                           request_json=json.dumps(TINY))[0]["id"]
    assert store.claim("elsewhere")["id"] == running  # another instance's runner took it
    waiting = [store.create(consumer="anonymous", request_id=f"w{n}", mode="txt2img", tag=None, callback_url=None,
                            request_json=json.dumps(TINY))[0]["id"] for n in range(2)]
    assert internal(client, waiting[1]) == {**UNKNOWN, "queued": True, "textinfo": "In queue: 2/2"}
    assert client.get(f"/tasks/{waiting[0]}").json["progress"]["position"] == 1

    assert internal(client, running) == {**UNKNOWN, "active": True, "progress": 0.0, "id_live_preview": -1,
                                         "textinfo": None}  # its runner has not stored where it is yet
    store.set_progress(running, "elsewhere", {"step": 3, "steps": 10, "progress": 0.3, "eta": 7.0})
    assert internal(client, running, id_live_preview=2) == {
        "active": True, "queued": False, "completed": False, "progress": 0.3, "eta": 7.0, "live_preview": None,
        "id_live_preview": 2, "textinfo": None}
    assert client.get(f"/tasks/{running}").json["progress"] == {
        "active": True, "queued": False, "completed": False, "position": None, "step": 3, "steps": 10,
        "progress": 0.3, "eta": 7.0, "textinfo": None}
    assert store.finish(running, "elsewhere", status="failed", result=None, error="boom")
    assert internal(client, running) == COMPLETED
    assert client.get(f"/tasks/{running}").json["progress"]["progress"] == 1.0


# Who may see ----------------------------------------------------------------------------------------------------
def test_only_the_owner_or_an_admin_sees_a_task_or_a_job(make_app):
    app = make_app(auth={"mode": "basic", "users": ["a:1", "b:2", "root:3"], "admins": ["root"]})
    service, client = app.extensions["sdfunc"], app.test_client()
    a, b, root = basic("a", "1"), basic("b", "2"), basic("root", "3")
    results = {}
    thread = in_thread(lambda: results.update(r=client.post(
        "/sdapi/v1/txt2img", json={**LONG, "force_task_id": "task(a-1)"}, headers=a)))
    wait_for(lambda: sampling(service), what="a's job sampling")
    assert internal(client, "task(a-1)", b) == UNKNOWN
    assert internal(client, "task(a-1)", a)["active"] and internal(client, "task(a-1)", root)["active"]
    idle = client.get("/sdapi/v1/progress", headers=b).json
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0 and idle["state"]["job"] == ""
    for headers in (a, root):
        assert client.get("/sdapi/v1/progress", headers=headers).json["state"]["job_count"] > 0
    assert client.post("/sdapi/v1/interrupt", headers=a).status_code == 200
    thread.join(120)
    assert results["r"].status_code == 200
    assert internal(client, "task(a-1)", b) == UNKNOWN
    assert internal(client, "task(a-1)", a) == COMPLETED == internal(client, "task(a-1)", root)

    task_id = client.post("/sdapi/v1/txt2img?async=true", json=TINY, headers=a).json["task_id"]
    wait_for(lambda: client.get(f"/tasks/{task_id}", headers=a).json["status"] == "succeeded", what="a's task")
    assert internal(client, task_id, a) == COMPLETED == internal(client, task_id, root)
    assert internal(client, task_id, b) == UNKNOWN  # not a 404: nothing tells that the task exists
    assert client.post("/internal/progress", json={"id_task": task_id}).status_code == 401
