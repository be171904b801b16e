"""Settings sources and the request schemas' coercion rules."""

import pytest
from pydantic import ValidationError

from handler.contract.schemas import Img2ImgRequest, Txt2ImgRequest
from handler.settings import Settings


def test_settings_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.port == 9000 and s.host == "0.0.0.0"
    assert s.data_dir == (tmp_path / "data").resolve()
    assert s.resolved_device() == "cpu"  # no GPU on CI machines
    assert s.resolved_dtype("cpu") == "float32" and s.resolved_dtype("cuda") == "float16"


def test_settings_env_beats_yaml(tmp_path, monkeypatch):
    conf = tmp_path / "conf.yaml"
    conf.write_text("port: 9100\nmax_steps: 40\ndata_dir: /tmp/sdfunc-yaml\n")
    monkeypatch.setenv("SDFUNC_CONFIG", str(conf))
    monkeypatch.setenv("SDFUNC_PORT", "9200")
    s = Settings()
    assert s.port == 9200 and s.max_steps == 40
    assert str(s.data_dir) == "/tmp/sdfunc-yaml"


def test_settings_refuse_bad_values(monkeypatch):
    monkeypatch.setenv("SDFUNC_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        Settings()


def test_layout_is_created(tmp_path):
    s = Settings(data_dir=tmp_path)
    s.ensure_layout()
    for sub in ("models/Stable-diffusion", "models/Lora", "models/VAE", "models/ControlNet", "embeddings", "outputs"):
        assert (tmp_path / sub).is_dir()


def test_a1111_api_defaults():
    t = Txt2ImgRequest()
    assert (t.steps, t.cfg_scale, t.width, t.height, t.seed, t.sampler_index) == (50, 7.0, 512, 512, -1, "Euler")
    assert t.denoising_strength is None and t.send_images and not t.save_images and t.alwayson_scripts == {}
    i = Img2ImgRequest()
    assert i.denoising_strength == 0.75 and i.mask_blur_x == 4 and i.inpaint_full_res and i.resize_mode == 0


@pytest.mark.parametrize("value, ok", [(20, True), (20.0, True), (20.5, False), ("20", False), (True, False)])
def test_numbers_must_be_numbers(value, ok):
    if ok:
        assert Txt2ImgRequest(steps=value).steps == 20
    else:
        with pytest.raises(ValidationError):
            Txt2ImgRequest(steps=value)


def test_inpainting_mask_invert_takes_bools_as_clients_send():
    assert Img2ImgRequest(inpainting_mask_invert=True).inpainting_mask_invert == 1
    assert Img2ImgRequest(inpainting_mask_invert=0).inpainting_mask_invert == 0


def test_unknown_keys_ignored_and_nulls_tolerated():
    t = Txt2ImgRequest.model_validate({"foo": 1, "alwayson_scripts": None, "script_args": None})
    assert t.alwayson_scripts == {} and t.script_args == []


def test_auth_lists_from_the_environment(monkeypatch):
    """A1111's `--api-auth` form in an environment variable, or a JSON list, for users, tokens and admins."""
    from handler.settings import Settings

    monkeypatch.setenv("SDFUNC_AUTH__MODE", "basic")
    monkeypatch.setenv("SDFUNC_AUTH__USERS", "alice:wonder:land, bob:pw")
    monkeypatch.setenv("SDFUNC_AUTH__TOKENS", '["t-1", "t,2"]')
    monkeypatch.setenv("SDFUNC_AUTH__ADMINS", "bob")
    monkeypatch.setenv("SDFUNC_BILLING__PRICES", '{"H100": "0.0125", "cpu": 0}')
    s = Settings()
    assert s.auth.users == ["alice:wonder:land", "bob:pw"] and s.auth.tokens == ["t-1", "t,2"]
    assert s.auth.admins == ["bob"] and str(s.billing.prices["H100"]) == "0.0125"
    monkeypatch.setenv("SDFUNC_AUTH__USERS", "no-password")
    with pytest.raises(ValueError):
        Settings()
