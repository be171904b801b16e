"""PAI-EAS's queue service through real gunicorn, driven as PAI-EAS documents it: the plain-HTTP put sample and the
`eas_prediction` SDK (from PyPI) putting, watching the sink over a WebSocket and committing; two instances on one
MariaDB serving one queue; a watcher never holds the device or a queue place. (The verbs in process:
tests/http/test_eas_queue.py.)"""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import TINY
from tests.support.loopback import LoopbackServer
from tests.support.serving import ServeProcess
from tests.support.waiting import wait_for

eas_prediction = pytest.importorskip("eas_prediction", reason="pip install eas-prediction==0.36 (test extras)")
websocket = pytest.importorskip("websocket")

TOKEN = "queue-test-token"
SERVICE = "sd_async"
STEPS = {"steps": 6, "width": 96, "height": 96}  # long enough that the other instance polls in meanwhile


@pytest.fixture
def data(tmp_path, data_dir) -> Path:
    root = tmp_path / "data"
    shutil.copytree(data_dir / "models" / "Stable-diffusion", root / "models" / "Stable-diffusion")
    return root


def _serve(data: Path, **env: str) -> ServeProcess:
    return ServeProcess(data, SDFUNC_WARMUP__SHAPES='["64x64@1"]', SDFUNC_AUTH__MODE="token",
                        SDFUNC_AUTH__TOKENS=TOKEN, SDFUNC_NETWORK__ALLOW_HOSTS='["127.0.0.1/32"]',
                        SDFUNC_TASKS__POLL_SECONDS="0.2", **env)


def _client(server: ServeProcess, queue: str):
    client = eas_prediction.QueueClient(f"127.0.0.1:{server.port}", queue)
    client.set_token(TOKEN)
    client.init()
    client.set_logger(logging.getLogger("eas-test"))
    return client


class Watching:
    """The SDK's watcher, run on a thread as a user's loop runs it: every frame it yields is kept, and committed
    unless `commit` says no."""

    def __init__(self, sink, commit=lambda frame: True) -> None:
        self.sink, self.commit, self.frames = sink, commit, []
        self.watcher = sink.watch(0, 5, auto_commit=False)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for x in self.watcher.run():
                self.frames.append(x)
                if self.commit(x):
                    self.sink.commit(x.index)
        except Exception:  # closed by the test
            pass

    def tags(self) -> list[str]:
        return [x.tags.get("task_id") for x in self.frames]

    def close(self) -> None:
        self.watcher.close()


def test_the_documented_samples_on_two_instances_sharing_mariadb(data, mariadb):
    db_url = mariadb.create_database("t_eas_queue")
    png = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 40, 40)).save(png, "PNG")
    a = _serve(data, SDFUNC_DATABASE_URL=db_url)
    b = _serve(data, SDFUNC_DATABASE_URL=db_url)
    watchers: list[Watching] = []
    with LoopbackServer({"/boy.png": (200, {"Content-Type": "image/png"}, png.getvalue())}) as images:
        try:
            a.wait_state("READY")
            b.wait_state("READY")
            outputs = data / "outputs"
            # The plain-HTTP sample, unchanged but for the URL, the token and where the mount is.
            url = f"{a.url}/api/predict/{SERVICE}"
            session = requests.session()
            session.headers.update({"Authorization": TOKEN})
            prompts = ["cute dog", "cute cat", "cute girl"]
            indexes = []
            for i in range(5):
                payload = {"prompt": prompts[i % len(prompts)], **STEPS,
                           "alwayson_scripts": {"save_dir": f"{outputs}/txt2img"}}
                response = session.post(url=f"{url}/sdapi/v1/txt2img?task_id=txt2img_{i}", json=payload)
                assert response.status_code == 200, response.text
                indexes.append(int(response.content))
            for i in range(5):
                payload = {"prompt": prompts[i % len(prompts)], **STEPS,
                           "alwayson_scripts": {"save_dir": f"{outputs}/img2img",
                                                "image_link": images.url("/boy.png")}}
                response = session.post(url=f"{url}/sdapi/v1/img2img?task_id=img2img_{i}", json=payload)
                assert response.status_code == 200, response.text
                indexes.append(int(response.content))
            assert len(set(indexes)) == 10 and indexes[:5] == sorted(indexes[:5])
            # The SDK's put, on the other instance.
            put = _client(b, f"{SERVICE}/sdapi/v1/txt2img")
            index, request_id = put.put(json.dumps({**TINY, "prompt": "sdk"}).encode(), tags={"task_id": "sdk_0"})
            assert int(index) > 0 and request_id
            # The SDK's watcher on instance b commits all but the img2img results; closed, and a new watcher on a
            # gets exactly those uncommitted ones again, commits them, and then only what is put afterwards.
            sink = _client(b, f"{SERVICE}/sink")
            first = Watching(sink, commit=lambda x: not x.tags["task_id"].startswith("img2img"))
            watchers.append(first)
            expected = {f"txt2img_{i}" for i in range(5)} | {f"img2img_{i}" for i in range(5)} | {"sdk_0"}
            wait_for(lambda: set(first.tags()) == expected, timeout=300,
                     what=lambda: f"every tag on the sink (got {sorted(first.tags())})")
            for x in first.frames:
                result = json.loads(x.data.decode("utf-8"))
                params = result["parameters"]
                assert result["images"] == [] and params["status"] == 0 and x.tags["requestId"]
                for path in params["image_url"].split(","):
                    assert Path(path).is_file() and Path(path).is_relative_to(outputs)
            first.close()
            sink_a = _client(a, f"{SERVICE}/sink")
            second = Watching(sink_a)
            watchers.append(second)
            wait_for(lambda: sorted(second.tags()) == sorted(f"img2img_{i}" for i in range(5)), timeout=60,
                     what=lambda: f"the uncommitted results again (got {second.tags()})")
            put.put(json.dumps(TINY).encode(), tags={"task_id": "after"})
            wait_for(lambda: len(second.frames) == 6, timeout=120, what="the result put after the commits")
            assert second.tags()[-1] == "after" and sink_a.attributes()["stream.length"] == "0"
            # Both instances took work from the one queue, and each result was charged once.
            instances = _instances_that_ran(db_url)
            assert len(instances) == 2, instances
        finally:
            for w in watchers:
                w.close()
            a.stop()
            b.stop()


