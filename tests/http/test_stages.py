"""Hires fix, the SDXL refiner and grids in the response (pipelines/hires.py, handler/runtime/stages.py), through the
app on the demo checkpoints, with the numbers A1111 computes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import close_apps, decode_png, linked_data_root, make_settings

SMALL = {"prompt": "a red house", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler"}
XL = {"override_settings": {"sd_model_checkpoint": "demo-sdxl"}}


@pytest.fixture(scope="module")
def root(data_dir, tmp_path_factory):
    """The demo checkpoints plus a second name for each (a different file to the cache: another load)."""
    root = linked_data_root(data_dir, tmp_path_factory.mktemp("stages"))
    models = root / "models" / "Stable-diffusion"
    os.link(models / "demo-sdxl.safetensors", models / "refiner-xl.safetensors")
    os.link(models / "demo-sd15.safetensors", models / "other-sd15.safetensors")
    # the refiner's own layout (OpenCLIP only, as embedders.0; aesthetic-score UNet), tiny
    from pipelines.builders.demo import write_demo_refiner

    write_demo_refiner(models)
    # a file whose header says SD 2.x: no pipeline loads it
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2),
               "model.diffusion_model.out.0.weight": torch.zeros(2)}, models / "sd2-arch.safetensors")
    return root


@pytest.fixture(scope="module")
def app(root):
    from handler.app import create_app

    app = create_app(make_settings(root))
    yield app
    close_apps([app])


@pytest.fixture
def client(app):
    return app.test_client()


def post(client, **fields):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    return r, (json.loads(r.json["info"]) if r.status_code == 200 else None)


def params_line(info, i=0) -> str:
    return info["infotexts"][i].splitlines()[-1]


def test_target_size_follows_a1111():
    from pipelines.hires import target_size

    assert target_size(512, 512, 2.0, 0, 0) == (1024, 1024, 1024, 1024)
    assert target_size(512, 768, 1.5, 0, 0) == (768, 1152, 768, 1152)
    assert target_size(512, 768, 2.0, 1024, 0) == (1024, 1536, 1024, 1536)  # y from the aspect ratio
    assert target_size(512, 768, 2.0, 0, 1024) == (682, 1024, 680, 1024)  # the latent holds 85 x 128
    assert target_size(72, 72, 1.37, 0, 0) == (98, 98, 96, 96)
    # both given: cover the box, then crop the latent (A1111's truncate_x/y)
    assert target_size(512, 512, 2.0, 1024, 768) == (1024, 1024, 1024, 768)
    assert target_size(512, 768, 2.0, 1024, 1024) == (1024, 1536, 1024, 1024)


@pytest.mark.parametrize("steps,strength", [(1, 0.01), (3, 0.5), (20, 0.7), (20, 0.75), (7, 1.0), (150, 0.999),
                                            (20, 0.01), (150, 1e-300)])
def test_second_pass_runs_exactly_the_requested_steps(steps, strength):
    from pipelines.hires import second_pass_steps

    total, adjusted = second_pass_steps(steps, strength, finest=1000)
    # A1111's schedule length, within the scheduler's 1000 training timesteps
    assert total == min(1000, max(steps, int(steps / min(strength, 0.999))))
    assert min(int(total * adjusted), total) == steps  # what diffusers' img2img runs


def test_hires_tiny_strength_on_a_fine_grained_scheduler(client):
    r, _ = post(client, enable_hr=True, sampler_name="DDIM", steps=20, denoising_strength=0.01)
    assert r.status_code == 200, r.json


def test_hires_latent_doubles_the_size_and_writes_a1111s_keys(client, service_of):
    r, info = post(client, enable_hr=True, hr_upscaler="Latent", denoising_strength=0.6)
    assert r.status_code == 200, r.json
    assert decode_png(r.json["images"][0]).size == (128, 128)
    assert (info["width"], info["height"]) == (64, 64)  # the first pass, as A1111 reports it
    assert info["denoising_strength"] == 0.6
    line = params_line(info)
    assert "Size: 64x64" in line
    assert line.index("Denoising strength: 0.6") < line.index("Hires upscale: 2.0") < line.index("Hires upscaler: Latent")
    assert "Hires steps" not in line  # 0: same as steps, not written
    assert info["extra_generation_params"]["Hires upscale"] == 2.0


def test_hires_defaults_and_upscalers(client):
    r, info = post(client, enable_hr=True)  # hr_upscaler null: the default latent mode, not written
    assert r.status_code == 200, r.json
    assert "Hires upscaler" not in params_line(info) and "Denoising strength: 0.75" in params_line(info)
    latent = r.json["images"][0]
    again, _ = post(client, enable_hr=True)
    assert again.json["images"][0] == latent  # same seed, same image
    lanczos, info = post(client, enable_hr=True, hr_upscaler="Lanczos", hr_second_pass_steps=3)
    assert lanczos.status_code == 200, lanczos.json
    assert "Hires steps: 3, Hires upscaler: Lanczos" in params_line(info)
    assert lanczos.json["images"][0] != latent
    nearest, _ = post(client, enable_hr=True, hr_upscaler="Latent (nearest-exact)")
    assert nearest.status_code == 200 and nearest.json["images"][0] != latent


def test_hires_resize_box_and_legacy_firstphase(client):
    r, info = post(client, enable_hr=True, hr_resize_x=96, hr_resize_y=80)
    assert decode_png(r.json["images"][0]).size == (96, 80)
    assert "Hires resize: 96x80" in params_line(info) and "Hires upscale" not in params_line(info)
    r, info = post(client, enable_hr=True, hr_resize_x=128)
    assert decode_png(r.json["images"][0]).size == (128, 128)
    # legacy firstphase_width/height: the first pass runs there; A1111 1.10 still takes the target from hr_scale
    r, info = post(client, enable_hr=True, width=256, height=256, firstphase_width=64, firstphase_height=48,
                   hr_scale=1.5)
    assert decode_png(r.json["images"][0]).size == (96, 72) and (info["width"], info["height"]) == (64, 48)
    assert "Hires upscale: 1.5" in params_line(info)


def test_hires_strength_zero_returns_the_upscaled_first_pass(client):
    r, info = post(client, enable_hr=True, hr_upscaler="Nearest", denoising_strength=0)
    assert r.status_code == 200, r.json
    image = decode_png(r.json["images"][0])
    plain, _ = post(client)
    first = decode_png(plain.json["images"][0])
    assert image.size == (128, 128)
    assert image.resize((64, 64), 0).tobytes() == first.tobytes()  # nearest x2 then back


def test_hires_prompt_sampler_and_batches(client):
    base, _ = post(client, enable_hr=True, batch_size=2)
    assert base.status_code == 200 and len(base.json["images"]) == 2
    r, info = post(client, enable_hr=True, batch_size=2, hr_prompt="a blue boat", hr_sampler_name="DDIM")
    assert r.status_code == 200, r.json
    line = params_line(info, 1)
    assert "Hires sampler: DDIM" in line and 'Hires prompt: a blue boat' in line and "Seed: 8" in line
    assert r.json["images"][0] != base.json["images"][0]
    assert info["all_seeds"] == [7, 8]


def test_hires_second_pass_on_another_checkpoint(client, app):
    store = app.extensions["sdfunc"].store
    sha = store.sha256(store.find_checkpoint("other-sd15"))
    r, info = post(client, enable_hr=True, hr_checkpoint_name="other-sd15")
    assert r.status_code == 200, r.json
    assert f"Hires checkpoint: other-sd15 [{sha[:10]}]" in params_line(info)
    assert info["sd_model_name"] == "demo-sd15"
    # a substring of a title, as A1111's closest match takes it
    r, info = post(client, enable_hr=True, hr_checkpoint_name="other-sd")
    assert r.status_code == 200 and "Hires checkpoint: other-sd15" in params_line(info)


@pytest.mark.parametrize("fields,status,field", [
    ({"hr_upscaler": "R-ESRGAN 4x+"}, 422, "hr_upscaler"),
    ({"hr_scale": 16}, 422, "hr_scale"),
    ({"hr_scale": 0.5}, 422, "hr_scale"),
    ({"width": 640, "height": 64}, 422, "hr_scale"),  # 1280 > the 1024 limit of the test settings
    ({"hr_resize_x": 2048}, 422, "hr_resize_x"),
    ({"hr_checkpoint_name": "no-such-model"}, 404, "hr_checkpoint_name"),
    ({"firstphase_width": 4}, 422, "firstphase_width"),
    ({"hr_second_pass_steps": 10000}, 422, "hr_second_pass_steps"),
    ({"hr_checkpoint_name": "sd2-arch"}, 422, "hr_checkpoint_name"),
    ({"hr_sampler_name": "No Such Sampler"}, 422, "hr_sampler_name"),
])
def test_hires_refusals_name_the_field(client, fields, status, field):
    r, _ = post(client, enable_hr=True, **fields)
    assert r.status_code == status, r.json
    assert r.json["error"]["field"] == field and field in r.json["error"]["message"]


def test_refiner_switches_to_a_second_sdxl_checkpoint(client, app):
    import numpy as np

    plain, _ = post(client, steps=4, **XL)
    same, _ = post(client, steps=4, refiner_checkpoint="refiner-xl", refiner_switch_at=1.0, **XL)
    assert same.json["images"][0] == plain.json["images"][0]  # switching at the end: never switched
    service = app.extensions["sdfunc"]
    entry = service.store.find_checkpoint("refiner-xl")
    r, info = post(client, steps=4, refiner_checkpoint="refiner-xl", refiner_switch_at=0.5, **XL)
    assert r.status_code == 200, r.json
    assert service.cache.peek(entry) is not None  # the refiner was loaded through the shared cache
    line = params_line(info)
    assert f"Refiner: refiner-xl [{service.store.sha256(entry)[:10]}], Refiner switch at: 0.5" in line
    # The refiner file holds the base's weights: continuing the same schedule from the same latents on it
    # must give the base's image (up to float noise). A switch that re-noised or restarted would not.
    refined = np.asarray(decode_png(r.json["images"][0]), dtype=np.float32)
    base = np.asarray(decode_png(plain.json["images"][0]), dtype=np.float32)
    assert refined.shape == base.shape == (64, 64, 3)
    assert np.abs(refined - base).mean() < 1.0


def test_refiner_in_the_refiners_own_layout(client, app):
    """The SDXL refiner's layout (sd_xl_refiner_1.0's: OpenCLIP only, aesthetic score), loaded by the real loader
    from the single-file layout, finishes the base's schedule."""
    import numpy as np

    plain, _ = post(client, steps=4, **XL)
    r, info = post(client, steps=4, refiner_checkpoint="demo-sdxl-refiner", refiner_switch_at=0.5, **XL)
    assert r.status_code == 200, r.json
    service = app.extensions["sdfunc"]
    refiner = service.cache.peek(service.store.find_checkpoint("demo-sdxl-refiner"))
    assert refiner is not None and refiner.pipe.text_encoder is None and refiner.pipe.config.requires_aesthetics_score
    assert "Refiner: demo-sdxl-refiner [" in params_line(info)
    refined = np.asarray(decode_png(r.json["images"][0]), dtype=np.float32)
    base = np.asarray(decode_png(plain.json["images"][0]), dtype=np.float32)
    assert refined.shape == base.shape and np.abs(refined - base).mean() > 1.0  # other weights finished it
    # weighted and long prompts take A1111's encoding on the refiner's single encoder too
    r, _ = post(client, steps=4, prompt="a (red:1.3) house BREAK sky", negative_prompt="",
                refiner_checkpoint="demo-sdxl-refiner", refiner_switch_at=0.5, **XL)
    assert r.status_code == 200, r.json


