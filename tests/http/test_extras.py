"""Model upscalers and face restoration through the HTTP API: the listings in A1111's shapes, the extras routes
(A1111 v1.10.1's fields, defaults and response, the PNG chunks kept, charged and timed like a generation), hires fix
and img2img with a model upscaler, `restore_faces`, and hostile input (unknown names, a pickle with code, a corrupt
file, images and factors over the pixel limit). The models are the tiny random-weight demo ones
(`pipelines.builders.demo.write_demo_upscalers`), plus a Real-ESRGAN x2 file under its published name."""

import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from pipelines.faces.codeformer import CodeFormer
from tests.conftest import decode_png, linked_data_root, make_settings

MARKER = "/tmp/sdfunc-extras-pickle-ran"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture(scope="module")
def xapp(data_dir, tmp_path_factory):
    from handler.app import create_app
    from pipelines.builders.demo import write_demo_upscalers
    from pipelines.upscalers.arch import RRDBNet

    root = linked_data_root(data_dir, tmp_path_factory.mktemp("extras-data"))
    write_demo_upscalers(root / "models")
    torch.manual_seed(1)
    x2 = RRDBNet(num_feat=8, num_grow_ch=4, num_block=1, unshuffle=2)
    torch.save({"params_ema": x2.state_dict()}, root / "models" / "RealESRGAN" / "RealESRGAN_x2plus.pth")
    torch.save({"params_ema": _Evil()}, root / "models" / "ESRGAN" / "evil.pth")
    (root / "models" / "ESRGAN" / "broken.pth").write_bytes(b"PK\x03\x04 not really a zip")
    torch.manual_seed(2)  # the user's own CodeFormer (its licence is non-commercial: never shipped, never fetched)
    codeformer = CodeFormer(img_size=64, nf=8, ch_mult=(1, 2, 2), res_blocks=2, attn_resolutions=(16,), emb_dim=8,
                            codebook_size=16, dim_embd=16, n_head=8, n_layers=1, dim_mlp=32, connect_list=(32, 64))
    (root / "models" / "Codeformer").mkdir()
    torch.save({"params_ema": codeformer.state_dict()}, root / "models" / "Codeformer" / "codeformer-v0.1.0.pth")
    app = create_app(make_settings(root, default_checkpoint="demo-sd15", max_input_pixels=300 * 300))
    yield app
    app.extensions["sdfunc"].stop()


@pytest.fixture(scope="module")
def xclient(xapp):
    return xapp.test_client()


