"""Input limits and paths, each through `app.test_client()` with the setting that sets it.

Limits: body size (413), decoded input pixels and decompression bombs, truncated and corrupt PNG / JPEG / WebP
(422, never 500), width / height / steps / images, prompt length, prompts past the 77-token window (truncated,
unlike A1111, which encodes them in 75-token chunks), LoRA tags per prompt, JSON nesting depth.
Paths: checkpoint, VAE, LoRA and embedding names, download targets: `..`, absolute paths, NUL and symbolic
links that lead out of the models folder are a 404 or 422, and no file outside the data root is read or written.
(`save_dir` has the same cases in tests/http/test_outputs.py; file names and folders of downloads in
tests/http/test_downloads.py.)"""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import TINY, linked_data_root, make_settings

LIMITS = {"max_width": 256, "max_height": 128, "max_steps": 5, "max_images": 3, "max_body_bytes": 64 * 1024,
          "max_input_pixels": 96 * 96, "max_prompt_chars": 1000, "max_loras_per_prompt": 2}
IMG = {**TINY, "denoising_strength": 0.5}


@pytest.fixture(scope="module")
def root(data_dir, tmp_path_factory) -> Path:
    """A data root with LoRAs, a VAE and embeddings, and in each models folder a symbolic link to a real model
    file outside the data root (`escape`), and one to a file inside its folder (`alias`)."""
    from pipelines.builders.demo import write_demo_lora, write_demo_vae

    base = tmp_path_factory.mktemp("hardening")
    root = linked_data_root(data_dir, base / "data")
    outside = base / "outside"
    outside.mkdir()
    models = root / "models"
    os.link(models / "Stable-diffusion" / "demo-sd15.safetensors", outside / "ckpt.safetensors")
    (models / "Stable-diffusion" / "escape.safetensors").symlink_to(outside / "ckpt.safetensors")
    for name in ("one", "two", "three"):
        write_demo_lora(models / "Lora" / f"{name}.safetensors", "demo-sd15", seed=len(name))
    write_demo_lora(outside / "lora.safetensors", "demo-sd15", seed=9)
    (models / "Lora" / "escape.safetensors").symlink_to(outside / "lora.safetensors")
    (models / "Lora" / "alias.safetensors").symlink_to(models / "Lora" / "one.safetensors")
    (models / "Lora" / "linked").symlink_to(outside)  # a linked folder: not descended into either
    write_demo_vae(models / "VAE")
    write_demo_vae(outside / "vae")
    (models / "VAE" / "escape.safetensors").symlink_to(outside / "vae" / "demo-vae.safetensors")
    emb = root / "embeddings"
    emb.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(1, 32, generator=g) * 5}, str(emb / "shiny.safetensors"))
    save_file({"emb_params": torch.randn(1, 32, generator=g) * 5}, str(outside / "emb.safetensors"))
    (emb / "escape.safetensors").symlink_to(outside / "emb.safetensors")
    return root


@pytest.fixture(scope="module")
def app(root):
    from handler.app import create_app

    app = create_app(make_settings(root, default_checkpoint="demo-sd15", warmup={"on_start": False, "shapes": []},
                                   **LIMITS))
    yield app
    app.extensions["sdfunc"].stop()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def no_generation(app, monkeypatch):
    """Refusals must come before any device work."""
    def never(*args, **kwargs):
        raise AssertionError("generation ran")

    monkeypatch.setattr(app.extensions["sdfunc"].flow, "device_generate", never)


