"""POST /sdapi/v1/txt2img through the app factory's test client, on the tiny demo checkpoints."""

import json

import numpy as np
import pytest

from tests.conftest import decode_png

SMALL = {"prompt": "a red house", "steps": 2, "width": 64, "height": 64}

# Exactly what webuiapi 0.9.17 sends for txt2img with its defaults.
WEBUIAPI_TXT2IMG = {
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
    "prompt": "a cat", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
    "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 2, "cfg_scale": 7.0, "width": 64,
    "height": 64, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "sampler_name": "Euler a", "sampler_index": "Euler a", "scheduler": "automatic", "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
}

INFO_KEYS = [
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
    "is_using_inpainting_conditioning", "version",
]


def post(client, **fields):
    return client.post("/sdapi/v1/txt2img", json={**SMALL, **fields})


def test_txt2img_returns_a1111_shape(client, service):
    r = post(client, seed=42)
    assert r.status_code == 200, r.json
    body = r.json
    assert set(body) == {"images", "parameters", "info"}
    assert not body["images"][0].startswith("data:")
    image = decode_png(body["images"][0])
    assert image.size == (64, 64)
    info = json.loads(body["info"])
    assert list(info) == INFO_KEYS
    assert info["seed"] == 42 and info["all_seeds"] == [42]
    assert info["sd_model_name"] == "demo-sd15"
    sha = service.store.sha256(service.store.find_checkpoint("demo-sd15"))
    assert info["sd_model_hash"] == sha[:10]
    # The PNG's parameters chunk is the infotext, in A1111's format and order.
    text = image.info["parameters"]
    assert text == info["infotexts"][0]
    assert text == (
        "a red house\nSteps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 42, Size: 64x64, "
        f"Model hash: {sha[:10]}, Model: demo-sd15, RNG: CPU, Version: sdfunc-{_version()}"
    )
    # parameters echoes the request with A1111's API defaults filled in.
    params = body["parameters"]
    assert params["seed"] == 42 and params["sampler_index"] == "Euler" and params["sampler_name"] is None
    assert params["batch_size"] == 1 and params["n_iter"] == 1 and params["denoising_strength"] is None


def _version():
    from handler import __version__

    return __version__


def test_random_seed_is_reported_and_echo_stays_minus_one(client):
    body = post(client).json
    info = json.loads(body["info"])
    assert body["parameters"]["seed"] == -1
    assert 0 <= info["seed"] <= 4294967293
    assert f"Seed: {info['seed']}," in info["infotexts"][0]


def test_same_seed_same_png_bytes(client):
    a = post(client, seed=7).json["images"][0]
    b = post(client, seed=7).json["images"][0]
    c = post(client, seed=8).json["images"][0]
    assert a == b
    assert a != c


def test_batch_and_iterations_seed_each_image(client):
    body = post(client, seed=100, batch_size=2, n_iter=2).json
    info = json.loads(body["info"])
    assert len(body["images"]) == 4
    assert info["all_seeds"] == [100, 101, 102, 103]
    for i, b64 in enumerate(body["images"]):
        assert f"Seed: {100 + i}," in decode_png(b64).info["parameters"]
    # Image i depends only on its own seed: the third image equals a single image made from seed 102.
    single = np.asarray(decode_png(post(client, seed=102).json["images"][0]), dtype=np.int16)
    third = np.asarray(decode_png(body["images"][2]), dtype=np.int16)
    assert np.abs(single - third).max() <= 2


def test_webuiapi_full_field_set_is_accepted(client):
    r = client.post("/sdapi/v1/txt2img", json=WEBUIAPI_TXT2IMG)
    assert r.status_code == 200, r.json
    text = decode_png(r.json["images"][0]).info["parameters"]
    assert "Sampler: Euler a, Schedule type: Automatic," in text


def test_unknown_top_level_keys_are_ignored(client):
    assert post(client, some_future_field={"x": 1}).status_code == 200


@pytest.mark.parametrize(
    "sampler, scheduler, expect",
    [
        ("DPM++ 2M Karras", None, "Sampler: DPM++ 2M, Schedule type: Karras,"),
        ("DPM++ 2M", None, "Sampler: DPM++ 2M, Schedule type: Karras,"),
        ("k_euler_a", None, "Sampler: Euler a, Schedule type: Automatic,"),
        ("Euler", "karras", "Sampler: Euler, Schedule type: Karras,"),
        ("DDIM", None, "Sampler: DDIM, Schedule type: Automatic,"),
        ("DPM++ SDE", None, "Sampler: DPM++ SDE, Schedule type: Karras,"),
    ],
)
def test_sampler_resolution_reaches_the_infotext(client, sampler, scheduler, expect):
    r = post(client, sampler_name=sampler, scheduler=scheduler, seed=1)
    assert r.status_code == 200, r.json
    assert expect in decode_png(r.json["images"][0]).info["parameters"]


