"""GFPGAN's "clean" network (GFPGANv1Clean: a U-Net encoder whose features modulate a StyleGAN2 decoder through
spatial feature transforms), parameter names as in the released `GFPGANv1.3.pth` / `GFPGANv1.4.pth` (`params_ema`).

The layout follows TencentARC/GFPGAN `gfpgan/archs/gfpganv1_clean_arch.py` and `stylegan2_clean_arch.py` (as
vendored by spandrel, which A1111 1.10 loads it through); the code is written here, trimmed to inference: no style
mixing, no truncation, no intermediate RGB outputs (the `toRGB.*` convs are kept so that the released files load
strictly, and are never run).

Keys (`c[r]`: the decoder's channels at resolution r, `u[r]` = c[r] / 2 the U-Net's):
- encoder: `conv_body_first` (1x1, 3 -> u[out]), `conv_body_down.<i>` ResBlocks halving down to 4x4, `final_conv`,
  `final_linear` (u[4]*16 -> the style code: one per decoder layer when `different_w`);
- U-Net decoder: `conv_body_up.<i>` ResBlocks doubling up to out_size, `condition_scale.<i>` / `condition_shift.<i>`
  (conv, leaky ReLU, conv) giving the SFT scale and shift at each resolution, `toRGB.<i>`;
- `stylegan_decoder.`: `style_mlp.<1,3,..>` (unused: the released models feed the style code as the latent),
  `constant_input`, `style_conv1`, `to_rgb1`, `style_convs.<2k, 2k+1>` (up-sampling, plain), `to_rgbs.<k>` and the
  stored noise buffers `noises.noise<j>`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pipelines.errors import InvalidParameter
from pipelines.faces.codeformer import codeformer_from_state_dict, is_codeformer
from pipelines.upscalers.load import StateDict, read_state_dict

_BASE_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}


def _channels(narrow: float, channel_multiplier: float) -> dict[int, int]:
    """StyleGAN2's channel table: 512 * narrow up to 32x32, then halving, times `channel_multiplier` from 64x64."""
    return {r: int((c * channel_multiplier if r >= 64 else c) * narrow) for r, c in _BASE_CHANNELS.items()}


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2, inplace=True)


def _resize2(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's weight-modulated convolution (no bias): the style scales the input channels of `weight`
    (1 x out x in x k x k), optionally demodulated; `upsample` doubles the input bilinearly first."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, num_style_feat: int, *, demodulate: bool = True,
                 upsample: bool = False, eps: float = 1e-8) -> None:
        super().__init__()
        self.out_ch, self.kernel, self.demodulate, self.upsample, self.eps = out_ch, kernel, demodulate, upsample, eps
        self.modulation = nn.Linear(num_style_feat, in_ch)
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel, kernel) / math.sqrt(in_ch * kernel**2))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weight = self.weight * self.modulation(style).view(b, 1, c, 1, 1)  # b x out x in x k x k
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum((2, 3, 4)) + self.eps).view(b, self.out_ch, 1, 1, 1)
        if self.upsample:
            x = _resize2(x, 2)
        h, w = x.shape[2:]
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.view(b * self.out_ch, c, self.kernel, self.kernel),
                       padding=self.kernel // 2, groups=b)
        return out.view(b, self.out_ch, *out.shape[2:])


