"""Asynchronous tasks through real gunicorn when the worker dies mid-task: the task runs again (on the worker
gunicorn starts in place of the dead one) or, past `tasks.max_delivery`, is failed; never left running. (The
rest of the tasks API, in process: tests/http/test_tasks.py.)"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable

import requests

from tests.conftest import TINY
from tests.support.serving import ServeProcess
from tests.support.waiting import wait_for


def _wait_task(server: ServeProcess, task_url: str, done: Callable[[dict], bool], what: str,
               timeout: float = 180) -> dict:
    """Poll the task's view until `done(view)`; while a new worker starts the server may not answer."""
    last: dict = {}

    def view_when_done() -> dict | None:
        try:
            last["view"] = requests.get(task_url, timeout=10).json()
        except requests.RequestException:
            return None  # a new worker is starting
        return last["view"] if done(last["view"]) else None

    def failure() -> str:
        lines = [e for e in server.log_entries() if e["logger"] != "sdfunc.request"]
        return f"{what}: {last.get('view', '')}\n" + "\n".join(
            f"{e['ts']} {e['logger']} {e['msg']}" for e in lines[-40:])

    return wait_for(view_when_done, timeout, failure, interval=0.1)


def test_a_task_whose_worker_dies_is_run_again_then_failed(tmp_path, data_dir):
    """max_delivery 2: a task killed on both of its runs is failed, never left running; a task killed once runs
    again (here on the worker gunicorn starts in place of the dead one) and succeeds."""
    data = tmp_path / "data"
    shutil.copytree(data_dir / "models" / "Stable-diffusion", data / "models" / "Stable-diffusion")
    server = ServeProcess(data, SDFUNC_WARMUP__SHAPES='["64x64@1"]', SDFUNC_TASKS__MAX_DELIVERY="2",
                          SDFUNC_TASKS__HEARTBEAT_SECONDS="0.3", SDFUNC_TASKS__STALE_SECONDS="1.5")
    long = {**TINY, "steps": 40, "width": 192, "height": 192}

    def submit() -> str:
        r = requests.post(f"{server.url}/sdapi/v1/txt2img?async=true", json=long, timeout=30)
        assert r.status_code == 202
        return f"{server.url}/tasks/{r.json()['task_id']}"

    def kill_while_running(url: str, delivery: int) -> None:
        _wait_task(server, url, lambda v: v["status"] == "running" and v["deliveries"] == delivery,
                   f"run {delivery} never started")
        os.kill(server.worker_pid(), signal.SIGKILL)

    def final(url: str) -> dict:
        return _wait_task(server, url, lambda v: v["status"] in ("succeeded", "failed"), "the task never ended")

    try:
        server.wait_state("READY")
        doomed = submit()
        kill_while_running(doomed, 1)
        kill_while_running(doomed, 2)
        view = final(doomed)
        assert view["status"] == "failed" and "stopped" in view["error_msg"] and view["deliveries"] == 2, view
        server.wait_state("READY")
        survivor = submit()
        kill_while_running(survivor, 1)
        view = final(survivor)
        assert view["status"] == "succeeded" and view["deliveries"] == 2, view
        assert view["result"]["parameters"]["image_url"]
    finally:
        server.stop()