def _png(image: Image.Image, parameters: str | None = None) -> str:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def _image(w: int = 40, h: int = 28, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _single(client, **fields):
    return client.post("/sdapi/v1/extra-single-image", json={"image": _png(_image()), **fields})


def test_listings_in_a1111_shapes(xclient):
    items = xclient.get("/sdapi/v1/upscalers").json
    assert [i["name"] for i in items[:3]] == ["None", "Lanczos", "Nearest"]
    by_name = {i["name"]: i for i in items}
    assert set(by_name) == {"None", "Lanczos", "Nearest", "demo-esrgan-4x", "demo-srvgg-2x", "demo-swinir-2x",
                            "R-ESRGAN 2x+"}  # neither the pickle with code nor the corrupt file
    esrgan = by_name["demo-esrgan-4x"]
    assert set(esrgan) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert esrgan["model_name"] == "ESRGAN_4x" and esrgan["scale"] == 4.0 and esrgan["model_url"] is None
    assert esrgan["model_path"].endswith("models/ESRGAN/demo-esrgan-4x.safetensors")
    assert by_name["R-ESRGAN 2x+"]["scale"] == 2.0 and by_name["demo-swinir-2x"]["scale"] == 2.0
    realesrgan = xclient.get("/sdapi/v1/realesrgan-models").json
    assert {r["name"]: r["scale"] for r in realesrgan} == {"R-ESRGAN 2x+": 2, "demo-srvgg-2x": 2}
    faces = {f["name"]: f["cmd_dir"] for f in xclient.get("/sdapi/v1/face-restorers").json}
    assert faces.keys() == {"GFPGAN", "CodeFormer"} and faces["CodeFormer"].endswith("models/Codeformer")
    assert not os.path.exists(MARKER)


@pytest.mark.parametrize("upscaler,size", [
    ("demo-esrgan-4x", (80, 56)),  # one 4x pass, then Lanczos down to (40 * 2) // 8 * 8, (28 * 2) // 8 * 8
    ("R-ESRGAN 2x+", (80, 56)),
    ("demo-swinir-2x", (80, 56)),
    ("Lanczos", (80, 56)),
])
def test_single_image_upscaled_by_each_architecture(xclient, upscaler, size):
    r = _single(xclient, upscaler_1=upscaler, upscaling_resize=2)
    assert r.status_code == 200, r.json
    assert set(r.json) == {"html_info", "image"}
    assert decode_png(r.json["image"]).size == size
    # A1111 (pydantic v1) makes the sent 2 a float: "2.0", as here
    assert r.json["html_info"] == f"<p>Postprocess upscale by: 2.0, Postprocess upscaler: {upscaler}</p>"


def test_a1111_defaults_and_png_chunks_kept(xclient):
    image = _png(_image(), parameters="a cat\nSteps: 2, Seed: 7")
    r = xclient.post("/sdapi/v1/extra-single-image", json={"image": image})  # every field at A1111's default
    assert r.status_code == 200, r.json
    out = decode_png(r.json["image"])
    assert out.size == (40, 28) and r.json["html_info"] == "<p></p>"  # upscaler_1 "None": nothing ran
    assert out.info["parameters"] == "a cat\nSteps: 2, Seed: 7" and out.info["postprocessing"] == ""
    r = xclient.post("/sdapi/v1/extra-single-image", json={
        "image": image, "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64,
        "upscaler_1": "demo-srvgg-2x", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.5})
    assert r.status_code == 200, r.json
    out = decode_png(r.json["image"])
    assert out.size == (64, 64)  # scaled to cover 64 x 64, then cropped (centred on black)
    text = ("Postprocess upscale to: 64x64, Postprocess crop to: 64x64, Postprocess upscaler: demo-srvgg-2x, "
            "Postprocess upscaler 2: Nearest")
    assert out.info["postprocessing"] == text and r.json["html_info"] == f"<p>{text}</p>"
    assert out.info["parameters"] == "a cat\nSteps: 2, Seed: 7"


def test_batch_is_charged_timed_and_cached(xclient, xapp):
    cache = xapp.extensions["sdfunc"].cache
    body = {"imageList": [{"data": _png(_image(seed=i)), "name": f"im{i}.png"} for i in range(3)],
            "upscaler_1": "demo-esrgan-4x", "upscaling_resize": 1.5}
    r = xclient.post("/sdapi/v1/extra-batch-images", json=body)
    assert r.status_code == 200, r.json
    assert [decode_png(b).size for b in r.json["images"]] == [(56, 40)] * 3
    assert int(r.headers["X-Billed-Duration-Ms"]) > 0 and r.headers["X-Charge-Currency"]
    assert "gen;dur=" in r.headers["Server-Timing"] and "queue;dur=" in r.headers["Server-Timing"]
    loads = cache.stats.loads
    again = xclient.post("/sdapi/v1/extra-batch-images", json=body)
    assert again.status_code == 200 and cache.stats.loads == loads  # the network stayed warm: no load
    assert again.json["images"] == r.json["images"]  # and the same input gives the same output
    assert any(m.entry.name == "upscaler demo-esrgan-4x" for m in cache.components())


@pytest.mark.parametrize("fields,status,field,words", [
    ({"upscaler_1": "4x-UltraSharp"}, 404, "upscaler_1", "4x-UltraSharp"),
    ({"upscaler_2": "R-ESRGAN 4x+", "extras_upscaler_2_visibility": 0.5}, 404, "upscaler_2", "R-ESRGAN 4x+"),
    ({"upscaler_1": "evil"}, 422, "upscaler_1", "never run"),
    ({"upscaler_1": "broken"}, 422, "upscaler_1", "not a loadable"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 9}, 422, "upscaling_resize", "over the limit"),
    # the 4x pass makes 400 x 320 on the way to a 248 x 200 result
    ({"upscaler_1": "demo-esrgan-4x", "upscaling_resize": 2.5, "image": _png(_image(100, 80))}, 422,
     "upscaling_resize", "400x320"),
    ({"resize_mode": 1, "upscaler_1": "Lanczos", "upscaling_resize_w": 4000}, 422, "upscaling_resize_w", "limit"),
    ({"image": "not base64!"}, 422, "image", "base64"),
    ({"image": _png(_image(400, 300))}, 422, "image", "exceeds"),
    ({"upscaling_resize": 0}, 422, "upscaling_resize", ""),
    ({"upscaler_1": "Lanczos", "image": _png(_image(3, 100))}, 422, "upscaling_resize", "empty"),  # 0 x 200
])
def test_hostile_extras_are_refused_naming_the_field(xclient, fields, status, field, words):
    r = _single(xclient, **fields)
    assert r.status_code == status, r.json
    assert r.json["error"]["field"] == field and words in r.json["error"]["message"]
    assert r.headers["X-Charge"] == "0"
    assert not os.path.exists(MARKER)
    assert _single(xclient, upscaler_1="demo-srvgg-2x").status_code == 200  # the other models keep working


