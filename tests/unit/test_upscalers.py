"""Upscaler networks loaded from files by their state dict (pipelines/upscalers): tiny random-weight ESRGAN (new
and old key formats), Real-ESRGAN x2 (pixel-unshuffle) and SRVGG compact models written as `.safetensors` and
`.pth`, loaded through the real loading code, upscaling to the right size, tiled as untiled; a pickle with code
is never run, a corrupt file is a clear error."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.errors import InvalidParameter
from pipelines.upscalers.arch import RRDBNet, SRVGGNetCompact
from pipelines.upscalers.load import load_upscaler
from pipelines.upscalers.tiling import upscale


def _random(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def _old_keys(sd: dict[str, torch.Tensor], ups: int, blocks: int) -> dict[str, torch.Tensor]:
    """BasicSR's keys back to ESRGAN's original ones (the layout of the first ESRGAN releases)."""
    index = {"conv_first": 0, "conv_body": None, "conv_hr": 3 * ups + 2, "conv_last": 3 * ups + 4}
    index.update({f"conv_up{n}": 3 * n for n in range(1, ups + 1)})
    out = {}
    for key, value in sd.items():
        if m := re.match(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)$", key):
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{m[4]}"] = value
        else:
            name, kind = key.rsplit(".", 1)
            out[f"model.1.sub.{blocks}.{kind}" if name == "conv_body" else f"model.{index[name]}.{kind}"] = value
    return out


def _image(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize(("net", "arch", "scale"), [
    (RRDBNet(num_feat=8, num_grow_ch=4, num_block=1), "ESRGAN", 4),
    (RRDBNet(num_feat=8, num_grow_ch=4, num_block=1, unshuffle=2), "RealESRGAN", 2),
    (SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4), "SRVGG", 4),
    (SRVGGNetCompact(num_feat=8, num_conv=1, upscale=2, prelu=False), "SRVGG", 2),
], ids=["esrgan-x4", "realesrgan-x2", "srvgg-x4", "srvgg-x2-lrelu"])
def test_each_architecture_loads_from_its_file_and_upscales_to_size(tmp_path, net, arch, scale):
    path = tmp_path / "model.safetensors"
    save_file(_random(net), str(path))
    model = load_upscaler(path)
    assert (model.arch, model.scale) == (arch, scale)
    out = upscale(model, _image(21, 13), tile=0)  # odd sizes: pixel-unshuffle pads and crops
    assert out.size == (21 * scale, 13 * scale)
    # the loaded weights are the saved ones: the same output as the network they were saved from
    image = _image(24, 16)
    with torch.inference_mode():
        reference = net.eval()(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None])
    reference = (reference[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    assert np.abs(np.asarray(upscale(model, image, tile=0), dtype=np.int16) - reference).max() <= 1


def test_old_esrgan_keys_give_the_same_network(tmp_path):
    net = RRDBNet(num_feat=8, num_grow_ch=4, num_block=2, upsamples=1)  # an old 2x ESRGAN: one upsampling conv
    sd = _random(net, seed=1)
    save_file(sd, str(tmp_path / "new.safetensors"))
    torch.save(_old_keys(sd, ups=1, blocks=2), tmp_path / "old.pth")
    new, old = load_upscaler(tmp_path / "new.safetensors"), load_upscaler(tmp_path / "old.pth")
    assert (old.arch, old.scale) == ("ESRGAN", 2)
    image = _image(16, 12)
    assert np.array_equal(np.asarray(upscale(new, image, tile=0)), np.asarray(upscale(old, image, tile=0)))


@pytest.mark.parametrize("net", [RRDBNet(num_feat=8, num_grow_ch=4, num_block=1),
                                 RRDBNet(num_feat=8, num_grow_ch=4, num_block=1, unshuffle=2),
                                 SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4)])
def test_tiled_and_untiled_agree(tmp_path, net):
    """With an overlap that covers the network's reach (about 18 input pixels here) the tiles meet exactly; with
    A1111's default overlap of 8 only pixels near the seams differ."""
    save_file(_random(net, seed=2), str(tmp_path / "m.safetensors"))
    model = load_upscaler(tmp_path / "m.safetensors")
    image = _image(52, 44)
    whole = np.asarray(upscale(model, image, tile=0), dtype=np.int16)
    exact = np.asarray(upscale(model, image, tile=16, overlap=24), dtype=np.int16)
    assert np.abs(whole - exact).max() <= 1  # float sums in another order, then rounding
    seams = np.asarray(upscale(model, image, tile=16, overlap=8), dtype=np.int16)
    assert np.abs(whole - seams).mean() < 8


def test_a_pickle_with_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"conv_first.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(InvalidParameter) as refused:
        load_upscaler(tmp_path / "evil.pth")
    assert refused.value.field == "evil.pth" and not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a model", b"\x00" * 64])
def test_a_corrupt_or_foreign_file_is_a_clear_error(tmp_path, content):
    for name in ("bad.safetensors", "bad.pth"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InvalidParameter, match=name):
            load_upscaler(tmp_path / name)
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))  # a state dict, but no upscaler
    with pytest.raises(InvalidParameter, match="not an ESRGAN"):
        load_upscaler(tmp_path / "other.safetensors")
