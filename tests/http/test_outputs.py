"""Saved images (handler/storage/outputs.py): the A1111 / PAI-EAS outputs layout, `alwayson_scripts.save_dir`, grids,
`parameters.image_url`, and a storage that refuses writes (503, not charged). Each app here has its own data
root (the demo models linked in), so the files a test finds are its own."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import io
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import TINY, make_settings

PRICE = {"prices": {"cpu": "0.01"}}
NAME = re.compile(r"^(?P<time>\d{6})-(?P<id>[0-9a-f]{8})-(?P<seed>\d+)(?:-(?P<index>\d+))?\.png$")


@pytest.fixture(scope="module")
def root(data_dir, tmp_path_factory) -> Path:
    """A data root of this module's own, sharing the demo models."""
    root = tmp_path_factory.mktemp("outputs-data")
    (root / "models").symlink_to(data_dir / "models")
    return root


def build(root: Path, **overrides):
    from handler.app import create_app

    return create_app(make_settings(root, database_url=f"sqlite:///{root / 'records.sqlite3'}", billing=PRICE,
                                    **overrides))


@pytest.fixture(scope="module")
def app(root):
    app = build(root)
    yield app
    app.extensions["sdfunc"].db.dispose()


@pytest.fixture
def client(app):
    from handler.contract.options import MemoryOptionsStore

    yield app.test_client()
    app.extensions["sdfunc"].options_store = MemoryOptionsStore()


def txt2img(client, **body):
    return client.post("/sdapi/v1/txt2img", json={**TINY, **body})


def eas(**scripts):
    return {"alwayson_scripts": {"id_task": "task-1", **scripts}}


def saved_paths(r) -> list[Path]:
    assert r.status_code == 200, r.json
    return [Path(p) for p in r.json["parameters"]["image_url"].split(",")]


def today() -> str:
    return dt.date.today().isoformat()


# Layout and names --------------------------------------------------------------------------------------------
def test_save_images_layout_and_names(client, root):
    r = txt2img(client, seed=100, batch_size=2, save_images=True, **eas())
    grid, *paths = saved_paths(r)  # PAI-EAS lists the saved grid first
    outputs = (root / "outputs").resolve()
    assert grid.parent == outputs / "txt2img-grids" / today() and grid.is_file()
    assert [p.parent for p in paths] == [outputs / "txt2img-images" / today()] * 2
    names = [NAME.match(p.name) for p in paths]
    assert all(names) and [int(m["seed"]) for m in names] == [100, 101]
    assert names[0]["id"] == names[1]["id"]  # one id per request
    assert json.loads(r.json["info"])["index_of_first_image"] == 1  # the grid comes first
    for path, image in zip(paths, r.json["images"][1:]):
        assert path.read_bytes() == base64.b64decode(image)
    # Another request gets another id.
    again = saved_paths(txt2img(client, seed=100, save_images=True, **eas()))
    assert NAME.match(again[0].name)["id"] != names[0]["id"]
    # Without the EAS keys the response is A1111's (no image_url) but the images are saved all the same.
    plain = txt2img(client, seed=120, save_images=True)
    assert plain.status_code == 200 and "image_url" not in plain.json["parameters"]
    assert list((outputs / "txt2img-images" / today()).glob("*-120.png"))


def test_repeated_seeds_get_distinct_names(client):
    r = txt2img(client, seed=5, batch_size=3, subseed_strength=0.5, save_images=True, do_not_save_grid=True, **eas())
    _, *paths = saved_paths(r)  # the grid first: the API overwrites do_not_save_grid
    assert len(set(paths)) == 3 and [NAME.match(p.name)["index"] for p in paths] == [None, "1", "2"]


def test_img2img_goes_to_img2img_images(client, root):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    r = client.post("/sdapi/v1/img2img", json={**TINY, "seed": 8, "init_images": [base64.b64encode(buf.getvalue())
                                                                                   .decode()],
                                               "save_images": True, **eas()})
    [path] = saved_paths(r)
    assert path.parent == (root / "outputs" / "img2img-images" / today()).resolve() and path.name.endswith("-8.png")


def test_send_images_false_lists_the_urls_only(client):
    r = txt2img(client, seed=9, batch_size=2, save_images=True, send_images=False, **eas())
    assert r.json["images"] == []
    grid, *paths = saved_paths(r)
    assert len(paths) == 2 and all(p.is_file() for p in (grid, *paths))
    # The image records point at the files, and read them back.
    rid = r.json["parameters"]["billing"]["request_id"]
    records = client.get(f"/images?request_id={rid}").json["images"]
    assert sorted(i["image_url"] for i in records) == sorted(map(str, paths))
    png = client.get(f"/images/{records[0]['id']}")
    assert png.status_code == 200 and png.data == Path(records[0]["image_url"]).read_bytes()