def refused(r, status: int, field: str | None) -> dict:
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True)[:300])
    error = r.json["error"]
    if field is not None:
        assert error["field"] == field, error
    assert r.headers.get("X-Charge", "0") == "0"
    return error


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def noise(width: int = 64, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` with almost no data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


# Body size ---------------------------------------------------------------------------------------------------
def test_a_body_over_max_body_bytes_is_413_before_it_is_read(client, no_generation):
    image = b64(encode(noise(200, 200), "PNG"))  # ~160 KB of base64: over the 64 KiB limit on its own
    assert len(image) > LIMITS["max_body_bytes"]
    error = refused(client.post("/sdapi/v1/img2img", json={**IMG, "init_images": [image]}), 413, None)
    assert error["code"] == "payload_too_large"
    refused(client.post("/sdapi/v1/png-info", json={"image": image}), 413, None)
    refused(client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "x" * 70_000}), 413, None)
    # Just under the limit is read (and then refused for what it says, not for its size).
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "x" * 60_000})
    refused(r, 422, "prompt")


def chunked(client, path: str, raw: bytes):
    """A request without Content-Length, as gunicorn passes a chunked one (`wsgi.input_terminated`)."""
    return client.post(path, input_stream=io.BytesIO(raw), content_type="application/json",
                       headers={"Transfer-Encoding": "chunked"}, environ_overrides={"wsgi.input_terminated": True})


def test_a_chunked_body_over_max_body_bytes_is_413(client, no_generation):
    """Without Content-Length werkzeug stops reading at the limit, so the body is never held whole; what was
    read is no JSON, and the answer says why: 413, not a 422 about the JSON."""
    big = b'{"prompt": "' + b"x" * (200 * 1024) + b'"}'
    assert refused(chunked(client, "/sdapi/v1/txt2img", big), 413, None)["code"] == "payload_too_large"
    padded = b'{"prompt": "x"}' + b" " * (70 * 1024)  # still JSON when cut: refused all the same
    refused(chunked(client, "/sdapi/v1/png-info", padded), 413, None)
    refused(chunked(client, "/sdapi/v1/txt2img", b'{"prompt": "' + b"x" * 60_000 + b'"}'), 422, "prompt")


# Input images ------------------------------------------------------------------------------------------------
def test_decoded_pixels_over_max_input_pixels_are_422(client, no_generation):
    over = b64(encode(Image.new("RGB", (97, 96)), "PNG"))
    error = refused(client.post("/sdapi/v1/img2img", json={**IMG, "init_images": [over]}), 422, "init_images.0")
    assert "97x96" in error["message"] and "9216" in error["message"]
    refused(client.post("/sdapi/v1/img2img", json={**IMG, "init_images": [b64(encode(noise(), "PNG"))],
                                                    "mask": over}), 422, "mask")
    refused(client.post("/sdapi/v1/png-info", json={"image": over}), 422, "image")


def test_the_limit_itself_is_accepted(client):
    at = b64(encode(noise(96, 96), "PNG"))
    assert client.post("/sdapi/v1/png-info", json={"image": at}).status_code == 200
    assert client.post("/sdapi/v1/img2img", json={**IMG, "init_images": [at]}).status_code == 200


@pytest.mark.parametrize("raw, why", [
    (encode(Image.new("RGB", (3000, 3000)), "PNG"), "9 megapixels in ~26 KB"),
    (png_claiming(100_000, 100_000), "a header claiming 10 gigapixels"),
    (png_claiming(2**31 - 1, 1), "a header at the format's limit"),
])
def test_decompression_bombs_are_refused_from_the_header(client, no_generation, raw, why):
    assert len(b64(raw)) < LIMITS["max_body_bytes"], why  # small on the wire: only the header tells
    refused(client.post("/sdapi/v1/img2img", json={**IMG, "init_images": [b64(raw)]}), 422, "init_images.0")
    refused(client.post("/sdapi/v1/png-info", json={"image": b64(raw)}), 422, "image")


def test_a_text_chunk_bomb_is_refused(client):
    """A zTXt chunk that inflates to 30 MB: Pillow refuses it (its text limits), and so do we."""
    plain = encode(noise(16, 16), "PNG")
    bomb = png_chunk(b"zTXt", b"parameters\x00\x00" + zlib.compress(b"a" * (30 * 2**20), 9))
    raw = plain[:33] + bomb + plain[33:]  # right after IHDR
    assert len(b64(raw)) < LIMITS["max_body_bytes"]
    refused(client.post("/sdapi/v1/png-info", json={"image": b64(raw)}), 422, "image")


def _corruptions():
    cases = []
    for fmt in ("PNG", "JPEG", "WEBP"):
        raw = encode(noise(), fmt)
        for cut in (8, 30, len(raw) // 2, len(raw) - 40):  # a PNG without its IEND chunk decodes whole: fine
            cases.append(pytest.param(raw[:cut], id=f"{fmt}-truncated-{cut}"))
        header = bytearray(raw)
        header[12:40] = bytes(b ^ 0x5A for b in header[12:40])
        cases.append(pytest.param(bytes(header), id=f"{fmt}-corrupt-header"))
        cases.append(pytest.param(raw[:4] + b"\0" * (len(raw) - 4), id=f"{fmt}-zeroed"))
    png = bytearray(encode(noise(), "PNG"))
    png[len(png) // 3:len(png) // 3 + 40] = bytes(40)
    cases.append(pytest.param(bytes(png), id="PNG-corrupt-data"))
    return cases


@pytest.mark.parametrize("raw", _corruptions())
def test_truncated_and_corrupt_images_are_422(client, no_generation, raw):
    refused(client.post("/sdapi/v1/img2img", json={**IMG, "init_images": [b64(raw)]}), 422, "init_images.0")
    refused(client.post("/sdapi/v1/png-info", json={"image": b64(raw)}), 422, "image")


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_damage_a_lossy_decoder_tolerates_is_never_a_500(client, fmt):
    """JPEG and WebP decoders conceal damage inside the compressed data (as browsers do): such an image
    decodes, with artifacts. Whatever the decoder makes of it, the answer is a 200 or a 422."""
    raw = bytearray(encode(noise(), fmt))
    raw[len(raw) // 3:len(raw) // 3 + 40] = bytes(b ^ 0xFF for b in raw[len(raw) // 3:len(raw) // 3 + 40])
    for path, body in (("/sdapi/v1/img2img", {**IMG, "init_images": [b64(bytes(raw))]}),
                       ("/sdapi/v1/png-info", {"image": b64(bytes(raw))})):
        assert client.post(path, json=body).status_code in (200, 422), path


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_corrupt_exif_is_not_a_500(client):
    exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08" + b"\xff" * 50
    for fmt in ("JPEG", "WEBP"):
        buf = io.BytesIO()
        noise().save(buf, format=fmt, exif=exif)
        r = client.post("/sdapi/v1/png-info", json={"image": b64(buf.getvalue())})
        assert r.status_code in (200, 422), fmt


# Sizes and counts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
@pytest.mark.parametrize("fields, field", [
    ({"width": 264}, "width"),
    ({"height": 136}, "height"),
    ({"steps": 6}, "steps"),
    ({"batch_size": 4}, "batch_size"),
    ({"batch_size": 2, "n_iter": 2}, "n_iter"),
    ({"n_iter": 4}, "n_iter"),  # the limit is on batch_size x n_iter; the error names n_iter unless batch_size
    # alone is over it
    ({"steps": 151}, "steps"),  # hard ceilings of the schema, whatever the settings
    ({"batch_size": 65}, "batch_size"),
    ({"n_iter": 65}, "n_iter"),
    ({"width": 4}, "width"),
])
def test_size_and_count_limits_are_422_naming_the_field(client, no_generation, mode, fields, field):
    body = {**(IMG if mode == "img2img" else TINY), **fields}
    if mode == "img2img":
        body["init_images"] = [b64(encode(noise(), "PNG"))]
    error = refused(client.post(f"/sdapi/v1/{mode}", json=body), 422, field)
    assert field in error["message"]
    # An asynchronous request is refused at submission, not later in its task.
    refused(client.post(f"/sdapi/v1/{mode}?async=true", json=body), 422, field)


def test_the_limits_themselves_are_accepted(client):
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "width": 256, "height": 128, "steps": 5, "batch_size": 3})
    assert r.status_code == 200 and len(r.json["images"]) == 3
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "width": 263, "height": 135})  # floored to 256 x 128
    assert r.status_code == 200


def test_a_size_too_small_for_the_checkpoint_is_422_naming_it(client):
    """Found by the fuzzer: 8x8 without CFG (cfg_scale 1, one image) leaves one value per group in the demo
    UNet's deepest group norm, which torch refuses. That is the request's size, not a server fault."""
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "width": 8, "height": 16, "cfg_scale": 1})
    error = refused(r, 422, "width")
    assert "too small" in error["message"]
    assert client.post("/sdapi/v1/txt2img", json={**TINY, "width": 64, "height": 64, "cfg_scale": 1}).status_code == 200


def test_gunicorns_own_refusals_are_documented(client):
    """Found by the long fuzz run: gunicorn answers a request line over 4094 bytes with 414 (and a malformed
    one with 400) before the app sees it; every operation of the document lists both."""
    doc = client.get("/openapi/openapi.json").json
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert {"400", "414"} <= set(operation["responses"]), (method, path)


@pytest.mark.parametrize("strength", [5e-324, 1e-9, 0.001])
def test_tiny_denoising_strength_runs_one_step(client, strength):
    """A strength too small for one step of `steps` (found by the fuzzer: 5e-324 overflowed the step count)
    denoises as the finest single step does, and the image comes back."""
    body = {**IMG, "steps": 2, "denoising_strength": strength, "init_images": [b64(encode(noise(), "PNG"))]}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.json
    assert len(r.json["images"]) == 1


# Prompts -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompt_longer_than_max_prompt_chars_is_422(client, no_generation, field):
    error = refused(client.post("/sdapi/v1/txt2img", json={**TINY, field: "y" * 1001}), 422, field)
    assert "1000" in error["message"] and "yyyy" not in error["message"]  # the prompt is not echoed


def test_prompt_of_exactly_max_prompt_chars_is_accepted(client):
    assert client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "cat " * 250}).status_code == 200


# Prompts past the 77-token window are encoded in 75-token chunks as A1111 does: tests/http/test_long_prompts.py.


# LoRA tags per prompt ----------------------------------------------------------------------------------------
def test_more_lora_tags_than_max_loras_per_prompt_is_422(client, no_generation):
    for prompt in ("<lora:one:1> <lora:two:1> <lora:three:1>",
                   "<lora:one:1> <lora:one:0.5> <lora:one:0.2>",  # each tag counts, even for the same LoRA
                   "<lora:nosuch1:1> <lyco:nosuch2:1> <lora:nosuch3:1>"):  # counted before any name is looked up
        error = refused(client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "a " + prompt}), 422, "prompt")
        assert "3 LoRA tags" in error["message"] and "at most 2" in error["message"]
        refused(client.post("/sdapi/v1/txt2img?async=true", json={**TINY, "prompt": prompt}), 422, "prompt")


def test_up_to_max_loras_per_prompt_and_disabled_tags_are_accepted(client):
    ok = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "a <lora:one:1> <lora:two:0.5>"})
    assert ok.status_code == 200
    ignored = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "<lora:one:1>" * 20,
                                                      "disable_extra_networks": True})
    assert ignored.status_code == 200  # the tags are removed and nothing is loaded


def test_max_loras_per_prompt_default_bounds_a_prompt(data_dir):
    from handler.settings import Settings
    from pipelines.adapters.lora import LoraStore
    from pipelines.hashing import HashCache

    assert Settings.model_fields["max_loras_per_prompt"].default == 8
    with pytest.raises(ValueError):
        make_settings(data_dir, max_loras_per_prompt=0)
    store = LoraStore(data_dir / "no-loras", HashCache(data_dir / "no-hashes.json"))
    from pipelines.errors import InvalidParameter

    with pytest.raises(InvalidParameter) as exc:
        store.resolve("<lora:x:1>" * 9)
    assert exc.value.field == "prompt"
    assert store.resolve("<lora:x:1>" * 9, apply=False) == ("", [])


# JSON nesting ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["alwayson_scripts", "override_settings", "unknown_key"])
def test_deep_json_is_422_body_anywhere_in_the_request(client, no_generation, where):
    deep = "[" * 5000 + "]" * 5000
    r = client.post("/sdapi/v1/txt2img", data=nested(where, 5000), content_type="application/json")
    refused(r, 422, "body")
    refused(client.post("/sdapi/v1/png-info", data=f'{{"image": {deep}}}', content_type="application/json"),
            422, "body")


def nested(where: str, depth: int) -> str:
    """A txt2img body whose deepest array is at `depth` (the body itself is depth 1, `where` 2)."""
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return f'{{"prompt": "x", "steps": 1, "width": 64, "height": 64, "{where}": {{"a": {inner}}}}}'


@pytest.mark.parametrize("where", ["alwayson_scripts", "override_settings", "unknown_key"])
def test_json_nested_within_the_parsers_limit_is_422_before_any_work(client, no_generation, where):
    """Python's parser takes ~990 levels; pydantic keeps such a value, then fails to serialize it (~250) for
    the response after the images were made, which was a 500. The body is refused at 64 levels instead."""
    for depth in (65, 300, 900):
        r = client.post("/sdapi/v1/txt2img", data=nested(where, depth), content_type="application/json")
        assert "64" in refused(r, 422, "body")["message"], depth


def test_json_nested_64_deep_is_accepted(client):
    r = client.post("/sdapi/v1/txt2img", data=nested("override_settings", 64), content_type="application/json")
    assert r.status_code == 200, r.get_data(as_text=True)[:300]


# Paths: names that look like paths, and links that lead out ---------------------------------------------------
def _path_names(root: Path, folder: str, real: str) -> list[str]:
    inside = root / "models" / folder / real
    return ["../" * 6 + "etc/passwd", "/etc/passwd", str(inside), f"../{folder}/{real}", f"sub/../{real}",
            f"{real}\x00.txt", "\x00", "..\\..\\" + real, str(root.parent / "outside" / real)]


@pytest.mark.parametrize("where", ["override_settings", "alwayson_scripts"])
def test_checkpoint_names_that_are_paths_or_lead_out_are_404(client, root, no_generation, where):
    for name in [*_path_names(root, "Stable-diffusion", "demo-sd15.safetensors"), "escape.safetensors",
                 "escape", str(root / "models" / "Stable-diffusion" / "escape.safetensors")]:
        r = client.post("/sdapi/v1/txt2img", json={**TINY, where: {"sd_model_checkpoint": name}})
        refused(r, 404, f"{where}.sd_model_checkpoint")
    for name in ("escape.safetensors", "../x", "a\x00b"):
        refused(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}), 404, None)


def test_links_that_lead_out_are_not_listed_and_links_within_are(client):
    assert "escape.safetensors" not in [m["title"] for m in client.get("/sdapi/v1/sd-models").json]
    assert [v["model_name"] for v in client.get("/sdapi/v1/sd-vae").json] == ["demo-vae.safetensors"]
    assert sorted(x["name"] for x in client.get("/sdapi/v1/loras").json) == ["alias", "one", "three", "two"]
    embeddings = client.get("/sdapi/v1/embeddings").json
    assert "escape" not in {**embeddings["loaded"], **embeddings["skipped"]} and "shiny" in embeddings["loaded"]
    # A link to a file within its folder works (the folder is what is guarded, not links as such).
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "a <lora:alias:1>"})
    assert r.status_code == 200


@pytest.mark.parametrize("where", ["override_settings", "alwayson_scripts"])
def test_vae_names_that_are_paths_or_lead_out_are_404(client, root, no_generation, where):
    for name in [*_path_names(root, "VAE", "demo-vae.safetensors"), "escape.safetensors", "escape"]:
        refused(client.post("/sdapi/v1/txt2img", json={**TINY, where: {"sd_vae": name}}), 404, f"{where}.sd_vae")
    refused(client.post("/sdapi/v1/options", json={"sd_vae": "escape.safetensors"}), 404, None)


def test_lora_names_that_are_paths_or_lead_out_are_404(client, root, no_generation):
    for name in ("escape", "../Lora/one", "../../../etc/passwd", str(root / "models" / "Lora" / "one"),
                 "/etc/passwd", "one\x00", "linked/lora", "sub/../one", "..\\one"):
        error = refused(client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": f"a <lora:{name}:1>"}), 404,
                        "prompt")
        assert "not found" in error["message"]


def test_an_embedding_that_leads_out_is_not_applied(client):
    import json

    r = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "escape, shiny"})
    assert r.status_code == 200
    hashes = json.loads(r.json["info"])["extra_generation_params"].get("TI hashes", "")
    assert "shiny" in hashes and "escape" not in hashes


def test_nothing_outside_the_data_root_was_read(app, client, root):
    """The hash caches name every model file whose bytes were read for a hash: none lies outside the root."""
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": "a <lora:alias:1>, shiny"})
    assert r.status_code == 200
    service = app.extensions["sdfunc"]
    hashed = [path for cache in (service.store.hashes, service.loras.hashes) for path in cache._entries]
    assert any(path.endswith("demo-sd15.safetensors") for path in hashed)
    assert any(path.endswith("alias.safetensors") for path in hashed)
    for path in hashed:
        assert Path(path).resolve().is_relative_to(root.resolve()), path


# Paths: download targets --------------------------------------------------------------------------------------
def _downloads_app(tmp_path: Path):
    from handler.app import create_app

    app = create_app(make_settings(tmp_path / "data", build_demo_models=False, record_requests=False,
                                   downloads={"allow_http": True}, network={"allow_hosts": ["127.0.0.1/32"]}))
    return app, app.test_client()


@pytest.mark.parametrize("body, field", [
    ({"type": "OTHER", "folder": "ok/\x00/x"}, "folder"),
    ({"type": "OTHER", "folder": "inside/escape"}, "folder"),  # a link deeper down
    ({"type": "OTHER", "folder": "inside/escape/deeper"}, "folder"),
    ({"type": "OTHER", "folder": "C:/Windows"}, "folder"),
    ({"file_name": "/etc/passwd.safetensors"}, "file_name"),
    ({"file_name": "..safetensors"}, "file_name"),
    ({"file_name": "a\nb.safetensors"}, "file_name"),
])
def test_download_targets_never_leave_the_models_folder(tmp_path, body, field):
    app, client = _downloads_app(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "data/models/inside").mkdir(parents=True)
    (tmp_path / "data/models/inside/escape").symlink_to(outside)
    full = {"source": "http://127.0.0.1:9/m.safetensors", "type": "LORA", "file_name": "ok.safetensors", **body}
    if full["type"] == "OTHER" and "file_name" not in body:
        full["file_name"] = "ok.bin"
    refused(client.post("/models/download", json=full), 422, field)
    assert list(outside.iterdir()) == [] and app.extensions["sdfunc.downloads"].all() == []


def test_overwriting_a_linked_file_replaces_the_link_not_its_target(tmp_path):
    from safetensors.numpy import save

    from tests.support.loopback import LoopbackServer
    from tests.support.waiting import wait_for

    new = save({"w": np.ones((4, 4), dtype=np.float32)})
    _, client = _downloads_app(tmp_path)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"precious, not ours")
    lora = tmp_path / "data/models/Lora/linked.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.symlink_to(outside)
    with LoopbackServer({"/m.safetensors": (200, {}, new)}) as server:
        body = {"source": server.url("/m.safetensors"), "type": "LORA", "file_name": "linked.safetensors"}
        assert client.post("/models/download", json=body).status_code == 409  # exists (a link counts)
        r = client.post("/models/download", json={**body, "overwrite": True})
        assert r.status_code == 202
        wait_for(lambda: client.get(f"/models/download/{r.json['id']}").json["status"] in ("succeeded", "failed"),
                 timeout=30, what="the download")
    assert client.get(f"/models/download/{r.json['id']}").json["status"] == "succeeded"
    assert outside.read_bytes() == b"precious, not ours"
    assert not lora.is_symlink() and lora.read_bytes() == new