def test_a_result_keeps_bounded_text_chunks(xclient):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2")
    info.add_text("huge", "x" * 100_000, zip=True)  # a few hundred compressed bytes, 100 kB of text
    info.add_text("note", "kept")
    buf = io.BytesIO()
    _image().save(buf, format="PNG", pnginfo=info)
    r = xclient.post("/sdapi/v1/extra-single-image", json={"image": base64.b64encode(buf.getvalue()).decode()})
    out = decode_png(r.json["image"])
    assert out.info.get("huge") is None and out.info["note"] == "kept" and out.info["parameters"] == "a cat\nSteps: 2"


def test_a_replaced_model_file_is_a_new_network(xapp, xclient, tmp_path):
    from pipelines.upscalers.arch import SRVGGNetCompact

    path = xapp.extensions["sdfunc"].settings.models_dir / "RealESRGAN" / "swap-2x.pth"
    outs = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        torch.save({"params": SRVGGNetCompact(num_feat=8, num_conv=1, upscale=2).state_dict()}, path)
        os.utime(path, ns=(seed, seed))
        assert xclient.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        r = _single(xclient, upscaler_1="swap-2x")
        assert r.status_code == 200, r.json
        outs.append(r.json["image"])
    path.unlink()
    xclient.post("/sdapi/v1/refresh-checkpoints")
    assert outs[0] != outs[1]


def test_upscaler_2_at_visibility_0_neither_runs_nor_counts(xclient):
    r = _single(xclient, upscaler_1="Lanczos", upscaler_2="demo-esrgan-4x", extras_upscaler_2_visibility=0,
                upscaling_resize=6)  # the 4x model would pass through 640 x 448, over the limit
    assert r.status_code == 200 and "upscaler 2" not in r.json["html_info"]


def test_batch_names_the_image_that_fails(xclient):
    body = {"imageList": [{"data": _png(_image()), "name": "a"}, {"data": "@@", "name": "b"}]}
    r = xclient.post("/sdapi/v1/extra-batch-images", json=body)
    assert r.status_code == 422 and r.json["error"]["field"] == "imageList.1.data"


def test_gfpgan_restores_a_real_face_in_extras(xclient):
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB").resize((240, 282))
    r = xclient.post("/sdapi/v1/extra-single-image", json={"image": _png(photo), "gfpgan_visibility": 1})
    assert r.status_code == 200, r.json
    out = np.asarray(decode_png(r.json["image"]), dtype=np.int16)
    diff = np.abs(out - np.asarray(photo, dtype=np.int16)).sum(axis=2)
    assert diff.max() > 0 and diff[:, :20].max() == 0  # the face was pasted back; the border is untouched
    assert r.json["html_info"] == "<p>GFPGAN visibility: 1.0</p>"  # A1111 rounds the float 1.0


def test_hires_fix_with_a_model_upscaler(xclient):
    base = {"prompt": "a red house", "steps": 2, "width": 64, "height": 64, "seed": 3, "enable_hr": True,
            "hr_scale": 1.5, "hr_second_pass_steps": 1, "denoising_strength": 0.5}
    r = xclient.post("/sdapi/v1/txt2img", json={**base, "hr_upscaler": "R-ESRGAN 2x+"})
    assert r.status_code == 200, r.json
    image = decode_png(r.json["images"][0])
    assert image.size == (96, 96) and "Hires upscaler: R-ESRGAN 2x+" in image.info["parameters"]
    lanczos = xclient.post("/sdapi/v1/txt2img", json={**base, "hr_upscaler": "Lanczos"})
    assert lanczos.json["images"][0] != r.json["images"][0]  # the model made the difference
    big = xclient.post("/sdapi/v1/txt2img", json={**base, "width": 128, "height": 128, "hr_upscaler": "demo-esrgan-4x"})
    assert big.status_code == 422 and big.json["error"]["field"] == "hr_upscaler"  # its 4x pass: 512 x 512
    r = xclient.post("/sdapi/v1/txt2img", json={**base, "hr_upscaler": "4x_NMKD-Siax_200k"})
    assert r.status_code == 404 and r.json["error"]["field"] == "hr_upscaler"