# save_dir ----------------------------------------------------------------------------------------------------
def test_save_dir_relative_implies_saving(client, root):
    r = txt2img(client, seed=11, **eas(save_dir="team/alice"))
    [path] = saved_paths(r)
    assert path.parent == (root / "outputs" / "team" / "alice" / "txt2img-images" / today()).resolve()
    assert NAME.match(path.name)["seed"] == "11"
    assert r.json["images"] == []  # PAI-EAS: a save_dir request reads its results from storage
    asked = txt2img(client, seed=11, send_images=True, **eas(save_dir="team/alice"))  # unless it asks for them
    [again] = saved_paths(asked)
    assert again.read_bytes() == base64.b64decode(asked.json["images"][0])


def test_save_dir_in_args_form_and_absolute_inside_the_outputs(client, root):
    inside = root / "outputs" / "abs" / "dir"
    r = txt2img(client, seed=12, alwayson_scripts={"save_dir": {"args": [str(inside)]}, "id_task": "t"})
    [path] = saved_paths(r)
    assert path.parent == (inside / "txt2img-images" / today()).resolve()
    r = txt2img(client, seed=13, **eas(save_dir=str(root.resolve() / "outputs") + "/"))  # the root itself
    [path] = saved_paths(r)
    assert path.parent == (root / "outputs" / "txt2img-images" / today()).resolve()


def test_save_dir_symlink_inside_the_outputs_is_fine(client, root):
    (root / "outputs" / "real").mkdir(parents=True, exist_ok=True)
    link = root / "outputs" / "alias"
    if not link.exists():
        link.symlink_to(root / "outputs" / "real")
    [path] = saved_paths(txt2img(client, seed=14, **eas(save_dir="alias")))
    assert path.parent == (root / "outputs" / "real" / "txt2img-images" / today()).resolve()


@pytest.mark.parametrize("save_dir", [
    "../x", "a/../../b", "a/..", "/etc", "/tmp/elsewhere", "MODELS", "a\x00b", "a\nb", "escape", "escape/deeper",
    "afile", "x" * 1100, "y" * 300, "afile/below",
])
def test_bad_save_dir_is_422_before_anything_runs(app, client, root, tmp_path, monkeypatch, save_dir):
    service = app.extensions["sdfunc"]
    outputs = root / "outputs"
    if not (outputs / "escape").is_symlink():
        (outputs / "escape").symlink_to(outside_dir(tmp_path))
    (outputs / "afile").write_bytes(b"not a folder")
    if save_dir == "MODELS":  # an absolute path under another root: the models folder
        save_dir = str(root / "models")

    def never(*args, **kwargs):
        raise AssertionError("generation ran")

    monkeypatch.setattr(service.flow, "device_generate", never)
    r = txt2img(client, save_images=True, **eas(save_dir=save_dir))
    assert r.status_code == 422, r.json
    assert r.json["error"]["field"] == "alwayson_scripts.save_dir"
    assert r.headers["X-Charge"] == "0"
    assert "\x00" not in r.json["error"]["message"]
    # Refused at submission for an asynchronous task, too.
    task = client.post("/sdapi/v1/txt2img?async=true", json={**TINY, **eas(save_dir=save_dir)})
    assert task.status_code == 422 and task.json["error"]["field"] == "alwayson_scripts.save_dir"


def outside_dir(tmp_path: Path) -> Path:
    outside = tmp_path.parent / "outside-the-outputs"
    outside.mkdir(exist_ok=True)
    return outside


def test_check_save_dir_unit(tmp_path):
    from handler.errors import InvalidRequest
    from handler.storage.backends import LocalStorage
    from handler.storage.outputs import check_save_dir

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    storage = LocalStorage(outputs)
    assert check_save_dir(None, storage, outputs) is None and check_save_dir("", storage, outputs) is None
    assert check_save_dir("a//b/./c/", storage, outputs) == "a/b/c"
    assert check_save_dir(".", storage, outputs) == ""
    assert check_save_dir(str(outputs / "x"), storage, outputs) == "x"
    for bad in ("..", "/", str(tmp_path), str(outputs) + "/../outputs/x", "a\x00"):
        with pytest.raises(InvalidRequest):
            check_save_dir(bad, storage, outputs)


# Grids -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, shape", [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 2)), (5, (2, 3)), (6, (2, 3)),
                                      (7, (3, 3)), (8, (3, 3)), (9, (3, 3)), (10, (3, 4)), (12, (3, 4)), (16, (4, 4))])
def test_grid_shape_is_a1111s(n, shape):
    from handler.storage.outputs import grid_shape

    assert grid_shape(n) == shape


