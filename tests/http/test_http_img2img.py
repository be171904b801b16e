"""POST /sdapi/v1/img2img (and inpainting) through the test client."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import decode_png, png_b64

BASE = {"prompt": "a house", "steps": 4, "width": 64, "height": 64, "denoising_strength": 0.6, "seed": 12}


def _init(size=(64, 64), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(arr, "RGB")
    return image.convert(mode)


def post(client, **fields):
    return client.post("/sdapi/v1/img2img", json={**BASE, **fields})


def test_img2img_base64_and_data_url_give_same_image(client):
    raw = png_b64(_init())
    a = post(client, init_images=[raw])
    b = post(client, init_images=["data:image/png;base64," + raw])
    assert a.status_code == 200, a.json
    assert a.json["images"][0] == b.json["images"][0]
    info = json.loads(a.json["info"])
    assert info["denoising_strength"] == 0.6
    assert "Denoising strength: 0.6," in info["infotexts"][0]
    # init images are not echoed unless asked for.
    assert a.json["parameters"]["init_images"] is None
    assert post(client, init_images=[raw], include_init_images=True).json["parameters"]["init_images"] == [raw]


def test_img2img_one_image_repeated_for_batch(client):
    body = post(client, init_images=[png_b64(_init())], batch_size=2).json
    assert len(body["images"]) == 2
    assert json.loads(body["info"])["all_seeds"] == [12, 13]


def test_img2img_rgba_is_flattened_on_white(client):
    transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    a = post(client, init_images=[png_b64(transparent)]).json["images"][0]
    b = post(client, init_images=[png_b64(white)]).json["images"][0]
    assert a == b


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_img2img_resize_modes(client, mode):
    r = post(client, init_images=[png_b64(_init((96, 48)))], resize_mode=mode)
    assert r.status_code == 200, r.json
    assert decode_png(r.json["images"][0]).size == (64, 64)


def test_img2img_denoising_changes_the_image_progressively(client):
    init = _init()
    src = np.asarray(init, dtype=np.float32)
    low = np.asarray(decode_png(post(client, init_images=[png_b64(init)], denoising_strength=0.25,
                                     steps=8).json["images"][0]), dtype=np.float32)
    high = np.asarray(decode_png(post(client, init_images=[png_b64(init)], denoising_strength=1.0,
                                      steps=8).json["images"][0]), dtype=np.float32)
    assert np.abs(low - src).mean() < np.abs(high - src).mean()


def test_inpaint_keeps_unmasked_pixels(client):
    init = _init()
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    r = post(client, init_images=[png_b64(init)], mask=png_b64(mask), mask_blur=0, inpaint_full_res=False,
             inpainting_fill=1, denoising_strength=0.9)
    assert r.status_code == 200, r.json
    out = np.asarray(decode_png(r.json["images"][0]), dtype=np.int16)
    src = np.asarray(init, dtype=np.int16)
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    assert np.abs(out - src)[outside].max() == 0
    assert np.abs(out - src)[~outside].mean() > 5
    text = decode_png(r.json["images"][0]).info["parameters"]
    assert "Mask blur" not in text and "Masked content" not in text and "Inpaint area" not in text


def test_inpaint_infotext_keys_as_a1111_writes_them(client):
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 23, 23), fill=255)
    r = post(client, init_images=[png_b64(_init())], mask=png_b64(mask), mask_blur=4, inpaint_full_res=True,
             inpaint_full_res_padding=8, inpainting_fill=0, inpainting_mask_invert=1)
    text = decode_png(r.json["images"][0]).info["parameters"]
    assert text.endswith("RNG: CPU, Mask mode: Inpaint not masked, Mask blur: 4, Inpaint area: Only masked, "
                         "Masked area padding: 8, Masked content: fill, Version: sdfunc-" + text.rsplit("sdfunc-")[1])
    extras = json.loads(r.json["info"])["extra_generation_params"]
    assert list(extras) == ["Schedule type", "Mask mode", "Mask blur", "Inpaint area", "Masked area padding",
                            "Masked content"]


def test_inpaint_blank_mask_only_masked_falls_back_to_whole_picture(client):
    init = _init()
    r = post(client, init_images=[png_b64(init)], mask=png_b64(Image.new("L", (64, 64), 0)), inpaint_full_res=True)
    assert r.status_code == 200, r.json
    # Nothing is masked, so nothing changes.
    assert np.array_equal(np.asarray(decode_png(r.json["images"][0])), np.asarray(init))


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.1])
def test_img2img_tiny_denoising_strength_still_answers(client, strength):
    init = _init()
    r = post(client, init_images=[png_b64(init)], denoising_strength=strength, steps=4)
    assert r.status_code == 200, r.json
    out = np.asarray(decode_png(r.json["images"][0]), dtype=np.int16)
    if strength == 0:
        assert np.array_equal(out, np.asarray(init, dtype=np.int16))


def test_img2img_accepts_line_wrapped_base64(client):
    import base64
    import io

    buf = io.BytesIO()
    _init().save(buf, format="PNG")
    wrapped = base64.encodebytes(buf.getvalue()).decode()
    assert "\n" in wrapped
    a = post(client, init_images=[wrapped]).json["images"][0]
    b = post(client, init_images=[base64.b64encode(buf.getvalue()).decode()]).json["images"][0]
    assert a == b


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpaint_only_masked_and_fills(client, fill):
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 23, 23), fill=255)
    r = post(client, init_images=[png_b64(_init())], mask=png_b64(mask), inpaint_full_res=True,
             inpaint_full_res_padding=8, inpainting_fill=fill, inpainting_mask_invert=fill % 2 == 1)
    assert r.status_code == 200, r.json
    assert decode_png(r.json["images"][0]).size == (64, 64)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({}, "init_images"),
        ({"init_images": []}, "init_images"),
        ({"init_images": ["not base64!!"]}, "init_images.0"),
        ({"init_images": ["aGVsbG8="]}, "init_images.0"),  # base64 of "hello", not an image
        ({"init_images": ["http://127.0.0.1/x.png"]}, "init_images.0"),
        ({"init_images": ["A", "B"], "batch_size": 1}, "init_images"),
        ({"resize_mode": 4}, "resize_mode"),
        ({"denoising_strength": 1.5}, "denoising_strength"),
        ({"inpainting_fill": 7}, "inpainting_fill"),
    ],
)
def test_img2img_invalid_is_422(client, fields, field):
    body = {**BASE, **fields}
    if "init_images" not in fields and field != "init_images":
        body["init_images"] = [png_b64(_init())]
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422, r.json
    assert r.json["error"]["field"] == field


def test_bad_mask_is_422(client):
    r = post(client, init_images=[png_b64(_init())], mask="////")
    assert r.status_code == 422
    assert r.json["error"]["field"] == "mask"


def test_oversized_init_image_is_refused_from_its_header(app, client):
    service = app.extensions["sdfunc"]
    limit = service.settings.max_input_pixels
    service.settings.max_input_pixels = 32 * 32
    try:
        r = post(client, init_images=[png_b64(_init())])
    finally:
        service.settings.max_input_pixels = limit
    assert r.status_code == 422
    assert "exceeds" in r.json["error"]["message"]


def test_image_too_thin_to_resize_and_fill_is_422(client):
    thin = Image.new("RGB", (1, 300), (10, 20, 30))
    r = client.post("/sdapi/v1/img2img", json={**BASE, "init_images": [png_b64(thin)], "resize_mode": 2,
                                                "width": 128, "height": 64})
    assert r.status_code == 422, r.json
    assert r.json["error"]["field"] == "init_images"
    r = post(client, init_images=[png_b64(_init())], mask=png_b64(Image.new("L", (300, 1), 255)), resize_mode=2,
             width=64, height=128)
    assert r.status_code == 422 and r.json["error"]["field"] == "mask"


def test_lcm_takes_more_steps_than_its_origin_schedule(client):
    """Found by the long fuzz run: diffusers' LCMScheduler refuses more steps than its 50 original ones (a 500;
    img2img with a tiny strength asks for a fine schedule); A1111's LCM takes any step count."""
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a house", "steps": 60, "width": 64, "height": 64,
                                                "sampler_name": "LCM"})
    assert r.status_code == 200, r.json
    assert post(client, init_images=[png_b64(_init())], sampler_name="LCM", steps=2,
                denoising_strength=0.001).status_code == 200


