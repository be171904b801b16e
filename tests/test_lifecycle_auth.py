"""With authentication on, the lifecycle hooks (`POST /initialize`, `GET /pre-stop`) answer only the instance's
own hook command (`sdfunc hook`, with the lifecycle key it reads from a file only the container's user can
read) or an admin: a public trigger must not let anyone stop or warm an instance. With auth mode `none` they
stay open."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
import requests

from handler.security import lifecycle_key as lifecycle
from tests.conftest import basic, make_settings
from tests.serving import ServeProcess

USERS = {"mode": "basic", "users": ["alice:pw1", "ops:pw2"], "admins": ["ops"]}
TINY_WARMUP = {"on_start": False, "shapes": ["sd1:64x64@1"]}


def build(data_dir, tmp_path, **overrides):
    from handler.app import create_app

    return create_app(make_settings(data_dir, database_url=f"sqlite:///{tmp_path / 'r.sqlite3'}",
                                    warmup=TINY_WARMUP, **overrides))


@pytest.fixture
def guarded(data_dir, tmp_path):
    app = build(data_dir, tmp_path, port=19531, auth=USERS)
    yield app
    app.extensions["sdfunc"].stop()


def test_hooks_need_the_lifecycle_key_or_an_admin(guarded):
    client = guarded.test_client()
    service = guarded.extensions["sdfunc"]
    key_path = lifecycle.key_file(19531)
    assert lifecycle.read_key(key_path) == service.lifecycle_key
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600  # only the container's user reads it
    for method, path in (("POST", "/initialize"), ("GET", "/pre-stop")):
        anonymous = client.open(path, method=method)
        assert anonymous.status_code == 401 and "WWW-Authenticate" in anonymous.headers
        assert client.open(path, method=method, headers=basic("alice", "pw1")).status_code == 403
        wrong = client.open(path, method=method, headers={lifecycle.HEADER: "guess"})
        assert wrong.status_code == 401
    assert service.state != "STOPPING"  # nobody above got through
    assert client.post("/initialize", headers={lifecycle.HEADER: service.lifecycle_key}).status_code == 200
    assert client.post("/initialize", headers=basic("ops", "pw2")).status_code == 200
    assert client.get("/pre-stop", headers={lifecycle.HEADER: service.lifecycle_key}).status_code == 200
    assert service.state == "STOPPING"


def test_hooks_stay_open_without_auth(data_dir, tmp_path):
    app = build(data_dir, tmp_path, port=19532)
    try:
        assert app.extensions["sdfunc"].lifecycle_key is None
        assert not lifecycle.key_file(19532).exists()
        assert app.test_client().post("/initialize").status_code == 200
        assert app.test_client().get("/pre-stop").status_code == 200
    finally:
        app.extensions["sdfunc"].stop()


def test_sdfunc_hook_drives_a_real_server(data_dir, tmp_path):
    """What FC runs in the container: `sdfunc hook initialize`, then `sdfunc hook pre-stop`."""
    root = tmp_path / "data"
    shutil.copytree(data_dir / "models" / "Stable-diffusion", root / "models" / "Stable-diffusion")
    server = ServeProcess(root, SDFUNC_AUTH__MODE="basic", SDFUNC_AUTH__USERS="alice:pw1",
                          SDFUNC_WARMUP__ON_START="false", SDFUNC_WARMUP__SHAPES='["sd1:64x64@1"]')
    try:
        server.wait_state("READY")
        assert requests.get(f"{server.url}/pre-stop", timeout=10).status_code == 401  # the public way is shut
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDFUNC_")}
        env["SDFUNC_AUTH__MODE"] = "basic"

        def hook(name: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "handler.cli", "hook", name, "--port", str(server.port),
                                   "--wait", "30"], env=env, capture_output=True, text=True, timeout=300)

        done = hook("initialize")
        assert done.returncode == 0, done.stderr
        assert "demo-sd15" in done.stdout  # the warm-up report
        assert requests.get(f"{server.url}/health", timeout=10).json()["loaded_models"]
        stopped = hook("pre-stop")
        assert stopped.returncode == 0, stopped.stderr
        assert requests.get(f"{server.url}/health", timeout=10).json()["status"] == "STOPPING"
    finally:
        server.stop()
    refused = subprocess.run([sys.executable, "-m", "handler.cli", "hook", "pre-stop", "--port", str(server.port),
                              "--wait", "1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1  # nothing listens any more: the hook fails, FC sees it
