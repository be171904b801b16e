"""The upscaler folders (pipelines.upscalers.store: A1111's names, refused files with their reasons, rescans that
read only changed files), upscalers as cached components of the pipeline cache (one LRU and byte budget, host tier
too), and A1111's extras arithmetic (pipelines.postprocess)."""

import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.cache import PipelineCache
from pipelines.errors import InvalidParameter, ModelNotFound
from pipelines.postprocess import ExtrasPlan, run_extras, upscale_by
from pipelines.upscalers import store as store_module
from pipelines.upscalers.arch import RRDBNet, SRVGGNetCompact
from pipelines.upscalers.store import UpscalerStore


def _save(path, net, pth=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    if pth:
        torch.save({"params_ema": sd}, path)
    else:
        save_file(sd, str(path))


@pytest.fixture
def models(tmp_path):
    _save(tmp_path / "RealESRGAN" / "RealESRGAN_x4plus.pth", RRDBNet(num_feat=8, num_grow_ch=4, num_block=1), True)
    _save(tmp_path / "ESRGAN" / "RealESRGAN_x4plus.safetensors", RRDBNet(num_feat=8, num_grow_ch=4, num_block=1))
    _save(tmp_path / "ESRGAN" / "sub" / "4x-UltraSharp.safetensors", RRDBNet(num_feat=8, num_grow_ch=4, num_block=1))
    _save(tmp_path / "ESRGAN" / "2x-compact.pth", SRVGGNetCompact(num_feat=8, num_conv=1, upscale=2), True)
    _save(tmp_path / "HAT" / "HAT_SRx4.safetensors", torch.nn.Linear(2, 2))  # an architecture not built here
    (tmp_path / "ESRGAN" / ".part.safetensors").write_bytes(b"half a download")
    (tmp_path / "DAT" / "notes.txt").parent.mkdir()
    (tmp_path / "DAT" / "notes.txt").write_text("not a model")
    return tmp_path


def test_names_scales_and_refusals(models):
    store = UpscalerStore(models)
    names = {e.name: (e.folder, e.arch, e.scale) for e in store.entries}
    # the published file in RealESRGAN/ is `R-ESRGAN 4x+`; the same stem elsewhere is listed under its stem
    assert names == {"2x-compact": ("ESRGAN", "SRVGG", 2), "4x-UltraSharp": ("ESRGAN", "ESRGAN", 4),
                     "R-ESRGAN 4x+": ("RealESRGAN", "ESRGAN", 4), "RealESRGAN_x4plus": ("ESRGAN", "ESRGAN", 4)}
    assert [e.name for e in store.entries] == sorted(names, key=str.lower)  # A1111's order
    assert store.find("R-ESRGAN 4x+", field="f").path.parent.name == "RealESRGAN"
    assert store.find("4x-UltraSharp", field="f").path.name == "4x-UltraSharp.safetensors"
    with pytest.raises(ModelNotFound) as err:
        store.find("4x_NMKD-Siax_200k", field="hr_upscaler")
    assert err.value.field == "hr_upscaler" and "4x_NMKD-Siax_200k" in str(err.value)
    with pytest.raises(InvalidParameter) as err:
        store.find("HAT_SRx4", field="upscaler_1")
    assert err.value.field == "upscaler_1" and "not an ESRGAN, Real-ESRGAN, SRVGG or SwinIR" in str(err.value)


def test_a_rescan_reads_only_changed_files(models, monkeypatch):
    store = UpscalerStore(models)
    read = []
    real = store_module.describe
    monkeypatch.setattr(store_module, "describe", lambda path: read.append(path.name) or real(path))
    store.refresh()
    assert read == []
    path = models / "ESRGAN" / "2x-compact.pth"
    _save(path, SRVGGNetCompact(num_feat=8, num_conv=1, upscale=4), True)
    os.utime(path, ns=(1, 1))
    store.refresh()
    assert read == ["2x-compact.pth"] and store.find("2x-compact", field="f").scale == 4


class _Held:
    """A cached component: one module of `n` float32 values."""

    def __init__(self, n: int) -> None:
        self.components = {"net": torch.nn.Linear(n, 1, bias=False)}


def test_upscalers_share_the_pipeline_cache_budget_and_tiers(tmp_path):
    moves = []
    cache = PipelineCache(None, device="cpu", dtype="float32", device_bytes=1000, host_bytes=1000, host_tier=True,
                          mover=lambda module, device: moves.append(device))
    a = cache.component(tmp_path / "a", lambda: _Held(150), name="upscaler a")  # 600 bytes
    assert cache.component(tmp_path / "a", lambda: pytest.fail("loaded twice"), name="upscaler a") is a
    assert (cache.stats.loads, cache.stats.hits) == (1, 1)
    cache.component(tmp_path / "b", lambda: _Held(150), name="upscaler b")  # a leaves the device: 1200 > 1000
    assert cache.stats.evictions == 1 and moves == ["cpu"] and cache.report()["device_components"] == 1
    assert cache.component(tmp_path / "a", lambda: pytest.fail("reloaded"), name="upscaler a") is a  # from host RAM
    assert cache.stats.host_hits == 1 and cache.loaded() == [] and len(cache.components()) == 2


def test_upscale_by_follows_a1111():
    calls = []

    def step(image):  # a 4x model
        calls.append(image.size)
        return image.resize((image.width * 4, image.height * 4))

    out = upscale_by(Image.new("RGB", (50, 30)), 2, step)
    assert calls == [(50, 30)] and out.size == (96, 56)  # one pass, then Lanczos to (50*2)//8*8 x (30*2)//8*8
    calls.clear()
    out = upscale_by(Image.new("RGB", (50, 30)), 8, lambda im: step(im) if len(calls) < 5 else im)
    assert calls == [(50, 30), (200, 120)] and out.size == (400, 240)  # passes until it covers the target


def test_extras_chain_order_and_infotext():
    seen = []
    plan = ExtrasPlan(resize_mode=0, upscaling_resize=2, width=512, height=512, crop=True, upscaler_1="A",
                      upscaler_2="B", upscaler_2_visibility=0.25, gfpgan_visibility=0.5, codeformer_visibility=0.0,
                      codeformer_weight=0.0)
    out, info = run_extras(
        Image.new("RGB", (16, 16), (100, 100, 100)), plan,
        upscale=lambda im, name, scale: seen.append(name) or im.resize((32, 32)),
        restore=lambda im, name, weight: seen.append(name) or Image.new("RGB", im.size, (200, 200, 200)))
    assert seen == ["A", "B", "GFPGAN"] and out.size == (32, 32) and out.getpixel((0, 0)) == (150, 150, 150)
    assert list(info.items()) == [("Postprocess upscale by", 2), ("Postprocess upscaler", "A"),
                                  ("Postprocess upscaler 2", "B"), ("GFPGAN visibility", 0.5)]


def test_an_upscaler_loaded_during_a_job_never_evicts_its_pipeline(tmp_path):
    from pipelines.cache import COMPONENT

    cache = PipelineCache(None, device="cpu", dtype="float32", device_bytes=1000)
    held = _Held(200)  # stands for the pipeline the job runs on: 800 bytes, most recently used
    cache._items[(str(tmp_path / "ckpt"), None, "float32")] = cache_model = _as_loaded(tmp_path / "ckpt", held)
    cache._tier[(str(tmp_path / "ckpt"), None, "float32")] = "device"
    cache.component(tmp_path / "up", lambda: _Held(100), name="upscaler up")  # 400 more: over the budget
    assert cache.stats.evictions == 0 and cache.loaded() == [cache_model]
    assert cache.report()["device_components"] == 1 and (str(tmp_path / "up"), COMPONENT, "float32") in cache._items


def _as_loaded(path, held):
    from pipelines.cache import LoadedModel, module_bytes
    from pipelines.store import CheckpointEntry

    return LoadedModel(entry=CheckpointEntry(path.name, path, False), sha256=None, arch="sd1", pipe=held,
                       component_bytes=module_bytes(held.components))


def test_a_model_that_is_not_rgb_is_refused_and_hides_nothing(models):
    _save(models / "ESRGAN" / "gray.safetensors", RRDBNet(in_ch=1, out_ch=1, num_feat=8, num_grow_ch=4, num_block=1))
    store = UpscalerStore(models)
    assert "4x-UltraSharp" in [e.name for e in store.entries]
    with pytest.raises(InvalidParameter, match="RGB"):
        store.find("gray", field="upscaler_1")


def test_tiling_stops_between_tiles_when_told(models):
    from pipelines.upscalers.load import load_upscaler
    from pipelines.upscalers.tiling import Interrupted, upscale

    model = load_upscaler(models / "ESRGAN" / "2x-compact.pth")
    asked = []
    with pytest.raises(Interrupted):
        upscale(model, Image.new("RGB", (64, 64)), tile=16, keep_going=lambda: asked.append(1) or len(asked) < 3)
    assert len(asked) == 3  # two tiles ran, the third was not started