def test_img2img_variation_seed(client):
    """A1111 mixes img2img's noise as txt2img's: slerp(subseed_strength, seed noise, subseed noise)."""
    init = png_b64(_init())
    plain = post(client, init_images=[init], steps=2).json["images"][0]
    assert post(client, init_images=[init], steps=2, subseed=20, subseed_strength=0).json["images"][0] == plain
    body = post(client, init_images=[init], steps=2, subseed=20, subseed_strength=0.5, batch_size=2).json
    assert body["images"][0] != plain and body["images"][0] != body["images"][1]
    again = post(client, init_images=[init], steps=2, subseed=20, subseed_strength=0.5, batch_size=2).json
    assert again["images"] == body["images"]
    info = json.loads(body["info"])
    assert info["all_seeds"] == [12, 12] and info["all_subseeds"] == [20, 21] and info["subseed_strength"] == 0.5
    assert "Seed: 12, " in info["infotexts"][1]
    assert "Variation seed: 21, Variation seed strength: 0.5," in info["infotexts"][1]
    assert decode_png(body["images"][1]).info["parameters"] == info["infotexts"][1]


@pytest.mark.parametrize("denoising", [0.75, 1.0])  # 1: diffusers' inpainting starts from the noise itself
def test_inpaint_variation_seed(client, denoising):
    init = _init()
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    fields = dict(init_images=[png_b64(init)], mask=png_b64(mask), mask_blur=0, inpaint_full_res=False,
                  denoising_strength=denoising, steps=2)
    plain = post(client, **fields).json["images"][0]
    assert post(client, **fields, subseed=3, subseed_strength=0).json["images"][0] == plain
    varied = post(client, **fields, subseed=3, subseed_strength=0.6)
    assert varied.status_code == 200, varied.json
    out = varied.json["images"][0]
    assert out != plain and post(client, **fields, subseed=3, subseed_strength=0.6).json["images"][0] == out
    pixels = np.asarray(decode_png(out), dtype=np.int16)
    assert np.array_equal(pixels[:16], np.asarray(init, dtype=np.int16)[:16])  # unmasked pixels kept
    assert "Variation seed: 3, Variation seed strength: 0.6," in decode_png(out).info["parameters"]