@pytest.mark.parametrize("n, options, batch_size, shape", [
    (6, {"n_rows": 0}, 3, (3, 2)),  # as many rows as the batch size
    (5, {"n_rows": 0}, 2, (2, 3)),
    (6, {"n_rows": 2}, 1, (2, 3)),  # fixed rows
    (3, {"n_rows": 5}, 1, (3, 1)),  # never more rows than images
    (5, {"n_rows": -1, "grid_prevent_empty_spots": True}, 1, (1, 5)),  # the largest divisor up to floor(sqrt(n))
    (6, {"grid_prevent_empty_spots": True}, 1, (2, 3)),
    (8, {"grid_prevent_empty_spots": True}, 1, (2, 4)),  # autodetect alone: 3 x 3 with an empty spot
    (12, {"grid_prevent_empty_spots": True}, 1, (3, 4)),
    (1, {"n_rows": 0, "grid_only_if_multiple": False}, 4, (1, 1)),
])
def test_grid_shape_options(n, options, batch_size, shape):
    from handler.storage.outputs import grid_shape

    assert grid_shape(n, options, batch_size) == shape


def test_grid_allowed_for_one_image_only_with_grid_only_if_multiple_off():
    from handler.storage.outputs import grid_allowed, wants_grid

    assert not grid_allowed(1, {}) and grid_allowed(2, {}) and not grid_allowed(0, {"grid_only_if_multiple": False})
    assert grid_allowed(1, {"grid_only_if_multiple": False}) and wants_grid(1, {"grid_only_if_multiple": False})
    assert not wants_grid(1, {"grid_only_if_multiple": False, "grid_save": False})


def grids(root: Path) -> set[Path]:
    return set((root / "outputs" / "txt2img-grids").rglob("grid-*.png"))


