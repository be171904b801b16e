"""SwinIR loaded from files by its state dict (pipelines/upscalers/swinir): tiny random-weight networks for each
upsampler and residual conv, written as `.safetensors` or as a released `.pth` (`{"params_ema": ...}`), loaded
through the real loading code with every hyper-parameter read back from the keys and shapes, upscaling inputs that
are no window multiple to the right size, and giving the same output as the network they were saved from."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipelines.upscalers.arch import RRDBNet
from pipelines.upscalers.load import load_upscaler
from pipelines.upscalers.swinir import SwinIR, is_swinir, shift_mask, swinir_params

TINY = dict(embed_dim=12, depths=[2], num_heads=[2], window_size=4, img_size=8, mlp_ratio=2.0, num_feat=8)


def _random(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (the buffers stay as built: position indices and shift masks)."""
    torch.manual_seed(seed)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def _run(net: torch.nn.Module, h: int, w: int) -> torch.Tensor:
    torch.manual_seed(7)
    with torch.inference_mode():
        return net.eval()(torch.rand(1, 3, h, w))


@pytest.mark.parametrize(("kwargs", "scale"), [
    (dict(upsampler="pixelshuffle", upscale=2), 2),
    (dict(upsampler="pixelshuffle", upscale=4, depths=[2, 1], num_heads=[2, 3], img_size=16), 4),
    (dict(upsampler="pixelshuffledirect", upscale=2, embed_dim=16, mlp_ratio=1.5), 2),
    (dict(upsampler="nearest+conv", upscale=4, embed_dim=16, resi_connection="3conv"), 4),
    (dict(upsampler="pixelshuffle", upscale=2, resi_connection="3conv", num_heads=[4], embed_dim=16), 2),
    (dict(upsampler="", upscale=1), 1),
], ids=["pixelshuffle-x2", "pixelshuffle-x4", "direct-x2", "nearest+conv-x4", "3conv-x2", "restore-x1"])
def test_each_variant_loads_from_its_file_and_upscales_to_size(tmp_path, kwargs, scale):
    config = {**TINY, **kwargs}
    net = SwinIR(**config)
    sd = _random(net)
    assert is_swinir(sd)
    path = tmp_path / "swinir.safetensors"
    save_file(sd, str(path))
    model = load_upscaler(path)
    assert (model.arch, model.scale, model.multiple) == ("SwinIR", scale, 1)
    read = swinir_params(sd)
    if config["upsampler"] in ("pixelshuffledirect", ""):  # no conv_before_upsample: num_feat is used nowhere
        del config["num_feat"]
    assert {k: read[k] for k in config} == config
    out = _run(model.net, 13, 21)  # odd sizes: padded to the window by reflection, cropped back
    assert out.shape == (1, 3, 13 * scale, 21 * scale)
    torch.testing.assert_close(out, _run(net, 13, 21), rtol=0, atol=1e-6)  # every weight wired by the strict load


def test_a_released_pth_with_params_ema_loads(tmp_path):
    net = SwinIR(**{**TINY, "upsampler": "nearest+conv", "upscale": 4, "depths": [2, 2], "num_heads": [2, 2]})
    torch.save({"params_ema": _random(net, seed=1)}, tmp_path / "003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth")
    model = load_upscaler(tmp_path / "003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth")
    assert (model.arch, model.scale) == ("SwinIR", 4)
    torch.testing.assert_close(_run(model.net, 9, 8), _run(net, 9, 8), rtol=0, atol=1e-6)


def test_another_input_size_than_img_size_gets_its_own_shift_mask(tmp_path):
    """The stored `attn_mask` serves inputs of the checkpoint's img_size; other sizes get the mask recomputed, the
    same as a network built for that size would store."""
    sd = _random(SwinIR(**{**TINY, "upsampler": "pixelshuffle", "upscale": 2, "img_size": 16}), seed=2)
    assert torch.equal(sd["layers.0.residual_group.blocks.1.attn_mask"], shift_mask(16, 16, 4, 2))
    save_file(sd, str(tmp_path / "s16.safetensors"))
    model = load_upscaler(tmp_path / "s16.safetensors")
    assert model.net.img_size == 16
    assert _run(model.net, 30, 11).shape == (1, 3, 60, 22)  # padded 32 x 12: not 16 x 16
    other = SwinIR(**{**TINY, "upsampler": "pixelshuffle", "upscale": 2, "img_size": 8})  # stores the mask for 8
    other.load_state_dict({k: v for k, v in sd.items() if not k.endswith("attn_mask")}, strict=False)
    torch.testing.assert_close(_run(other, 16, 16), _run(model.net, 16, 16), rtol=0, atol=1e-6)


def test_an_esrgan_state_dict_is_not_swinir():
    assert not is_swinir(RRDBNet(num_feat=8, num_grow_ch=4, num_block=1).state_dict())
