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
    unless `commit` says no. (The SDK's `close()` does not end `run()`, which reconnects: `close` here also leaves
    the loop at its next frame, uncommitted, and drops the socket it reconnected.)"""

    def __init__(self, sink, commit=lambda frame: True, window: int = 5) -> None:
        self.sink, self.commit, self.frames, self.closed = sink, commit, [], False
        self.watcher = sink.watch(0, window, auto_commit=False)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for x in self.watcher.run():
                if self.closed:
                    break
                self.frames.append(x)
                if self.commit(x):
                    self.sink.commit(x.index)
        except Exception:  # the socket was dropped by the test
            pass
        if self.sink.watch_sock is not None:
            self.sink.watch_sock.abort()

    def tags(self) -> list[str]:
        return [x.tags.get("task_id") for x in self.frames]

    def close(self) -> None:
        self.closed = True
        self.watcher.close()


def test_the_documented_samples_on_two_instances_sharing_mariadb(data, mariadb):
    """PAI-EAS's samples (their payloads at a size this CPU runs fast): ten plain-HTTP puts on instance a, one SDK
    put on b; an SDK watcher on b gets every tag and commits all but the img2img results; after it closes, a
    watcher on a gets exactly those again, then what is put later. Both instances took work from the one queue,
    each request was charged once. On a (one watcher place, one queue place): a second watcher is refused at the
    handshake, bad watch queries before it, and synchronous generations run while the watcher is connected."""
    db_url = mariadb.create_database("t_eas_queue")
    png = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 40, 40)).save(png, "PNG")
    a = _serve(data, SDFUNC_DATABASE_URL=db_url, SDFUNC_TASKS__MAX_WATCHERS="1", SDFUNC_QUEUE__MAX_WAITING="1")
    b = _serve(data, SDFUNC_DATABASE_URL=db_url)
    watchers: list[Watching] = []
    with LoopbackServer({"/boy.png": (200, {"Content-Type": "image/png"}, png.getvalue())}) as images:
        try:
            a.wait_state("READY")
            b.wait_state("READY")
            outputs = data / "outputs"
            # The plain-HTTP sample, unchanged but for the URL, the token, the size and where the mount is.
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
            assert len(set(indexes)) == 10 and indexes == sorted(indexes)
            # The SDK's put, on the other instance.
            put = _client(b, f"{SERVICE}/sdapi/v1/txt2img")
            index, request_id = put.put(json.dumps({**TINY, "prompt": "sdk"}).encode(), tags={"task_id": "sdk_0"})
            assert int(index) > 0 and request_id
            # The SDK's watcher on b commits all but the img2img results (a window of 5 would stop at those 5).
            sink = _client(b, f"{SERVICE}/sink")
            first = Watching(sink, commit=lambda x: not x.tags["task_id"].startswith("img2img"), window=16)
            watchers.append(first)
            expected = {f"txt2img_{i}" for i in range(5)} | {f"img2img_{i}" for i in range(5)} | {"sdk_0"}
            wait_for(lambda: set(first.tags()) == expected, timeout=300,
                     what=lambda: f"every tag on the sink (got {sorted(first.tags())})")
            assert len(first.frames) == 11 and [x.index for x in first.frames] == sorted(x.index for x in first.frames)
            for x in first.frames:
                result = json.loads(x.data.decode("utf-8"))
                params = result["parameters"]
                assert result["images"] == [] and params["status"] == 0 and x.tags["requestId"]
                for path in params["image_url"].split(","):
                    assert Path(path).is_file() and Path(path).is_relative_to(outputs)
            first.close()
            # A watcher on a gets the uncommitted ones again.
            sink_a = _client(a, f"{SERVICE}/sink")
            second = Watching(sink_a)
            watchers.append(second)
            wait_for(lambda: sorted(second.tags()) == sorted(f"img2img_{i}" for i in range(5)), timeout=60,
                     what=lambda: f"the uncommitted results again (got {second.tags()})")
            # It holds a's one watcher place, and neither the device nor the queue place.
            headers = [f"Authorization: {TOKEN}"]
            ws_url = f"ws://127.0.0.1:{a.port}/api/predict/{SERVICE}/sink"
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
            assert "sdfunc_queue_watchers 1.0" in requests.get(f"{a.url}/metrics", timeout=5).text
            codes: list[int] = []
            sync = [threading.Thread(target=lambda: codes.append(requests.post(
                f"{a.url}/sdapi/v1/txt2img", json=TINY, timeout=120, headers={"Authorization": TOKEN}).status_code))
                for _ in range(2)]  # the device and the one queue place
            for t in sync:
                t.start()
            for t in sync:
                t.join()
            assert codes == [200, 200]
            # Only what is put after the commits comes next.
            put.put(json.dumps(TINY).encode(), tags={"task_id": "after"})
            wait_for(lambda: len(second.frames) == 6, timeout=120, what="the result put after the commits")
            assert second.tags()[-1] == "after"
            wait_for(lambda: sink_a.attributes()["stream.length"] == "0", timeout=30, what="the watcher's commit")
            # Both instances took a's puts from the one queue, and every request was charged once.
            runners, charged = _records(db_url)
            assert len(runners) == 2, runners
            assert charged == 14  # 12 puts and 2 synchronous requests: none charged twice, none lost
            # A client that sends data on a watch is cut off (1003): nothing it sends is read.
            chatty = websocket.create_connection(f"ws://127.0.0.1:{b.port}/api/predict/{SERVICE}/sink?_watch_=true",
                                                 header=headers, timeout=30)
            chatty.send("hello")
            opcode, data = chatty.recv_data(control_frame=True)
            assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1003
            chatty.close()
            # Pre-stop ends a's watcher (1001) and refuses new ones; the results stay for another instance.
            assert requests.get(f"{a.url}/pre-stop", headers={"Authorization": TOKEN}, timeout=120).ok
            wait_for(lambda: "sdfunc_queue_watchers 0.0" in requests.get(f"{a.url}/metrics", timeout=5).text,
                     timeout=30, what="the watcher to end at pre-stop")
            with pytest.raises(websocket.WebSocketBadStatusException) as stopping:
                websocket.create_connection(f"{ws_url}?_watch_=true", header=headers)
            assert stopping.value.status_code == 503
        finally:
            for w in watchers:
                w.close()
            a.stop()
            b.stop()


def _records(db_url: str) -> tuple[set[str], int]:
    """The workers that ran the ten puts on instance a, and the count of succeeded ledger rows."""
    from sqlalchemy import create_engine, func, select

    from handler.records.db import ledger, tasks

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            runners = {row.runner for row in conn.execute(select(tasks.c.runner).where(
                tasks.c.tag.like("txt2img_%") | tasks.c.tag.like("img2img_%")))}
            charged = conn.execute(select(func.count()).select_from(ledger).where(
                ledger.c.status == "succeeded")).scalar_one()
            assert conn.execute(select(func.count()).select_from(ledger)).scalar_one() == charged
    finally:
        engine.dispose()
    return runners, charged