def test_grid_saved_for_several_images(client, root):
    before = grids(root)
    r = txt2img(client, seed=20, batch_size=2, n_iter=2, save_images=True, **eas())
    listed, *paths = saved_paths(r)
    [grid] = grids(root) - before
    stamp, rid = NAME.match(paths[0].name).group("time", "id")
    assert grid.parent == (root / "outputs" / "txt2img-grids" / today()).resolve()
    assert grid.name == f"grid-{stamp}-{rid}.png"
    with Image.open(grid) as im:
        im.load()
        assert im.size == (128, 128) and im.info["parameters"].startswith(TINY["prompt"])
        for i, path in enumerate(paths):  # row by row, 2 x 2
            cell = im.crop((i % 2 * 64, i // 2 * 64, i % 2 * 64 + 64, i // 2 * 64 + 64))
            with Image.open(path) as one:
                assert cell.convert("RGB").tobytes() == one.convert("RGB").tobytes()
    assert listed.resolve() == grid.resolve() and len(paths) == 4  # image_url: the grid first, then the images


def test_no_grid_for_one_image_or_grid_save_off(client, root):
    before = grids(root)
    assert txt2img(client, seed=21, save_images=True).status_code == 200
    assert client.post("/sdapi/v1/options", json={"grid_save": False}).status_code == 200
    assert txt2img(client, seed=23, batch_size=2, save_images=True).status_code == 200
    assert txt2img(client, seed=24, batch_size=2).status_code == 200  # not saving at all
    assert grids(root) == before
    # override_settings wins over the caller's option, as in A1111.
    assert txt2img(client, seed=25, batch_size=3, save_images=True,
                   override_settings={"grid_save": True}).status_code == 200
    [grid] = grids(root) - before
    with Image.open(grid) as im:
        assert im.size == (128, 128)  # 3 images: 2 rows x 2 columns


def test_grid_options_through_the_api(client, root):
    """`n_rows`, `grid_prevent_empty_spots` and `grid_only_if_multiple`: the caller's options (POST /options),
    overridden per request by `override_settings`; the saved grid is the returned one."""
    options = client.get("/sdapi/v1/options").json
    assert (options["n_rows"], options["grid_prevent_empty_spots"], options["grid_only_if_multiple"]) == (-1, False, True)
    assert client.post("/sdapi/v1/options", json={"n_rows": 0}).status_code == 200
    assert client.get("/sdapi/v1/options").json["n_rows"] == 0
    before = grids(root)
    r = txt2img(client, seed=30, batch_size=3, n_iter=2, save_images=True)  # 6 images, a row per batch image
    assert r.status_code == 200, r.json
    [grid] = grids(root) - before
    assert decode(r.json["images"][0]).size == (128, 192)
    with Image.open(grid) as im:
        assert im.size == (128, 192)
    r = txt2img(client, seed=30, batch_size=3, save_images=True, override_settings={"n_rows": 1})
    assert decode(r.json["images"][0]).size == (192, 64)
    r = txt2img(client, seed=30, batch_size=3, save_images=True,
                override_settings={"n_rows": -1, "grid_prevent_empty_spots": True})
    assert decode(r.json["images"][0]).size == (192, 64)  # 3 is prime: one row, where autodetect makes 2 x 2
    # one image: a grid only with grid_only_if_multiple off, saved and returned first (a 1 x 1 grid)
    before = grids(root)
    r = txt2img(client, seed=31, save_images=True)
    assert len(r.json["images"]) == 1 and grids(root) == before
    r = txt2img(client, seed=31, save_images=True, override_settings={"grid_only_if_multiple": False})
    info = json.loads(r.json["info"])
    assert len(r.json["images"]) == 2 and info["index_of_first_image"] == 1 and len(info["infotexts"]) == 2
    assert decode(r.json["images"][0]).size == (64, 64) and len(grids(root) - before) == 1
    for bad in ({"n_rows": 17}, {"n_rows": "2"}, {"grid_only_if_multiple": "no"}):
        key = next(iter(bad))
        r = txt2img(client, save_images=True, override_settings=bad)
        assert r.status_code == 422 and r.json["error"]["field"] == f"override_settings.{key}"
        r = client.post("/sdapi/v1/options", json=bad)
        assert r.status_code == 422 and r.json["error"]["field"] == key


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_do_not_save_grid_is_overwritten_by_save_images(client, root):
    """A1111's API sets `do_not_save_grid = not save_images`, whatever the request said."""
    before = grids(root)
    r = txt2img(client, seed=26, batch_size=2, save_images=True, do_not_save_grid=True)
    assert r.status_code == 200 and len(grids(root) - before) == 1
    assert json.loads(r.json["info"])["index_of_first_image"] == 1 and len(r.json["images"]) == 3


# A storage that refuses writes -------------------------------------------------------------------------------
def assert_not_charged(client, r, succeeded: int = 0):
    assert r.status_code == 503, r.json
    assert r.json["error"]["code"] == "storage_unavailable" and "not charged" in r.json["error"]["message"]
    assert r.headers["X-Charge"] == "0" and r.headers["X-Billed-Duration-Ms"] == "0"
    from handler.logs import REQUEST_ID_HEADER

    rid = r.headers[REQUEST_ID_HEADER]
    assert client.get(f"/images?request_id={rid}").json["total"] == 0
    totals = client.get("/billing/usage").json["totals"]
    assert totals["succeeded"] == succeeded and totals["failed"] == 1


@pytest.fixture
def fresh(tmp_path, data_dir):
    """An app on an empty data root of its own (so its ledger starts empty)."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "models").symlink_to(data_dir / "models")
    app = build(root)
    yield app, root
    app.extensions["sdfunc"].db.dispose()


def test_read_only_storage_is_503_and_not_charged(fresh, monkeypatch):
    app, _ = fresh
    client = app.test_client()
    assert txt2img(client, seed=1).headers["X-Charge"] != "0"  # this price does charge a success

    def read_only(key, data):
        raise OSError(errno.EROFS, "Read-only file system", key)

    monkeypatch.setattr(app.extensions["sdfunc"].storage, "put", read_only)
    r = txt2img(client, seed=2, save_images=True)
    assert_not_charged(client, r, succeeded=1)
    assert "Read-only file system" in r.json["error"]["message"]


def test_a_save_failing_midway_leaves_none_of_the_requests_images(fresh, monkeypatch):
    """Images 1 and 2 of a batch are written, the third fails (disk full): all of them are removed again."""
    app, root = fresh
    client = app.test_client()
    storage = app.extensions["sdfunc"].storage
    real, puts = storage.put, []

    def full_on_third(key, data):
        puts.append(key)
        if len(puts) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return real(key, data)

    monkeypatch.setattr(storage, "put", full_on_third)
    assert_not_charged(client, txt2img(client, seed=4, batch_size=3, save_images=True))
    assert len(puts) == 3
    assert not list((root / "outputs").rglob("*.png"))


def test_a_folder_that_cannot_be_made_is_503_and_not_charged(fresh):
    app, root = fresh
    client = app.test_client()
    blocked = root / "outputs" / "txt2img-images"
    blocked.write_bytes(b"a file where the folder goes")  # a real OSError from the real filesystem
    assert_not_charged(client, txt2img(client, seed=3, save_images=True))


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` read-only for this process, as a read-only mount is: a read-only bind mount of it onto itself
    when the process may mount (root in CI: a real EROFS), else chmod 555 (enough for a non-root user)."""
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"root without mount permission: {done.stderr.decode().strip()}")
        try:
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(0o755)


def test_read_only_outputs_folder_is_503_and_not_charged(fresh):
    app, root = fresh
    client = app.test_client()
    with read_only(root / "outputs"):
        assert_not_charged(client, txt2img(client, seed=4, save_images=True))