def _instances_that_ran(db_url: str) -> dict[str, int]:
    """Ledger rows per instance (each charged generation is one row)."""
    from sqlalchemy import create_engine, func, select

    from handler.records.db import ledger

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(ledger.c.instance_id, func.count()).where(ledger.c.status == "succeeded")
                                .group_by(ledger.c.instance_id)).all()
            total = conn.execute(select(func.count()).select_from(ledger)).scalar_one()
    finally:
        engine.dispose()
    assert total == 12  # one row per queued request: none charged twice, none lost
    return {row[0]: row[1] for row in rows}


def test_a_watcher_holds_no_device_or_queue_place(data):
    """One watcher place (tasks.max_watchers 1): a second watcher is refused at the handshake with 503; while the
    first is connected, synchronous generations run as before; bad watch queries are refused before the upgrade."""
    server = _serve(data, SDFUNC_TASKS__MAX_WATCHERS="1", SDFUNC_QUEUE__MAX_WAITING="1")
    watching = None
    try:
        server.wait_state("READY")
        sink = _client(server, f"{SERVICE}/sink")
        watching = Watching(sink)
        headers = [f"Authorization: {TOKEN}"]
        ws_url = f"ws://127.0.0.1:{server.port}/api/predict/{SERVICE}/sink"

        def watcher_connected() -> bool:
            metrics = requests.get(f"{server.url}/metrics", timeout=5).text
            return "sdfunc_queue_watchers 1.0" in metrics

        wait_for(watcher_connected, timeout=60, what="the watcher to connect")
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(f"{ws_url}?_watch_=true&_index_=0&_window_=5", header=headers)
        assert refused.value.status_code == 503
        for query in ("_index_=abc", "_window_=0", "_auto_commit_=maybe"):
            with pytest.raises(websocket.WebSocketBadStatusException) as bad:
                websocket.create_connection(f"{ws_url}?_watch_=true&{query}", header=headers)
            assert bad.value.status_code == 422
        with pytest.raises(websocket.WebSocketBadStatusException) as unauthorized:
            websocket.create_connection(f"{ws_url}?_watch_=true", header=["Authorization: wrong"])
        assert unauthorized.value.status_code == 401
        results = []

        def generate() -> None:
            results.append(requests.post(f"{server.url}/sdapi/v1/txt2img", json=TINY, timeout=120,
                                         headers={"Authorization": TOKEN}).status_code)

        threads = [threading.Thread(target=generate) for _ in range(2)]  # the device and the one queue place
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200, 200]
        put = _client(server, f"{SERVICE}/sdapi/v1/txt2img")
        put.put(json.dumps(TINY).encode(), tags={"task_id": "while-watching"})
        wait_for(lambda: watching.tags() == ["while-watching"], timeout=120, what="the watcher's result")
    finally:
        if watching is not None:
            watching.close()
        server.stop()