def test_img2img_upscaler_option(xclient):
    body = {"init_images": [_png(_image(32, 32))], "prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1,
            "denoising_strength": 0.3}
    plain = xclient.post("/sdapi/v1/img2img", json=body)
    model = xclient.post("/sdapi/v1/img2img", json={**body, "override_settings": {
        "upscaler_for_img2img": "demo-esrgan-4x"}})
    assert plain.status_code == model.status_code == 200, model.json
    assert plain.json["images"][0] != model.json["images"][0]
    r = xclient.post("/sdapi/v1/img2img", json={**body, "override_settings": {"upscaler_for_img2img": "nope"}})
    assert r.status_code == 404 and r.json["error"]["field"] == "override_settings.upscaler_for_img2img"
    r = xclient.post("/sdapi/v1/img2img", json={**body, "init_images": [_png(_image(100, 100))], "width": 256,
                                                "height": 256, "override_settings": {
                                                    "upscaler_for_img2img": "demo-esrgan-4x"}})
    assert r.status_code == 422 and r.json["error"]["field"] == "init_images"  # its 4x pass: 400 x 400


def test_restore_faces_in_generation(xclient):
    body = {"prompt": "a portrait", "steps": 2, "width": 64, "height": 64, "seed": 5}
    r = xclient.post("/sdapi/v1/txt2img", json={**body, "restore_faces": True})
    assert r.status_code == 200, r.json
    assert "Seed: 5, Face restoration: GFPGAN, Size: 64x64" in decode_png(r.json["images"][0]).info["parameters"]
    cache = xclient.application.extensions["sdfunc"].cache
    assert any(m.entry.name == "face restorer GFPGAN" for m in cache.components())  # it ran on the device
    r = xclient.post("/sdapi/v1/txt2img", json={**body, "restore_faces": True, "override_settings": {
        "face_restoration_model": "CodeFormer", "code_former_weight": 0.3}})
    assert r.status_code == 200, r.json
    assert "Face restoration: CodeFormer" in decode_png(r.json["images"][0]).info["parameters"]
    r = xclient.post("/sdapi/v1/txt2img", json={**body, "restore_faces": True,
                                                "override_settings": {"face_restoration_model": "RestoreFormer"}})
    assert r.status_code == 422 and r.json["error"]["field"] == "override_settings.face_restoration_model"


def test_codeformer_from_the_users_own_weights_in_extras(xclient):
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = _png(Image.open(f).convert("RGB").resize((240, 282)))
    low, high = (xclient.post("/sdapi/v1/extra-single-image", json={
        "image": photo, "codeformer_visibility": 1, "codeformer_weight": w}) for w in (0.0, 1.0))
    assert low.status_code == high.status_code == 200, low.json
    assert low.json["image"] != high.json["image"]  # the weight reaches the network
    assert low.json["html_info"] == "<p>CodeFormer visibility: 1.0, CodeFormer weight: 0.0</p>"


@pytest.mark.parametrize("fields,field,words", [
    ({"codeformer_visibility": 0.5}, "codeformer_visibility", "non-commercial"),
    ({"gfpgan_visibility": 0.5}, "gfpgan_visibility", "GFPGANv1.4.pth"),
    ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1", "R-ESRGAN 4x+"),
])
def test_without_models_on_the_mount_the_answer_says_what_to_install(client, fields, field, words):
    r = _single(client, **fields)
    assert r.status_code in (404, 422) and r.json["error"]["field"] == field and words in r.json["error"]["message"]
    assert client.get("/sdapi/v1/face-restorers").json == []


def test_pai_eas_save_dir_charge_and_image_records(xclient):
    body = {"imageList": [{"data": _png(_image()), "name": "a.png"}], "upscaler_1": "Lanczos",
            "alwayson_scripts": {"save_dir": "eas-extras", "id_task": "t-27"}}
    r = xclient.post("/sdapi/v1/extra-batch-images", json=body, headers={"Idempotency-Key": "extras-records-27"})
    assert r.status_code == 200, r.json
    params = r.json["parameters"]
    assert params["status"] == 0 and params["id_task"] == "t-27" and params["error_msg"] == ""
    saved = params["image_url"].split(",")
    assert len(saved) == 1 and "/eas-extras/extras-images/" in saved[0]
    assert open(saved[0], "rb").read() == base64.b64decode(r.json["images"][0])
    records = xclient.get("/images", query_string={"request_id": "extras-records-27"}).json["images"]
    assert [(i["size"], i["model"], i["image_url"]) for i in records] == [("80x56", "Lanczos", saved[0])]
    again = xclient.post("/sdapi/v1/extra-batch-images", json=body, headers={"Idempotency-Key": "extras-records-27"})
    assert again.status_code == 409  # charged once
    bad = xclient.post("/sdapi/v1/extra-batch-images", json={**body, "alwayson_scripts": {"save_dir": "../up"}})
    assert bad.status_code == 422 and bad.json["error"]["field"] == "alwayson_scripts.save_dir"
