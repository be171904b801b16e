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
    ({"hr_upscaler": "R-ESRGAN 4x+"}, 404, "hr_upscaler"),  # no such file on the mount
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
    # the refiner finishing a hires pass on an SD 1.5 hires checkpoint: other latents
    ({"refiner_checkpoint": "refiner-xl", "refiner_switch_at": 0.5, "enable_hr": True, "hr_checkpoint_name": "other-sd15",
      **XL}, 422, "refiner_checkpoint"),
])
def test_refiner_refusals_name_the_field(client, fields, status, field):
    r, _ = post(client, **fields)
    assert r.status_code == status, r.json
    assert r.json["error"]["field"] == field


# Hires fix with the refiner: the hires pass of 2 steps at strength 0.5 runs the last 2 of a 4-step schedule, whose
# timesteps on Euler (the samplers' "linspace" spacing) are 999, 666, 333, 0; the first pass's 2 steps are 999, 0.
# A switch at 0.8 cuts at timestep 200 (the hires pass: 333 on the base, 0 on the refiner), at 0.5 at 500 (the hires
# pass starts below it: all on the refiner), at 0.9999 at 0 (the pass never reaches it).
HR = {"enable_hr": True, "hr_upscaler": "Latent", "hr_second_pass_steps": 2, "denoising_strength": 0.5}


def xl(**overrides):
    """override_settings on the SDXL demo, with these options."""
    return {"override_settings": {"sd_model_checkpoint": "demo-sdxl", **overrides}}