class StyleConv(nn.Module):
    """Modulated 3x3 conv, scaled by sqrt(2), plus `weight` times noise, plus `bias`, leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, num_style_feat: int, *, upsample: bool = False) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_ch, out_ch, 3, num_style_feat, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # the noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """`noise` None draws fresh noise (from `generator`, else torch's global generator)."""
        out = self.modulated_conv(x, style) * 2**0.5
        if noise is None:
            noise = torch.randn((out.shape[0], 1, *out.shape[2:]), generator=generator, device=out.device,
                                dtype=out.dtype)
        return _lrelu(out + self.weight * noise + self.bias)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB (not demodulated) plus `bias`, added to the (bilinearly doubled) previous RGB."""

    def __init__(self, in_ch: int, num_style_feat: int, *, upsample: bool = True) -> None:
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(in_ch, 3, 1, num_style_feat, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            out = out + (_resize2(skip, 2) if self.upsample else skip)
        return out


class ConstantInput(nn.Module):
    """The learned 4x4 input of the StyleGAN2 decoder (`weight`: 1 x C x 4 x 4)."""

    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class NormStyleCode(nn.Module):
    """Style codes scaled to unit root mean square (the first layer of the style MLP; no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class StyleGAN2GeneratorClean(nn.Module):
    """StyleGAN2's generator without custom CUDA ops, with GFPGAN's SFT conditions (GFPGAN's
    StyleGAN2GeneratorCSFT): after the first (up-sampling) conv of each resolution, the features (or their second
    half when `sft_half`) become `features * scale + shift` from the U-Net."""

    def __init__(self, out_size: int, num_style_feat: int = 512, num_mlp: int = 8, channel_multiplier: float = 2,
                 narrow: float = 1, sft_half: bool = False) -> None:
        super().__init__()
        self.log_size = int(math.log2(out_size))
        self.num_style_feat, self.sft_half = num_style_feat, sft_half
        self.num_layers = 2 * (self.log_size - 2) + 1  # style convs, each with its noise
        self.num_latent = 2 * self.log_size - 2  # styles: the convs' and the to-RGBs' (the last shared)
        mlp: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            mlp += [nn.Linear(num_style_feat, num_style_feat), nn.LeakyReLU(0.2, inplace=True)]
        self.style_mlp = nn.Sequential(*mlp)
        ch = _channels(narrow, channel_multiplier)
        self.constant_input = ConstantInput(ch[4])
        self.style_conv1 = StyleConv(ch[4], ch[4], num_style_feat)
        self.to_rgb1 = ToRGB(ch[4], num_style_feat, upsample=False)
        self.style_convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for j in range(self.num_layers):
            res = 2 ** ((j + 5) // 2)
            self.noises.register_buffer(f"noise{j}", torch.randn(1, 1, res, res))
        in_ch = ch[4]
        for i in range(3, self.log_size + 1):
            out_ch = ch[2**i]
            self.style_convs.append(StyleConv(in_ch, out_ch, num_style_feat, upsample=True))
            self.style_convs.append(StyleConv(out_ch, out_ch, num_style_feat))
            self.to_rgbs.append(ToRGB(out_ch, num_style_feat))
            in_ch = out_ch

    def forward(self, styles: torch.Tensor, conditions: list[torch.Tensor], *, input_is_latent: bool = True,
                randomize_noise: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """The RGB image for `styles` (b x num_style_feat, or b x num_latent x num_style_feat: one per layer) and
        the SFT `conditions` [scale_8, shift_8, scale_16, shift_16, ...]. `randomize_noise` False uses the stored
        `noises` buffers; True draws fresh noise (from `generator` when given), as GFPGAN does by default."""
        if not input_is_latent:
            styles = self.style_mlp(styles)
        latent = styles if styles.ndim == 3 else styles[:, None].expand(-1, self.num_latent, -1)
        noises: list[torch.Tensor | None] = (
            [None] * self.num_layers if randomize_noise else [getattr(self.noises, f"noise{j}")
                                                              for j in range(self.num_layers)])
        out = self.style_conv1(self.constant_input(latent.shape[0]), latent[:, 0], noises[0], generator)
        skip = self.to_rgb1(out, latent[:, 1])
        for k, to_rgb in enumerate(self.to_rgbs):
            i = 2 * k + 1
            out = self.style_convs[2 * k](out, latent[:, i], noises[i], generator)
            if 2 * k + 1 < len(conditions):
                scale, shift = conditions[2 * k], conditions[2 * k + 1]
                if self.sft_half:
                    same, sft = out.split(out.shape[1] // 2, dim=1)
                    out = torch.cat((same, sft * scale + shift), dim=1)
                else:
                    out = out * scale + shift
            out = self.style_convs[2 * k + 1](out, latent[:, i + 1], noises[i + 1], generator)
            skip = to_rgb(out, latent[:, i + 2], skip)
        return skip


class ResBlock(nn.Module):
    """3x3 conv, bilinear resize by `factor` (0.5 or 2), 3x3 conv, leaky ReLUs, plus a resized 1x1 `skip`."""

    def __init__(self, in_ch: int, out_ch: int, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _lrelu(self.conv2(_resize2(_lrelu(self.conv1(x)), self.factor)))
        return out + self.skip(_resize2(x, self.factor))


def _sft(ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(ch, out_ch, 3, 1, 1))


class GFPGANv1Clean(nn.Module):
    """GFPGAN v1.2-1.4's network: an image in [-1, 1] (b x 3 x out_size x out_size, RGB) to the restored one (same
    range, unclamped). The released models: out_size 512, num_style_feat 512, channel_multiplier 2, narrow 1,
    num_mlp 8, different_w and sft_half True, input_is_latent True (the last is not in the state dict)."""

    def __init__(self, out_size: int = 512, num_style_feat: int = 512, channel_multiplier: float = 2,
                 num_mlp: int = 8, input_is_latent: bool = True, different_w: bool = True, narrow: float = 1,
                 sft_half: bool = True) -> None:
        super().__init__()
        self.out_size, self.input_is_latent, self.different_w = out_size, input_is_latent, different_w
        self.num_style_feat = num_style_feat
        self.log_size = int(math.log2(out_size))
        if 2**self.log_size != out_size or not 8 <= out_size <= 1024:
            raise ValueError(f"out_size {out_size} is not a power of two from 8 to 1024")
        u = _channels(narrow * 0.5, channel_multiplier)  # the U-Net has half the decoder's channels
        sizes = [2**i for i in range(3, self.log_size + 1)]  # 8 .. out_size
        self.conv_body_first = nn.Conv2d(3, u[out_size], 1)
        self.conv_body_down = nn.ModuleList(ResBlock(u[r], u[r // 2], 0.5) for r in reversed(sizes))
        self.final_conv = nn.Conv2d(u[4], u[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList(ResBlock(u[r // 2], u[r], 2) for r in sizes)
        self.toRGB = nn.ModuleList(nn.Conv2d(u[r], 3, 1) for r in sizes)
        styles = (2 * self.log_size - 2) if different_w else 1
        self.final_linear = nn.Linear(u[4] * 16, styles * num_style_feat)
        self.stylegan_decoder = StyleGAN2GeneratorClean(out_size, num_style_feat, num_mlp, channel_multiplier,
                                                        narrow, sft_half)
        self.condition_scale = nn.ModuleList(_sft(u[r], u[r] if sft_half else 2 * u[r]) for r in sizes)
        self.condition_shift = nn.ModuleList(_sft(u[r], u[r] if sft_half else 2 * u[r]) for r in sizes)

    def forward(self, x: torch.Tensor, *, randomize_noise: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The restored image (GFPGAN's first output). Noise as in `StyleGAN2GeneratorClean.forward`."""
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for down in self.conv_body_down:
            feat = down(feat)
            skips.append(feat)
        feat = _lrelu(self.final_conv(feat))
        style = self.final_linear(feat.flatten(1))
        if self.different_w:
            style = style.view(style.shape[0], -1, self.num_style_feat)
        conditions: list[torch.Tensor] = []
        for up, scale, shift, skip in zip(self.conv_body_up, self.condition_scale, self.condition_shift,
                                          reversed(skips)):
            feat = up(feat + skip)
            conditions += [scale(feat), shift(feat)]
        return self.stylegan_decoder(style, conditions, input_is_latent=self.input_is_latent,
                                     randomize_noise=randomize_noise, generator=generator)


_REQUIRED = ("conv_body_first.weight", "final_linear.weight", "conv_body_up.0.conv1.weight",
             "condition_scale.0.0.weight", "condition_scale.0.2.weight", "stylegan_decoder.constant_input.weight",
             "stylegan_decoder.to_rgb1.modulated_conv.modulation.weight")


def gfpgan_hyperparameters(sd: StateDict) -> dict[str, float | int | bool]:
    """GFPGANv1Clean's constructor arguments read from a state dict's keys and shapes (KeyError when a key the
    layout needs is missing):
    - out_size: 2**(2 + the number of `conv_body_up` blocks);
    - num_style_feat: the input width of `to_rgb1`'s modulation; num_mlp: the `style_mlp` Linear layers;
    - narrow: the decoder's 4x4 channels / 512; channel_multiplier: its 64x64 channels / (256 * narrow), only where
      the network reaches 64x64 (2 otherwise, where it changes nothing);
    - different_w: `final_linear` gives more than one style; sft_half: the SFT convs give as many channels as the
      U-Net has (half of the decoder's), not twice as many."""
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise KeyError(missing[0])
    log_size = 2 + sum(1 for k in sd if re.fullmatch(r"conv_body_up\.\d+\.conv1\.weight", k))
    num_style_feat = sd["stylegan_decoder.to_rgb1.modulated_conv.modulation.weight"].shape[1]
    narrow = sd["stylegan_decoder.constant_input.weight"].shape[1] / 512
    channel_multiplier: float = 2
    if log_size >= 6:  # to_rgbs.<k> works at 2**(k + 3): k = 3 is 64x64; its weight is 1 x 3 x C x 1 x 1
        c64 = sd["stylegan_decoder.to_rgbs.3.modulated_conv.weight"].shape[2]
        channel_multiplier = c64 / (256 * narrow)
        if channel_multiplier == int(channel_multiplier):
            channel_multiplier = int(channel_multiplier)
    return {
        "out_size": 2**log_size,
        "num_style_feat": num_style_feat,
        "channel_multiplier": channel_multiplier,
        "narrow": narrow,
        "num_mlp": sum(1 for k in sd if re.fullmatch(r"stylegan_decoder\.style_mlp\.\d+\.weight", k)),
        "different_w": sd["final_linear.weight"].shape[0] != num_style_feat,
        "sft_half": sd["condition_scale.0.2.weight"].shape[0] == sd["condition_scale.0.0.weight"].shape[0],
    }


def gfpgan_from_state_dict(sd: StateDict) -> GFPGANv1Clean:
    """The network `sd` describes, loaded strictly, in eval mode without gradients (KeyError, ValueError or
    RuntimeError when `sd` is not a GFPGANv1Clean state dict)."""
    net = GFPGANv1Clean(**gfpgan_hyperparameters(sd))  # type: ignore[arg-type]
    net.load_state_dict(sd, strict=True)
    return net.eval().requires_grad_(False)


@dataclass
class FaceRestorer:
    """A loaded face restorer: its network (eval mode, on the CPU until moved), architecture and face size (the
    aligned crop's side, the network's input and output size)."""

    net: nn.Module  # GFPGANv1Clean or CodeFormer
    arch: str  # "GFPGAN" or "CodeFormer"
    size: int

    @property
    def components(self) -> dict[str, nn.Module]:
        """Its torch modules, as a pipeline's `components` (pipelines.cache keeps it warm with the pipelines)."""
        return {"net": self.net}


def load_face_restorer(path: Path) -> FaceRestorer:
    """The GFPGAN or CodeFormer in `path` (`.safetensors`, or `.pth` read weights-only, `params_ema` unwrapped), told
    apart by its keys; InvalidParameter (field = the file name) for any file that is neither a GFPGANv1Clean nor a
    CodeFormer state dict."""
    return face_restorer_from_state_dict(read_state_dict(path), path.name)


def face_restorer_from_state_dict(sd: dict[str, torch.Tensor], name: str) -> FaceRestorer:
    """The restorer `sd` describes (its tensors may be on the meta device: the scan checks files that way);
    InvalidParameter (field `name`) when it is neither layout or does not fit."""
    if is_codeformer(sd):
        try:
            cf = codeformer_from_state_dict(sd)
        except Exception as exc:  # noqa: BLE001 - any shape the layout does not expect
            raise InvalidParameter(f"{name}: not a CodeFormer state dict ({type(exc).__name__})", field=name) from None
        return FaceRestorer(cf, "CodeFormer", cf.img_size)
    try:
        net = gfpgan_from_state_dict(sd)
    except Exception as exc:  # noqa: BLE001
        raise InvalidParameter(f"{name}: not a GFPGAN (v1.2-1.4, clean) state dict ({type(exc).__name__})",
                               field=name) from None
    return FaceRestorer(net, "GFPGAN", net.out_size)
