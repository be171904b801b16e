"""`sdfunc hook initialize` and `sdfunc hook pre-stop`, as FC runs them in the container, against a real server:
the hook command gets through with the instance's lifecycle key, the public way does not. (The hooks'
authorization in process: tests/http/test_lifecycle_auth.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import requests

from tests.support.serving import ServeProcess


def test_sdfunc_hook_drives_a_real_server(data_dir, tmp_path):
    """What FC runs in the container: `sdfunc hook initialize`, then `sdfunc hook pre-stop`, on a server in the
    default auth mode `none` (where the hooks' key is the only way in; with auth on an admin may call them too,
    tests/http/test_lifecycle_auth.py)."""
    root = tmp_path / "data"
    shutil.copytree(data_dir / "models" / "Stable-diffusion", root / "models" / "Stable-diffusion")
    server = ServeProcess(root, SDFUNC_WARMUP__ON_START="false", SDFUNC_WARMUP__SHAPES='["sd1:64x64@1"]')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFUNC_")}

    def hook(name: str, wait: float = 30) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "handler.cli", "hook", name, "--port", str(server.port),
                                 "--wait", str(wait)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    try:
        # As FC runs its initializer: at once, before gunicorn listens and before the worker has written its key;
        # the hook waits for both.
        initializing = hook("initialize", wait=240)
        out, err = initializing.communicate(timeout=300)
        assert initializing.returncode == 0, err
        assert "demo-sd15" in out  # the warm-up report
        assert requests.get(f"{server.url}/health", timeout=10).json()["loaded_models"]
        for method, path in (("POST", "/initialize"), ("GET", "/pre-stop")):  # the public way is shut
            assert requests.request(method, f"{server.url}{path}", timeout=10).status_code == 403
        assert requests.get(f"{server.url}/healthz", timeout=10).json()["status"] == "READY"
        stopping = hook("pre-stop")
        out, err = stopping.communicate(timeout=300)
        assert stopping.returncode == 0, err
        assert requests.get(f"{server.url}/health", timeout=10).json()["status"] == "STOPPING"
    finally:
        server.stop()
    refused = subprocess.run([sys.executable, "-m", "handler.cli", "hook", "pre-stop", "--port", str(server.port),
                              "--wait", "1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1  # nothing listens any more: the hook fails, FC sees it