def pixels(r, i=0):
    import numpy as np

    return np.asarray(decode_png(r.json["images"][i]).convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("strength,switch_at,expected", [
    (0.5, 0.8, (1, 1)), (0.5, 0.5, (0, 2)), (0.5, 0.9999, (2, 0)), (None, 0.5, (1, 1)), (None, 0.9999, (2, 0)),
    (0.75, 0.5, (1, 2))])
def test_switch_split_follows_the_pass_schedule(strength, switch_at, expected):
    """(base calls, refiner calls) as diffusers' denoising_end / denoising_start cut the pass: the hires pass runs
    the tail of its schedule, and the refiner's share is the schedule's timesteps below the cut."""
    import json as _json

    from pipelines.generate import _switch_split
    from pipelines.loading import CONFIG_ROOT
    from pipelines.samplers import build_scheduler, resolve_sampler

    config = _json.loads((CONFIG_ROOT / "demo-sdxl" / "scheduler" / "scheduler_config.json").read_text())
    scheduler = build_scheduler(resolve_sampler("Euler", None, None), config)
    steps = 4 if strength is not None else 2
    assert _switch_split(scheduler, steps, strength, switch_at) == expected


def test_stage_models_ask_for_the_base_again_with_its_vae_after_another():
    """A refiner may evict the base from the warm cache: a phase on the base after it gets the base (and its VAE)
    from the loader again, not the object it started with; load seconds add up."""
    from types import SimpleNamespace

    from pipelines.generate import _StageModels

    base = SimpleNamespace(entry=SimpleNamespace(path="base.safetensors"), vae="the-vae")
    other = SimpleNamespace(path="refiner.safetensors")
    job = SimpleNamespace(embeddings=["ti"])
    calls = []

    def load(entry, vae):
        calls.append((entry.path, vae))
        return SimpleNamespace(entry=entry), 0.5, []

    models = _StageModels(base, job, load)
    assert models.get(None) == (base, ["ti"]) and models.get(base.entry) == (base, ["ti"]) and calls == []
    assert models.get(other)[0].entry is other
    assert models.get(None)[0].entry is base.entry
    assert calls == [("refiner.safetensors", None), ("base.safetensors", "the-vae")]
    assert models.load_seconds == 1.0


def test_hires_with_refiner_continues_the_hires_pass_on_the_refiner(client, app):
    service = app.extensions["sdfunc"]
    plain, _ = post(client, **HR, **XL)
    # The refiner file holds the base's weights: the base stopping at the cut and the refiner finishing the same
    # schedule from its latents must give exactly the hires pass without a refiner (a restart or a second noising
    # would not); so must the pass that starts below the cut and runs all on the refiner with the pass's strength.
    for switch_at in (0.8, 0.5):
        r, info = post(client, **HR, refiner_checkpoint="refiner-xl", refiner_switch_at=switch_at, **XL)
        assert r.status_code == 200, r.json
        assert decode_png(r.json["images"][0]).size == (128, 128)
        assert (pixels(r) == pixels(plain)).all(), switch_at
        sha = service.store.sha256(service.store.find_checkpoint("refiner-xl"))
        line = params_line(info)
        assert line.index("Hires upscaler: Latent") < line.index(
            f"Refiner: refiner-xl [{sha[:10]}], Refiner switch at: {switch_at}, Version")
        assert "Hires refiner" not in line  # the default "second pass" is not written
    # other weights: the refiner actually ran in the hires pass, and it alone ran the pass below the cut
    cut, _ = post(client, **HR, refiner_checkpoint="demo-sdxl-refiner", refiner_switch_at=0.8, **XL)
    below, info = post(client, **HR, refiner_checkpoint="demo-sdxl-refiner", refiner_switch_at=0.5, **XL)
    assert cut.status_code == below.status_code == 200, (cut.json, below.json)
    assert service.cache.peek(service.store.find_checkpoint("demo-sdxl-refiner")) is not None
    assert abs(pixels(cut) - pixels(plain)).mean() > 1.0 and abs(pixels(below) - pixels(plain)).mean() > 1.0
    assert (pixels(cut) != pixels(below)).any()
    assert "Refiner: demo-sdxl-refiner [" in params_line(info)
    # an image upscaler, and a batch, both ways
    for switch_at in (0.8, 0.5):
        r, info = post(client, **{**HR, "hr_upscaler": "Lanczos"}, batch_size=2, refiner_checkpoint="demo-sdxl-refiner",
                       refiner_switch_at=switch_at, **XL)
        assert r.status_code == 200, r.json
        assert [decode_png(b).size for b in r.json["images"]] == [(128, 128)] * 2 and info["all_seeds"] == [7, 8]


def test_hires_pass_that_ends_above_the_switch_never_loads_the_refiner(client, app):
    cache = app.extensions["sdfunc"].cache
    plain, _ = post(client, **HR, **XL)
    stats = cache.stats
    gets = stats.hits + stats.host_hits + stats.misses
    r, info = post(client, **HR, refiner_checkpoint="demo-sdxl-refiner", refiner_switch_at=0.9999, **XL)
    assert r.status_code == 200, r.json
    assert (pixels(r) == pixels(plain)).all()
    assert stats.hits + stats.host_hits + stats.misses == gets + 1  # the base, nothing else
    assert "Refiner" not in params_line(info)  # A1111 names the refiner only when it switches to it


def test_hires_refiner_pass_option_first_and_both_passes(client, app):
    service = app.extensions["sdfunc"]
    refiner = {"refiner_checkpoint": "demo-sdxl-refiner", "refiner_switch_at": 0.5}
    nearest = {"enable_hr": True, "hr_upscaler": "Nearest", "denoising_strength": 0}
    refined_alone, _ = post(client, **refiner, **XL)
    plain, _ = post(client, **XL)
    # strength 0: the hires pass returns the upscaled first pass, which the refiner finished ("first pass",
    # "both passes") or not ("second pass": the refiner has no step to run and is not named)
    for option, first in (("first pass", refined_alone), ("both passes", refined_alone), ("second pass", plain)):
        r, info = post(client, **nearest, **refiner, **xl(hires_fix_refiner_pass=option))
        assert r.status_code == 200, r.json
        image = decode_png(r.json["images"][0])
        assert image.size == (128, 128)
        assert image.resize((64, 64), 0).tobytes() == decode_png(first.json["images"][0]).tobytes(), option
        line = params_line(info)
        if option == "second pass":
            assert "Refiner" not in line
        else:
            sha = service.store.sha256(service.store.find_checkpoint("demo-sdxl-refiner"))
            assert f"Hires refiner: {option}, Refiner: demo-sdxl-refiner [{sha[:10]}], Refiner switch at: 0.5" in line
    # a real hires pass: each option gives its own image
    images = {}
    for option in ("first pass", "second pass", "both passes"):
        r, info = post(client, **HR, **refiner, **xl(hires_fix_refiner_pass=option))
        assert r.status_code == 200, r.json
        images[option] = pixels(r).tobytes()
        assert ("Hires refiner" in params_line(info)) == (option != "second pass")
    assert len(set(images.values())) == 3


def test_hires_refiner_pass_option_through_options(client, app):
    from handler.contract.options import MemoryOptionsStore

    service = app.extensions["sdfunc"]
    assert client.get("/sdapi/v1/options").json["hires_fix_refiner_pass"] == "second pass"
    try:
        r = client.post("/sdapi/v1/options", json={"hires_fix_refiner_pass": "both passes"})
        assert r.status_code == 200, r.json
        assert client.get("/sdapi/v1/options").json["hires_fix_refiner_pass"] == "both passes"
        r, info = post(client, **HR, refiner_checkpoint="demo-sdxl-refiner", refiner_switch_at=0.5, **XL)
        assert r.status_code == 200 and "Hires refiner: both passes" in params_line(info)
        r, info = post(client, **HR, refiner_checkpoint="demo-sdxl-refiner", refiner_switch_at=0.5,
                       **xl(hires_fix_refiner_pass="second pass"))  # the request's override wins
        assert r.status_code == 200 and "Hires refiner" not in params_line(info)
        for value in ("third pass", "Second pass", 2):
            r = client.post("/sdapi/v1/options", json={"hires_fix_refiner_pass": value})
            assert r.status_code == 422 and r.json["error"]["field"] == "hires_fix_refiner_pass", value
            r, _ = post(client, **HR, refiner_checkpoint="demo-sdxl-refiner", refiner_switch_at=0.5,
                        **xl(hires_fix_refiner_pass=value))
            assert r.status_code == 422, r.json
            assert r.json["error"]["field"] == "override_settings.hires_fix_refiner_pass"
        assert client.get("/sdapi/v1/options").json["hires_fix_refiner_pass"] == "both passes"
    finally:
        service.options_store = MemoryOptionsStore()


def test_hires_refiner_with_a_hires_checkpoint_and_progress(client, app, monkeypatch):
    """The hires pass's base part runs on hr_checkpoint_name (as A1111 reloads it before the pass); progress counts
    the refiner's steps on from the base's, in the same job."""
    service = app.extensions["sdfunc"]
    steps: list[tuple[int, int, int]] = []
    step = service.progress.step
    monkeypatch.setattr(service.progress, "step", lambda *a: steps.append(a) or step(*a))
    r, info = post(client, **HR, hr_checkpoint_name="refiner-xl", refiner_checkpoint="demo-sdxl-refiner",
                   refiner_switch_at=0.8, **XL)
    assert r.status_code == 200, r.json
    assert "Hires checkpoint: refiner-xl [" in params_line(info) and "Refiner: demo-sdxl-refiner [" in params_line(info)
    assert steps == [(1, 2, 0), (2, 2, 0), (1, 2, 1), (2, 2, 1)]  # first pass, then the hires pass: base, refiner
    steps.clear()
    r, _ = post(client, **HR, refiner_checkpoint="demo-sdxl-refiner", refiner_switch_at=0.5,
                **xl(hires_fix_refiner_pass="both passes"))
    assert r.status_code == 200, r.json
    assert steps == [(1, 2, 0), (2, 2, 0), (1, 2, 1), (2, 2, 1)]  # the refiner finishes each pass in its job
    # the refiner as the hires checkpoint: A1111 finds it loaded and never switches
    plain, _ = post(client, **HR, hr_checkpoint_name="demo-sdxl-refiner", **XL)
    r, info = post(client, **HR, hr_checkpoint_name="demo-sdxl-refiner", refiner_checkpoint="demo-sdxl-refiner",
                   refiner_switch_at=0.8, **XL)
    assert r.status_code == 200 and (pixels(r) == pixels(plain)).all()
    assert "Refiner:" not in params_line(info)


@pytest.mark.parametrize("stop_at,option,size,named", [
    ((1, 2, 1), "second pass", (128, 128), False),  # in the hires pass, before the switch: the base's latents
    ((2, 2, 0), "both passes", (64, 64), True),  # the refiner finishing the first pass: its latents
])
def test_hires_refiner_interrupted(client, app, monkeypatch, stop_at, option, size, named):
    """Stopped part-way, the job returns what it has, decoded (A1111 returns the interrupted pass's samples), and
    names the refiner only if it ran."""
    service = app.extensions["sdfunc"]
    step = service.progress.step
    monkeypatch.setattr(service.progress, "step", lambda *a: step(*a) and a != stop_at)
    r, info = post(client, **HR, refiner_checkpoint="demo-sdxl-refiner", refiner_switch_at=0.8,
                   **xl(hires_fix_refiner_pass=option))
    assert r.status_code == 200, r.json
    assert decode_png(r.json["images"][0]).size == size
    assert ("Refiner: demo-sdxl-refiner" in params_line(info)) == named


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


@pytest.mark.parametrize("prompt", ["a [red|blue|green] house", "a [red|blue] house AND a boat :0.5"])
def test_a_prompt_schedule_goes_on_counting_on_the_refiner(client, prompt):
    """A1111 switches to the refiner inside one sampling: the refiner takes the schedule from the model call the
    base stopped at. With the base's own weights as the refiner, the result is exactly the image without one
    (a count restarted at 0 would take other texts), in the first pass and in the hires pass."""
    for extra in ({"steps": 4}, {**HR}):
        plain, _ = post(client, prompt=prompt, **extra, **XL)
        r, _ = post(client, prompt=prompt, refiner_checkpoint="refiner-xl", refiner_switch_at=0.5, **extra, **XL)
        assert r.status_code == plain.status_code == 200, r.json
        assert (pixels(r) == pixels(plain)).all(), extra
