"""The lifecycle hooks (`POST /initialize`, `GET /pre-stop`) answer only the instance's own hook command
(`sdfunc hook`, with the lifecycle key it reads from a file only the container's user can read) or, with
authentication on, an admin: anyone who reaches the port must not stop or warm an instance, in auth mode `none`
too. (`sdfunc hook` against a real server: tests/e2e/test_lifecycle_hook_command.py.)"""

from __future__ import annotations

import os
import stat

import pytest

from handler.security import lifecycle_key as lifecycle
from tests.conftest import basic, make_settings

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


def test_hooks_need_the_key_without_auth_too(data_dir, tmp_path):
    """Auth mode `none` (the default, bound to 0.0.0.0): no credentials exist, so only the key opens the hooks."""
    app = build(data_dir, tmp_path, port=19532)
    client = app.test_client()
    service = app.extensions["sdfunc"]
    try:
        assert lifecycle.read_key(lifecycle.key_file(19532)) == service.lifecycle_key
        for method, path in (("POST", "/initialize"), ("GET", "/pre-stop")):
            for headers in ({}, {lifecycle.HEADER: "guess"}, basic("anyone", "pw")):
                refused = client.open(path, method=method, headers=headers)
                assert refused.status_code == 403, (path, headers)
                assert refused.json["error"]["code"] == "forbidden" and lifecycle.HEADER in refused.json["error"][
                    "message"]
        assert service.state == "READY" and not service.loaded_models()  # not drained, nothing warmed
        assert client.get("/healthz").status_code == 200
        assert client.post("/initialize", headers={lifecycle.HEADER: service.lifecycle_key}).status_code == 200
        assert service.loaded_models()
        for _ in range(2):  # draining is idempotent
            assert client.get("/pre-stop", headers={lifecycle.HEADER: service.lifecycle_key}).status_code == 200
        drained = client.get("/healthz")
        assert drained.status_code == 503 and drained.json["status"] == "STOPPING"
    finally:
        service.stop()
