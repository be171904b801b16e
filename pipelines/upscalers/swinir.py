"""SwinIR (Liang et al. 2021, JingyunLiang/SwinIR's `network_swinir.py`), parameter and buffer names as its released
checkpoints have them; inference only (no dropout, no stochastic depth, no init beyond PyTorch's defaults).

Layout: `conv_first`; `patch_embed.norm` (patch_norm); `absolute_pos_embed` (ape); `layers.<i>` (RSTB):
`residual_group.blocks.<j>.{norm1, attn.{relative_position_bias_table, relative_position_index, qkv, proj}, norm2,
mlp.{fc1, fc2}}`, plus an `attn_mask` buffer in the shifted (odd) blocks, and `conv` ("1conv") or `conv.0/2/4`
("3conv"); `norm`; `conv_after_body` (or `.0/2/4`); then by upsampler: "pixelshuffle" `conv_before_upsample.0`,
`upsample.<0,2,..>`, `conv_last`; "pixelshuffledirect" `upsample.0`; "nearest+conv" `conv_before_upsample.0`,
`conv_up1`, `conv_up2` (x4), `conv_hr`, `conv_last`; "" (scale 1, restoration) `conv_last`.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

StateDict = dict[str, torch.Tensor]
UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")


def _partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """B x H x W x C (H, W multiples of `ws`) to its windows, (B * nW) x ws*ws x C, row-major per image."""
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _merge(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """The inverse of `_partition`: (B * nW) x ws*ws x C to B x H x W x C."""
    c = windows.shape[-1]
    return windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shift_mask(h: int, w: int, ws: int, shift: int, device: torch.device | None = None) -> torch.Tensor:
    """The shifted windows' attention mask for an H x W feature map: nW x N x N, -100 between tokens that the cyclic
    shift brought together from different regions, 0 elsewhere (the original's `calculate_mask`)."""
    regions = torch.zeros(1, h, w, 1, device=device)
    bands = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for n, (hs, wsl) in enumerate((hs, wsl) for hs in bands for wsl in bands):
        regions[:, hs, wsl, :] = n
    windows = _partition(regions, ws).squeeze(-1)  # nW x N
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def _position_index(ws: int) -> torch.Tensor:
    """N x N: the row of the relative position bias table for each pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # 2 x N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # N x N x 2, from 0
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention within each window, with a learned bias per relative position and head."""

    def __init__(self, dim: int, ws: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", _position_index(ws))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`x` (B * nW) x N x C; `mask` nW x N x N or None."""
        bw, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q, k, v = self.qkv(x).reshape(bw, n, 3, heads, d).permute(2, 0, 3, 1, 4)  # each (B * nW) x heads x N x d
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, heads)
        bias = bias.permute(2, 0, 1)  # heads x N x N
        if mask is not None:  # windows by image: (B, nW, heads, N, N) against nW x heads x N x N
            nw = mask.shape[0]
            q, k, v = (t.reshape(bw // nw, nw, heads, n, d) for t in (q, k, v))
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # scale d ** -0.5, as the original
        return self.proj(out.reshape(bw, heads, n, d).transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """(Shifted) window attention then an MLP, each pre-norm with a residual. A shifted block keeps the mask for
    `resolution` (the checkpoint's `img_size`) as its `attn_mask` buffer; other sizes get theirs from the caller."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, ws: int, shift: int, hidden: int,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)
        self.register_buffer("attn_mask", shift_mask(*resolution, ws, shift) if shift else None)

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """`x` B x H*W x C; `mask` the shift mask for `size` when it is not the buffer's size, else None."""
        h, w = size
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = self.attn_mask if mask is None else mask
        else:
            mask = None
        y = _merge(self.attn(_partition(y, self.ws), mask), self.ws, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


def _resi_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing a residual group: "1conv" one 3x3, "3conv" 3x3 to dim/4, 1x1, 3x3 back (fewer weights)."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == "3conv":
        return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
                             nn.Conv2d(dim // 4, dim, 3, 1, 1))
    raise ValueError(f"resi_connection {kind!r}")


class RSTB(nn.Module):
    """Residual Swin Transformer Block: `depth` blocks (every second one shifted by half a window), a conv on the
    feature map, plus the input."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, ws: int, hidden: int,
                 qkv_bias: bool, resi_connection: str) -> None:
        super().__init__()
        self.residual_group = nn.ModuleDict({"blocks": nn.ModuleList(
            SwinTransformerBlock(dim, resolution, num_heads, ws, ws // 2 if i % 2 else 0, hidden, qkv_bias)
            for i in range(depth))})
        self.conv = _resi_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        y = x
        for block in self.residual_group["blocks"]:
            y = block(y, size, mask)
        b, _, c = y.shape
        y = self.conv(y.transpose(1, 2).reshape(b, c, *size))
        return y.flatten(2).transpose(1, 2) + x


class SwinIR(nn.Module):
    """SwinIR for `upscale` x super-resolution (`upsampler` "pixelshuffle", "pixelshuffledirect", "nearest+conv"),
    or restoration at scale 1 (`upsampler` ""). Takes B x in_chans x H x W in [0, 1], any H, W: the input is padded
    by reflection to a multiple of `window_size` and the output cropped back to `scale` x H x `scale` x W. With `ape`,
    the padded input must be `img_size` square (the learned embedding has that many positions)."""

    def __init__(self, *, in_chans: int = 3, embed_dim: int = 96, depths: Sequence[int] = (6, 6, 6, 6),
                 num_heads: Sequence[int] = (6, 6, 6, 6), window_size: int = 8, mlp_ratio: float = 2.0,
                 img_size: int = 64, upscale: int = 2, upsampler: str = "", resi_connection: str = "1conv",
                 num_feat: int = 64, img_range: float = 1.0, patch_norm: bool = True, ape: bool = False,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler {upsampler!r}")
        if upsampler == "nearest+conv" and upscale not in (2, 4):
            raise ValueError(f"nearest+conv upscales 2x or 4x, not {upscale}x")
        self.scale = upscale if upsampler else 1
        self.upsampler = upsampler
        self.window_size = window_size
        self.img_size = img_size
        self.img_range = img_range
        self.shifted = any(depth > 1 for depth in depths)  # any block with a shift mask
        mean = (0.4488, 0.4371, 0.4040) if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        hidden = round(embed_dim * mlp_ratio)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = nn.Sequential(OrderedDict(norm=nn.LayerNorm(embed_dim)) if patch_norm else OrderedDict())
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, img_size * img_size, embed_dim))
        else:
            self.absolute_pos_embed = None
        self.layers = nn.ModuleList(
            RSTB(embed_dim, (img_size, img_size), depth, heads, window_size, hidden, qkv_bias, resi_connection)
            for depth, heads in zip(depths, num_heads, strict=True))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _resi_conv(embed_dim, resi_connection)

        if upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
        if upsampler == "pixelshuffle":
            steps = [3] if upscale == 3 else [2] * int(math.log2(upscale))
            if math.prod(steps) != upscale:
                raise ValueError(f"pixelshuffle upscales 2^n or 3x, not {upscale}x")
            ups: list[nn.Module] = []
            for r in steps:
                ups += [nn.Conv2d(num_feat, r * r * num_feat, 3, 1, 1), nn.PixelShuffle(r)]
            self.upsample = nn.Sequential(*ups)
        elif upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, upscale * upscale * in_chans, 3, 1, 1),
                                          nn.PixelShuffle(upscale))
        elif upsampler == "nearest+conv":
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            if upscale == 4:
                self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        last_in = {"pixelshuffle": num_feat, "nearest+conv": num_feat, "": embed_dim}
        if upsampler in last_in:
            self.conv_last = nn.Conv2d(last_in[upsampler], in_chans, 3, 1, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer body on B x C x H x W (H, W multiples of the window), same shape out."""
        b, c, h, w = x.shape
        tokens = self.patch_embed(x.flatten(2).transpose(1, 2))
        if self.absolute_pos_embed is not None:
            tokens = tokens + self.absolute_pos_embed
        mask = None  # the blocks' `attn_mask` buffers are for img_size; another size gets its own, once for all
        if self.shifted and (h, w) != (self.img_size, self.img_size):
            mask = shift_mask(h, w, self.window_size, self.window_size // 2, x.device).to(x.dtype)
        for layer in self.layers:
            tokens = layer(tokens, (h, w), mask)
        return self.norm(tokens).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ws = self.window_size
        pad_h, pad_w = -h % ws, -w % ws
        if pad_h or pad_w:  # reflection as the original; an input too small to reflect is replicated instead
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if pad_h < h and pad_w < w else "replicate")
        x = (x - self.mean) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.forward_features(feat)) + feat
        if self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        elif self.upsampler == "pixelshuffledirect":
            out = self.upsample(feat)
        elif self.upsampler == "nearest+conv":
            feat = self.conv_before_upsample(feat)
            feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
            if self.scale == 4:
                feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
            out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        else:
            out = x + self.conv_last(feat)
        out = out / self.img_range + self.mean
        return out[..., : h * self.scale, : w * self.scale]


_BLOCK = "layers.{}.residual_group.blocks.{}."


def is_swinir(sd: StateDict) -> bool:
    """Whether `sd` has SwinIR's keys (checked before ESRGAN's: both have a `conv_first`)."""
    return "conv_first.weight" in sd and _BLOCK.format(0, 0) + "norm1.weight" in sd


def swinir_params(sd: StateDict) -> dict[str, Any]:
    """SwinIR's keyword arguments, read from the keys and shapes of `sd`."""
    def count(pattern: str) -> int:
        return sum(1 for k in sd if re.fullmatch(pattern, k))

    embed_dim, in_chans = sd["conv_first.weight"].shape[:2]
    num_layers = count(r"layers\.\d+\.residual_group\.blocks\.0\.norm1\.weight")
    depths = [count(rf"layers\.{i}\.residual_group\.blocks\.\d+\.norm1\.weight") for i in range(num_layers)]
    tables = [sd[_BLOCK.format(i, 0) + "attn.relative_position_bias_table"] for i in range(num_layers)]
    num_heads = [t.shape[1] for t in tables]
    window_size = (math.isqrt(tables[0].shape[0]) + 1) // 2  # (2w - 1)^2 rows
    mlp_ratio = sd[_BLOCK.format(0, 0) + "mlp.fc1.weight"].shape[0] / embed_dim
    mask = next((v for k, v in sd.items() if k.endswith(".attn_mask")), None)
    if mask is not None:  # nW x N x N, nW = (img_size / window)^2
        img_size = math.isqrt(mask.shape[0]) * window_size
    elif "absolute_pos_embed" in sd:  # 1 x img_size^2 x C
        img_size = math.isqrt(sd["absolute_pos_embed"].shape[1])
    else:  # no shifted block, no position embedding: the size is used nowhere
        img_size = 64

    if "conv_up1.weight" in sd:
        upsampler, upscale = "nearest+conv", 2 ** count(r"conv_up\d+\.weight")
    elif "conv_before_upsample.0.weight" in sd:
        upsampler, upscale = "pixelshuffle", 1
        for i in range(0, 2 * count(r"upsample\.\d+\.weight"), 2):  # convs at 0, 2, ..: num_feat to r^2 num_feat
            conv = sd[f"upsample.{i}.weight"]
            upscale *= math.isqrt(conv.shape[0] // conv.shape[1])
    elif "upsample.0.weight" in sd:  # one conv to upscale^2 x in_chans
        upsampler, upscale = "pixelshuffledirect", math.isqrt(sd["upsample.0.weight"].shape[0] // in_chans)
    else:
        upsampler, upscale = "", 1
    num_feat = sd["conv_before_upsample.0.weight"].shape[0] if "conv_before_upsample.0.weight" in sd else 64
    return dict(
        in_chans=in_chans, embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
        mlp_ratio=mlp_ratio, img_size=img_size, upscale=upscale, upsampler=upsampler, num_feat=num_feat,
        resi_connection="3conv" if "conv_after_body.0.weight" in sd else "1conv",
        img_range=255.0 if window_size == 7 else 1.0,  # only the JPEG artifact models: window 7, range 255
        patch_norm="patch_embed.norm.weight" in sd, ape="absolute_pos_embed" in sd,
        qkv_bias=_BLOCK.format(0, 0) + "attn.qkv.bias" in sd)


def swinir_from_state_dict(sd: StateDict) -> SwinIR:
    """The SwinIR network `sd` describes, its weights (and buffers) loaded strictly; KeyError, ValueError or
    RuntimeError when `sd` does not fit."""
    net = SwinIR(**swinir_params(sd))
    net.load_state_dict(sd, strict=True)
    return net
