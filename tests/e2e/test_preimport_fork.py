"""The gunicorn master imports the runtime before it forks (handler.gunicorn_conf.preimport): a process forked
after those imports must generate exactly what a fresh process generates, through the real request path."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import base64, hashlib, json, os, sys, threading
import pipelines

data, mode = sys.argv[1], sys.argv[2]


def generate():
    from handler.app import create_app
    from handler.settings import Settings

    app = create_app(Settings(data_dir=data, warmup={"on_start": False}, log_json=False, record_requests=False))
    r = app.test_client().post("/sdapi/v1/txt2img", json={"prompt": "a red house", "steps": 3, "width": 64,
                                                          "height": 64, "seed": 7, "sampler_name": "Euler a"})
    assert r.status_code == 200, r.get_data(as_text=True)
    import torch

    png = base64.b64decode(r.get_json()["images"][0])
    return {"png_sha256": hashlib.sha256(png).hexdigest(), "torch_threads": torch.get_num_threads()}


if mode == "fresh":
    print(json.dumps(generate()))
    sys.exit(0)

from handler.gunicorn_conf import preimport

preimport({"sd1"})
parent = {"python_threads": threading.active_count(), "torch": "torch" in sys.modules,
          "pipeline_class": "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion" in sys.modules,
          "controlnet": "diffusers.pipelines.controlnet" in sys.modules}
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    try:
        out = generate()
    except BaseException as e:
        out = {"error": repr(e)}
    os.write(write_end, json.dumps(out).encode())
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end, "rb") as stream:
    child = json.loads(stream.read() or b"{}")
_, status = os.waitpid(pid, 0)
print(json.dumps({"parent": parent, "child": child, "exit_status": status}))
"""


def _start(data_dir, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(data_dir), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_a_child_forked_after_the_imports_generates_what_a_fresh_process_does(data_dir):
    runs = {mode: _start(data_dir, mode) for mode in ("fork", "fresh")}  # side by side: the imports dominate
    forked, fresh = _result(runs["fork"]), _result(runs["fresh"])
    parent = forked["parent"]
    # The master imported torch and SD 1.5's pipeline classes, not the ControlNet ones, and started no thread.
    assert parent == {"python_threads": 1, "torch": True, "pipeline_class": True, "controlnet": False}
    assert forked["exit_status"] == 0 and "error" not in forked["child"], forked
    assert forked["child"] == fresh  # the same PNG bytes, with the same torch thread pool size