@pytest.mark.parametrize("sampler", ["DPM++ SDE", "Euler a", "DPM++ 2M SDE"])
def test_stochastic_samplers_are_deterministic_per_image(client, sampler):
    batch = post(client, seed=50, batch_size=2, sampler_name=sampler).json["images"]
    again = post(client, seed=50, batch_size=2, sampler_name=sampler).json["images"]
    assert batch == again
    single = np.asarray(decode_png(post(client, seed=51, sampler_name=sampler).json["images"][0]), dtype=np.int16)
    assert np.abs(single - np.asarray(decode_png(batch[1]), dtype=np.int16)).max() <= 2


def test_sampler_index_is_used_when_sampler_name_is_empty(client):
    r = post(client, sampler_name="", sampler_index="Euler a")
    assert "Sampler: Euler a," in decode_png(r.json["images"][0]).info["parameters"]


def test_send_images_false_returns_no_images(client):
    body = post(client, send_images=False).json
    assert body["images"] == []
    assert len(json.loads(body["info"])["infotexts"]) == 1


def test_size_is_floored_to_multiple_of_eight(client):
    body = post(client, width=100, height=71).json
    assert decode_png(body["images"][0]).size == (96, 64)
    info = json.loads(body["info"])
    assert (info["width"], info["height"]) == (96, 64)
    assert "Size: 96x64," in info["infotexts"][0]


def test_negative_prompt_and_cfg_scale_int(client):
    body = post(client, negative_prompt="blurry", cfg_scale=5, seed=3).json
    text = decode_png(body["images"][0]).info["parameters"]
    assert text.startswith("a red house\nNegative prompt: blurry\nSteps: 2,")
    assert "CFG scale: 5.0," in text
    assert body["parameters"]["cfg_scale"] == 5.0


def test_clip_skip_override_reaches_infotext_and_changes_image(client):
    base = post(client, seed=5).json
    skipped = post(client, seed=5, override_settings={"CLIP_stop_at_last_layers": 2}).json
    text = decode_png(skipped["images"][0]).info["parameters"]
    assert "Clip skip: 2," in text
    assert json.loads(skipped["info"])["clip_skip"] == 2
    assert skipped["images"][0] != base["images"][0]


def test_tiling_is_per_request_and_restored(client, service):
    plain = post(client, seed=9).json["images"][0]
    tiled = post(client, seed=9, tiling=True).json
    assert "Tiling: True" in decode_png(tiled["images"][0]).info["parameters"]
    assert tiled["images"][0] != plain
    model = service.cache.peek(service.store.find_checkpoint("demo-sd15"))
    import torch

    modes = {m.padding_mode for m in model.pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert modes == {"zeros"}
    assert post(client, seed=9).json["images"][0] == plain


def test_variation_seed(client):
    body = post(client, seed=11, subseed=20, subseed_strength=0.5, batch_size=2).json
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 11] and info["all_subseeds"] == [20, 21]
    text = info["infotexts"][1]
    assert "Variation seed: 21, Variation seed strength: 0.5," in text
    assert body["images"][0] != body["images"][1]


def test_sdxl_checkpoint_by_eas_alwayson_scripts(client):
    r = post(client, seed=4, alwayson_scripts={"sd_model_checkpoint": "demo-sdxl.safetensors"})
    assert r.status_code == 200, r.json
    info = json.loads(r.json["info"])
    assert info["sd_model_name"] == "demo-sdxl"
    assert "Model: demo-sdxl," in info["infotexts"][0]
    # EAS requests also get the EAS fields in parameters.
    assert r.json["parameters"]["status"] == 0
    # A per-request choice does not change the caller's default.
    assert client.get("/sdapi/v1/options").json["sd_model_checkpoint"].startswith("demo-sd15.safetensors")