@pytest.mark.parametrize("fields,status,field", [
    ({"refiner_checkpoint": "refiner-xl", "refiner_switch_at": 0.5}, 422, "refiner_checkpoint"),  # SD 1.5 base
    ({"refiner_checkpoint": "no-such", "refiner_switch_at": 0.5, **XL}, 404, "refiner_checkpoint"),
    ({"refiner_checkpoint": "refiner-xl", **XL}, 422, "refiner_switch_at"),
    ({"refiner_checkpoint": "sd2-arch", "refiner_switch_at": 0.5, **XL}, 422, "refiner_checkpoint"),
    ({"override_settings": {"sd_model_checkpoint": "demo-sdxl-refiner"}}, 422, "override_settings.sd_model_checkpoint"),
    ({"refiner_checkpoint": "refiner-xl", "refiner_switch_at": 0.5, "enable_hr": True, **XL}, 422, "refiner_checkpoint"),
])
def test_refiner_refusals_name_the_field(client, fields, status, field):
    r, _ = post(client, **fields)
    assert r.status_code == status, r.json
    assert r.json["error"]["field"] == field


def test_refiner_is_for_txt2img(client):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    r = client.post("/sdapi/v1/img2img", json={**SMALL, **XL, "refiner_checkpoint": "refiner-xl",
                                               "refiner_switch_at": 0.5,
                                               "init_images": [base64.b64encode(buf.getvalue()).decode()]})
    assert r.status_code == 422 and r.json["error"]["field"] == "refiner_checkpoint"
    # "None" / "" mean no refiner, as A1111's UI sends them
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "refiner_checkpoint": "",
                                               "init_images": [base64.b64encode(buf.getvalue()).decode()]})
    assert r.status_code == 200, r.json


