"""The bounded queue through real gunicorn: with `queue.max_waiting` 2, one request running and three more sent,
exactly the one over the limit is answered 429 (in process: tests/http/test_queue.py)."""

from __future__ import annotations

import shutil
import threading

import requests

from tests.conftest import TINY
from tests.support.serving import ServeProcess


def test_through_gunicorn_twice_the_queue_gets_the_right_number_of_429s(tmp_path, data_dir):
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
