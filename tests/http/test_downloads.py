"""POST /models/download from a real loopback server: files land in the right folder only when complete and
checked, listings show them, and every failure (digest, format, cut connection, limits) leaves nothing."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from safetensors.numpy import save

from tests.conftest import basic, make_settings
from tests.support.loopback import LoopbackServer
from tests.support.waiting import wait_for

ST = save({"w": np.arange(64, dtype=np.float32).reshape(8, 8)})  # a real, tiny safetensors file
ST2 = save({"w": np.ones((4, 4), dtype=np.float32)})


def build(tmp_path: Path, **overrides):
    from handler.app import create_app

    values = {"downloads": {"allow_http": True}, "network": {"allow_hosts": ["127.0.0.1/32"]},
              "record_requests": False, **overrides}
    app = create_app(make_settings(tmp_path / "data", **values))
    return app, app.test_client()


@pytest.fixture
def server():
    with LoopbackServer({"/model.safetensors": (200, {}, ST), "/other.safetensors": (200, {}, ST2),
                         "/notes.txt": (200, {}, b"just text, long enough to have a header length" * 4)}) as s:
        yield s


def finished(client, download_id: str, headers: dict | None = None) -> dict:
    view: dict = {}

    def done() -> bool:
        nonlocal view
        view = client.get(f"/models/download/{download_id}", headers=headers or {}).json
        return view["status"] in ("succeeded", "failed")

    wait_for(done, timeout=30, what=f"download {download_id}")
    return view


def start(client, headers: dict | None = None, **body):
    return client.post("/models/download", json=body, headers=headers or {})


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".download-")]


def test_checkpoint_vae_and_lora_downloads_are_listed(tmp_path, server):
    _, client = build(tmp_path)
    data = tmp_path / "data"
    r = start(client, source=server.url("/model.safetensors"), type="CHECKPOINT", file_name="fresh.safetensors",
              sha256=hashlib.sha256(ST).hexdigest())
    assert r.status_code == 202, r.json
    assert r.headers["Location"] == f"/models/download/{r.json['id']}" and r.json["status"] in ("queued", "running")
    view = finished(client, r.json["id"])
    assert view["status"] == "succeeded", view
    assert view["bytes_done"] == view["bytes_total"] == len(ST) and view["sha256"] == hashlib.sha256(ST).hexdigest()
    assert view["path"] == "models/Stable-diffusion/fresh.safetensors"
    assert (data / view["path"]).read_bytes() == ST
    assert "fresh.safetensors" in [m["filename"].rsplit("/", 1)[-1] for m in client.get("/sdapi/v1/sd-models").json]

    for kind, name, listing, key in (("VAE", "v.safetensors", "/sdapi/v1/sd-vae", "model_name"),
                                     ("LORA", "style.safetensors", "/sdapi/v1/loras", "name")):
        r = start(client, source=server.url("/model.safetensors"), type=kind, file_name=name)
        assert finished(client, r.json["id"])["status"] == "succeeded"
        assert any(item[key] in (name, name.removesuffix(".safetensors")) for item in client.get(listing).json)
    r = start(client, source=server.url("/model.safetensors"), type="EMBEDDING", file_name="ti.safetensors")
    assert finished(client, r.json["id"])["status"] == "succeeded" and (data / "embeddings/ti.safetensors").is_file()
    r = start(client, source=server.url("/notes.txt"), type="OTHER", folder="ControlNet/annotators",
              file_name="notes.txt")
    assert finished(client, r.json["id"])["status"] == "succeeded"
    assert (data / "models/ControlNet/annotators/notes.txt").is_file()
    assert client.get("/models/download").json["downloads"][0]["id"] == r.json["id"]  # newest first
    assert leftovers(data) == []


def test_existing_files_are_kept_unless_overwrite(tmp_path, server):
    _, client = build(tmp_path)
    target = tmp_path / "data/models/Stable-diffusion/m.safetensors"
    r = start(client, source=server.url("/model.safetensors"), type="CHECKPOINT", file_name="m.safetensors")
    assert finished(client, r.json["id"])["status"] == "succeeded"
    again = start(client, source=server.url("/other.safetensors"), type="CHECKPOINT", file_name="m.safetensors")
    assert again.status_code == 409 and again.json["error"]["code"] == "file_exists"
    assert again.json["error"]["field"] == "file_name"
    r = start(client, source=server.url("/other.safetensors"), type="CHECKPOINT", file_name="m.safetensors",
              overwrite=True)
    assert finished(client, r.json["id"])["status"] == "succeeded" and target.read_bytes() == ST2


@pytest.mark.parametrize("body, reason", [
    ({"source": "/model.safetensors", "sha256": "0" * 64}, "sha256 mismatch"),
    ({"source": "/notes.txt"}, "not a safetensors file"),
    ({"source": "/missing.safetensors"}, "HTTP 404"),
])
def test_failures_leave_no_file(tmp_path, server, body, reason):
    _, client = build(tmp_path)
    r = start(client, type="CHECKPOINT", file_name="bad.safetensors", **{**body, "source": server.url(body["source"])})
    assert r.status_code == 202, r.json
    view = finished(client, r.json["id"])
    assert view["status"] == "failed" and reason in view["error"], view
    assert not (tmp_path / "data/models/Stable-diffusion/bad.safetensors").exists()
    assert leftovers(tmp_path / "data") == []


def test_pickles_are_refused_where_models_load(tmp_path, server):
    _, client = build(tmp_path)
    for body in ({"type": "CHECKPOINT", "file_name": "m.ckpt"}, {"type": "LORA", "file_name": "l.pt"},
                 {"type": "VAE", "file_name": "v.bin"}, {"type": "EMBEDDING", "file_name": "e.pt"},
                 {"type": "OTHER", "folder": "Stable-diffusion/sub", "file_name": "m.ckpt"},
                 {"type": "OTHER", "folder": "Lora", "file_name": "l.pt"}):
        r = start(client, source=server.url("/model.safetensors"), **body)
        assert r.status_code == 422 and r.json["error"]["field"] == "file_name", (body, r.json)
    assert server.requests == []


def test_a_connection_cut_mid_body_leaves_no_partial_file(tmp_path):
    release = threading.Event()

    def cut(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(ST) * 100))
        handler.end_headers()
        handler.wfile.write(ST)
        handler.wfile.flush()
        release.wait(20)
        handler.close_connection = True  # the server goes away with most of the body unsent

    with LoopbackServer({"/cut.safetensors": cut}) as server:
        _, client = build(tmp_path)
        folder = tmp_path / "data/models/Lora"
        r = start(client, source=server.url("/cut.safetensors"), type="LORA", file_name="cut.safetensors")
        wait_for(lambda: client.get(f"/models/download/{r.json['id']}").json["bytes_done"] == len(ST),
                 timeout=20, what="the first bytes")
        running = client.get(f"/models/download/{r.json['id']}").json
        assert running["status"] == "running" and running["bytes_total"] == len(ST) * 100
        assert [p.name for p in folder.iterdir()] == [f".download-{r.json['id']}.part"]  # hidden while incomplete
        assert "cut" not in [x["name"] for x in client.get("/sdapi/v1/loras").json]
        release.set()
        view = finished(client, r.json["id"])
    assert view["status"] == "failed" and "closed before" in view["error"]
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("body, field", [
    ({"file_name": "../x.safetensors"}, "file_name"),
    ({"file_name": "a/b.safetensors"}, "file_name"),
    ({"file_name": "a\\b.safetensors"}, "file_name"),
    ({"file_name": ".hidden.safetensors"}, "file_name"),
    ({"file_name": "x\x00.safetensors"}, "file_name"),
    ({"type": "OTHER", "folder": "../outside"}, "folder"),
    ({"type": "OTHER", "folder": "/etc"}, "folder"),
    ({"type": "OTHER", "folder": "a/../../b"}, "folder"),
    ({"type": "OTHER", "folder": "escape"}, "folder"),  # a symbolic link to outside the models folder
    ({"type": "LORA", "folder": "x"}, "folder"),
    ({"type": "OTHER"}, "folder"),
    ({"source": "ftp://127.0.0.1/x"}, "source"),
    ({"source": "file:///etc/passwd"}, "source"),
    ({"source": "oss://Bad_Bucket/key"}, "source"),
    ({"source": "oss://bucket/key"}, "source"),  # no OSS endpoint configured
    ({"sha256": "abc"}, "sha256"),
])
def test_bad_requests_are_refused(tmp_path, server, body, field):
    _, client = build(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "data/models/escape").symlink_to(outside)
    full = {"source": server.url("/model.safetensors"), "type": "CHECKPOINT", "file_name": "ok.safetensors", **body}
    if full["type"] == "OTHER":
        full["file_name"] = "ok.bin"
    r = start(client, **full)
    assert r.status_code == 422 and r.json["error"]["field"] == field, r.json
    assert list(outside.iterdir()) == []


def test_sources_are_guarded(tmp_path, server):
    _, client = build(tmp_path, network={})  # no allow-list: loopback is refused
    r = start(client, source=server.url("/model.safetensors"), type="CHECKPOINT", file_name="a.safetensors")
    assert r.status_code == 422 and r.json["error"]["field"] == "source" and "loopback" in r.json["error"]["message"]
    _, client = build(tmp_path / "2", downloads={})  # http is refused unless downloads.allow_http
    r = start(client, source=server.url("/model.safetensors"), type="CHECKPOINT", file_name="a.safetensors")
    assert r.status_code == 422 and "allow_http" in r.json["error"]["message"]
    server.routes["/big.safetensors"] = (200, {}, save({"w": np.zeros(1024, dtype=np.float32)}))
    _, client = build(tmp_path / "3", downloads={"allow_http": True, "max_bytes": 1024})
    r = start(client, source=server.url("/big.safetensors"), type="CHECKPOINT", file_name="a.safetensors")
    view = finished(client, r.json["id"])
    assert view["status"] == "failed" and "more than the limit of 1024" in view["error"]
    assert leftovers(tmp_path / "3") == []


def test_only_admins_may_download(tmp_path, server):
    _, client = build(tmp_path, auth={"mode": "basic", "users": ["root:pw", "bob:pw"], "admins": ["root"]})
    body = {"source": server.url("/model.safetensors"), "type": "CHECKPOINT", "file_name": "a.safetensors"}
    assert client.post("/models/download", json=body).status_code == 401
    r = client.post("/models/download", json=body, headers=basic("bob", "pw"))
    assert r.status_code == 403 and r.json["error"]["code"] == "forbidden"
    r = client.post("/models/download", json=body, headers=basic("root", "pw"))
    assert r.status_code == 202
    assert client.get(f"/models/download/{r.json['id']}", headers=basic("bob", "pw")).status_code == 403
    assert finished(client, r.json["id"], basic("root", "pw"))["status"] == "succeeded"
    assert server.requests and all("Authorization" not in q["headers"] for q in server.requests)
    assert client.get("/models/download/" + "0" * 32, headers=basic("root", "pw")).status_code == 404


def held_until(release: threading.Event):
    """A route that answers the safetensors file only once `release` is set (a download that stays running)."""

    def slow(handler):
        release.wait(20)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(ST)))
        handler.end_headers()
        handler.wfile.write(ST)

    return slow


def test_a_full_queue_answers_429(tmp_path):
    release = threading.Event()
    slow = held_until(release)

    with LoopbackServer({"/slow.safetensors": slow}) as server:
        _, client = build(tmp_path, downloads={"allow_http": True, "workers": 1, "max_queued": 1})
        ids = []
        for name in ("a", "b"):
            r = start(client, source=server.url("/slow.safetensors"), type="VAE", file_name=f"{name}.safetensors")
            assert r.status_code == 202
            ids.append(r.json["id"])
            if name == "a":
                wait_for(lambda: client.get(f"/models/download/{ids[0]}").json["status"] == "running", timeout=10)
        r = start(client, source=server.url("/slow.safetensors"), type="VAE", file_name="c.safetensors")
        assert r.status_code == 429 and r.headers["Retry-After"]
        same = start(client, source=server.url("/slow.safetensors"), type="VAE", file_name="a.safetensors")
        assert same.status_code == 409  # that name is being downloaded
        release.set()
        assert all(finished(client, i)["status"] == "succeeded" for i in ids)


def test_stale_part_files_are_removed_at_start(tmp_path):
    folder = tmp_path / "data/models/Stable-diffusion"
    folder.mkdir(parents=True)
    stale, fresh = folder / ".download-old.part", folder / ".download-live.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    build(tmp_path)
    wait_for(lambda: not stale.exists(), timeout=10, what="the sweep")
    assert fresh.exists()  # perhaps another instance's download in progress


def test_oss_sources(tmp_path, monkeypatch):
    """oss://bucket/key through oss2, against a loopback endpoint (oss2 uses path-style URLs for an IP)."""
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "test-id")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "test-secret")
    with LoopbackServer({"/models-bucket/sd/m.safetensors": (200, {"Content-Type": "application/octet-stream"}, ST),
                         "/models-bucket/sd/missing.safetensors": (404, {"Content-Type": "application/xml"},
                                                                    b"<Error><Code>NoSuchKey</Code></Error>")}) as oss:
        _, client = build(tmp_path, downloads={"oss_endpoint": oss.url("")})
        r = start(client, source="oss://models-bucket/sd/m.safetensors", type="CHECKPOINT", file_name="o.safetensors")
        assert r.status_code == 202, r.json
        view = finished(client, r.json["id"])
        assert view["status"] == "succeeded", view
        assert (tmp_path / "data/models/Stable-diffusion/o.safetensors").read_bytes() == ST
        assert unquote(oss.requests[0]["path"]) == "/models-bucket/sd/m.safetensors"
        assert oss.requests[0]["headers"]["Authorization"].startswith("OSS test-id:")
        r = start(client, source="oss://models-bucket/sd/missing.safetensors", type="CHECKPOINT",
                  file_name="p.safetensors")
        view = finished(client, r.json["id"])
        assert view["status"] == "failed" and "no such OSS object" in view["error"], view
        assert leftovers(tmp_path / "data") == []


def test_a_folder_swapped_for_a_link_while_queued_is_refused(tmp_path):
    release = threading.Event()
    slow = held_until(release)

    with LoopbackServer({"/slow.safetensors": slow, "/m.safetensors": (200, {}, ST)}) as server:
        _, client = build(tmp_path)
        first = start(client, source=server.url("/slow.safetensors"), type="VAE", file_name="a.safetensors")
        (tmp_path / "data/models/incoming").mkdir()
        queued = start(client, source=server.url("/m.safetensors"), type="OTHER", folder="incoming",
                       file_name="m.safetensors")
        assert queued.status_code == 202
        outside = tmp_path / "outside"
        outside.mkdir()
        (tmp_path / "data/models/incoming").rmdir()
        (tmp_path / "data/models/incoming").symlink_to(outside)
        release.set()
        assert finished(client, first.json["id"])["status"] == "succeeded"
        view = finished(client, queued.json["id"])
    assert view["status"] == "failed" and "outside" in view["error"], view
    assert list(outside.iterdir()) == []