def test_grid_comes_first_when_saving_several_images(client):
    r, info = post(client, batch_size=2, n_iter=2, save_images=True)
    assert r.status_code == 200, r.json
    images = [decode_png(b) for b in r.json["images"]]
    assert len(images) == 5 and images[0].size == (128, 128)  # 2 x 2 grid, then the 4 images
    assert info["index_of_first_image"] == 1 and len(info["infotexts"]) == 5
    assert info["infotexts"][0] == info["infotexts"][1] and "Seed: 7," in info["infotexts"][0]
    assert [f"Seed: {s}," in t for s, t in zip([7, 8, 9, 10], info["infotexts"][1:])] == [True] * 4
    for i, im in enumerate(images[1:]):  # the grid holds the images row by row
        cell = images[0].crop((i % 2 * 64, i // 2 * 64, i % 2 * 64 + 64, i // 2 * 64 + 64))
        assert cell.convert("RGB").tobytes() == im.convert("RGB").tobytes()
    assert r.json["parameters"]["billing"]["images"] == 4  # the grid is not an image anyone pays for


def test_no_grid_without_saving_or_with_return_grid_off(client):
    r, info = post(client, batch_size=2)
    assert len(r.json["images"]) == 2 and info["index_of_first_image"] == 0
    r, info = post(client, batch_size=2, save_images=True, override_settings={"return_grid": False})
    assert len(r.json["images"]) == 2 and info["index_of_first_image"] == 0
    r, info = post(client, save_images=True)
    assert len(r.json["images"]) == 1 and info["index_of_first_image"] == 0


@pytest.fixture
def service_of(app):
    return app.extensions["sdfunc"]