def test_checkpoint_by_override_settings_and_hash(client, service):
    sha = service.store.sha256(service.store.find_checkpoint("demo-sdxl"))
    for name in ("demo-sdxl", f"demo-sdxl.safetensors [{sha[:10]}]", sha[:10], sha):
        r = post(client, override_settings={"sd_model_checkpoint": name})
        assert r.status_code == 200, (name, r.json)
        assert json.loads(r.json["info"])["sd_model_name"] == "demo-sdxl"


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"steps": "abc"}, "steps"),
        ({"seed": False}, "seed"),
        ({"width": 4}, "width"),
        ({"width": 4096}, "width"),
        ({"height": 2000}, "height"),
        ({"batch_size": 4, "n_iter": 3}, "n_iter"),
        ({"sampler_name": "No Such Sampler"}, "sampler_name"),
        ({"restore_faces": True}, "restore_faces"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"alwayson_scripts": {"controlnet": {"args": [{"enabled": True}]}}}, "alwayson_scripts.controlnet.args.0.model"),
        ({"alwayson_scripts": {"regional prompter": {"args": [1]}}}, "alwayson_scripts.regional prompter"),
        ({"cfg_scale": -1}, "cfg_scale"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, "override_settings.CLIP_stop_at_last_layers"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(client, fields, field):
    r = post(client, **fields)
    assert r.status_code == 422, r.json
    err = r.json["error"]
    assert err["field"] == field
    assert field in err["message"]
    assert err["request_id"]


def test_empty_args_entry_for_missing_script_is_ignored(client):
    assert post(client, alwayson_scripts={"ControlNet": {"args": []}}).status_code == 200


@pytest.mark.parametrize("where", ["override_settings", "alwayson_scripts"])
def test_unknown_checkpoint_is_404(client, where):
    r = post(client, **{where: {"sd_model_checkpoint": "nope.safetensors"}})
    assert r.status_code == 404
    assert r.json["error"]["field"] == f"{where}.sd_model_checkpoint"
    assert "nope.safetensors" in r.json["error"]["message"]


def test_body_not_json_is_422(client):
    r = client.post("/sdapi/v1/txt2img", data="{not json", content_type="application/json")
    assert r.status_code == 422
    assert r.json["error"]["field"] == "body"


def test_oversized_body_is_413(app, client):
    big = "x" * (app.extensions["sdfunc"].settings.max_body_bytes + 10)
    r = client.post("/sdapi/v1/txt2img", data=big, content_type="application/json")
    assert r.status_code == 413
    assert r.json["error"]["code"] == "payload_too_large"


def test_internal_error_has_no_traceback(client, service, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret internal detail /path/to/file.py")

    monkeypatch.setattr("pipelines.generate.generate", boom)
    r = post(client, seed=1)
    assert r.status_code == 500
    assert "secret" not in r.get_data(as_text=True)
    assert "Traceback" not in r.get_data(as_text=True)
    assert r.json["error"]["code"] == "internal_error"
    # The device thread is free and the progress state is reset.
    assert service.device.pending == 0
    assert client.get("/sdapi/v1/progress").json["state"]["job_count"] == 0


def test_request_id_is_propagated(client):
    r = client.post("/sdapi/v1/txt2img", json={"steps": 0}, headers={"x-fc-request-id": "req-abc-123"})
    assert r.headers["x-fc-request-id"] == "req-abc-123"
    assert r.json["error"]["request_id"] == "req-abc-123"


def test_infotext_fills_the_fields_the_request_did_not_set(client):
    source = post(client, prompt="a blue boat", seed=21, steps=3, sampler_name="DPM++ 2M Karras",
                  override_settings={"CLIP_stop_at_last_layers": 2}).json
    text = json.loads(source["info"])["infotexts"][0]
    again = client.post("/sdapi/v1/txt2img", json={"infotext": text, "width": 64, "height": 64}).json
    assert again["images"][0] == source["images"][0]
    changed = client.post("/sdapi/v1/txt2img", json={"infotext": text, "seed": 22}).json
    assert "Seed: 22," in json.loads(changed["info"])["infotexts"][0]
    bad = client.post("/sdapi/v1/txt2img", json={"infotext": "x\nSteps: many, Sampler: Euler, Seed: 1"})
    assert bad.status_code == 422 and bad.json["error"]["field"] == "infotext"


def test_nulls_mean_defaults_as_in_a1111(client):
    r = post(client, seed=None, subseed=None, mask_round=None, do_not_save_samples=None, styles=None,
             override_settings_restore_afterwards=None)
    assert r.status_code == 200, r.json
    assert 0 <= json.loads(r.json["info"])["seed"] <= 4294967293


def test_values_a1111_accepts_for_unused_fields(client):
    assert post(client, hr_scale=0, enable_hr=False).status_code == 200
    assert post(client, eta=1.5).status_code == 200
    r = post(client, seed=-5)
    assert r.status_code == 200 and json.loads(r.json["info"])["seed"] == -5


@pytest.mark.parametrize("sampler, eta, expect", [
    ("DDIM", 1.0, "Eta DDIM: 1.0,"), ("DDIM", 0.0, None), ("UniPC", 1.0, None), ("DPM++ 2M", 0.0, None),
])
def test_eta_is_written_only_where_applied(client, sampler, eta, expect):
    text = json.loads(post(client, sampler_name=sampler, eta=eta).json["info"])["infotexts"][0]
    if expect:
        assert expect in text
    else:
        assert "Eta" not in text


def test_ddim_eta_changes_the_image(client):
    a = post(client, sampler_name="DDIM", eta=0.0, seed=3).json["images"][0]
    b = post(client, sampler_name="DDIM", eta=1.0, seed=3).json["images"][0]
    assert a != b


@pytest.mark.parametrize("scripts, field", [
    ({"sd_vae": {"args": 5}}, "alwayson_scripts.sd_vae"),
    ({"sd_vae": {"args": {"a": 1}}}, "alwayson_scripts.sd_vae"),
    ({"sd_vae": {"args": "name"}}, "alwayson_scripts.sd_vae"),
    ({"sd_model_checkpoint": 7}, "alwayson_scripts.sd_model_checkpoint"),
    ({"save_dir": "../../etc"}, "alwayson_scripts.save_dir"),
    ({"image_link": "http://169.254.169.254/"}, "alwayson_scripts.image_link"),
])
def test_eas_keys_of_the_wrong_shape_are_422(client, scripts, field):
    r = post(client, alwayson_scripts=scripts)
    assert r.status_code == 422, r.json
    assert r.json["error"]["field"] == field


@pytest.mark.parametrize("text", ["x\nSteps: 1e400, Sampler: Euler, CFG scale: 7",
                                  "x\nSteps: 2, Sampler: Euler, Seed: inf", "x\nSteps: 0, Sampler: Euler, Seed: 1"])
def test_unusable_infotext_is_422(client, text):
    r = client.post("/sdapi/v1/txt2img", json={"infotext": text})
    assert r.status_code == 422 and r.json["error"]["field"] == "infotext"


def test_out_of_memory_is_503_with_retry_after(client, monkeypatch):
    import torch

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("pipelines.generate.generate", oom)
    r = post(client)
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json["error"]["code"] == "out_of_memory" and "GiB" not in r.json["error"]["message"]


def test_checkpoint_removed_from_the_mount_is_404(client, data_dir):
    import shutil

    folder = data_dir / "models" / "Stable-diffusion"
    extra = folder / "gone.safetensors"
    shutil.copy(folder / "demo-sd15.safetensors", extra)
    client.post("/sdapi/v1/refresh-checkpoints")
    extra.unlink()
    try:
        r = post(client, override_settings={"sd_model_checkpoint": "gone"})
        assert r.status_code == 404, r.json
    finally:
        client.post("/sdapi/v1/refresh-checkpoints")


def test_progress_counts_batches(client, service, monkeypatch):
    seen = []
    original = service.progress.step

    def spy(step, total, job_no):
        seen.append((job_no, service.progress.snapshot()["state"]["job_count"]))
        return original(step, total, job_no)

    monkeypatch.setattr(service.progress, "step", spy)
    post(client, n_iter=3, steps=2)
    assert {s[0] for s in seen} == {0, 1, 2} and {s[1] for s in seen} == {3}


def test_save_images_writes_png_under_outputs(client, data_dir):
    body = post(client, seed=31, save_images=True).json
    files = sorted((data_dir / "outputs" / "txt2img-images").rglob("*-31.png"))
    assert files, "no file written"
    assert files[-1].read_bytes() == __import__("base64").b64decode(body["images"][0])


def test_clip_skip_deeper_than_the_text_encoder_is_422(client):
    r = post(client, override_settings={"CLIP_stop_at_last_layers": 12})
    assert r.status_code == 422, r.json
    assert r.json["error"]["field"] == "override_settings.CLIP_stop_at_last_layers" and "layers" in r.json["error"]["message"]
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 12}).status_code == 200
    r = post(client)  # the caller's option applies to every checkpoint: as deep as this one goes
    assert r.status_code == 200 and "Clip skip: " in decode_png(r.json["images"][0]).info["parameters"]


@pytest.mark.parametrize("raw", ['{"steps": 2, "hr_scale": NaN}', '{"steps": 2, "eta": 1e999}',
                                 '{"steps": 2, "cfg_scale": Infinity}'])
def test_non_finite_numbers_are_422(client, raw):
    r = client.post("/sdapi/v1/txt2img", data=raw, content_type="application/json")
    assert r.status_code == 422, r.get_data(as_text=True)


def test_deeply_nested_json_is_422(client):
    r = client.post("/sdapi/v1/txt2img", data="[" * 100000 + "]" * 100000, content_type="application/json")
    assert r.status_code == 422 and r.json["error"]["field"] == "body"


def test_old_hires_infotext_with_huge_size_is_not_a_500(client):
    text = "x\nFirst pass size: 0x0, Size: " + "9" * 400 + "x" + "9" * 400 + ", Steps: 1"
    r = client.post("/sdapi/v1/txt2img", json={"infotext": text, "width": 64, "height": 64, "steps": 1})
    assert r.status_code in (200, 422), r.get_data(as_text=True)


def test_method_not_allowed_says_what_is(client):
    r = client.get("/sdapi/v1/txt2img")
    assert r.status_code == 405 and "POST" in r.headers["Allow"]
