"""CodeFormer (Zhou et al., NeurIPS 2022: a VQGAN whose codebook a transformer predicts from a degraded face, the
encoder's features fused back into the decoder with weight `w`), written here against the published state-dict
layout of `codeformer-v0.1.0.pth` (`params_ema`); no code of sczhou/CodeFormer is used.

The weights are the user's: CodeFormer's released weights come under the S-Lab License 1.0 (non-commercial use
only). sdfunc never downloads them; it offers CodeFormer only when the file is on the mount.

Keys (released sizes in brackets):
- `encoder.blocks.<i>`: a 3x3 conv (3 -> nf [64]); per level of `ch_mult` [1, 2, 2, 4, 4, 8], `res_blocks` [2]
  ResBlocks (`norm1`, `conv1`, `norm2`, `conv2`, `conv_out` where the width changes), each followed by an AttnBlock
  (`norm`, `q`, `k`, `v`, `proj_out`) at the attention resolutions [16], and a Downsample (`conv`) between levels;
  then ResBlock, AttnBlock, ResBlock, GroupNorm, a 3x3 conv to the code width emb_dim [256];
- `quantize.embedding.weight`: the codebook, codebook_size [1024] x emb_dim;
- `generator.blocks.<j>`: the mirror image (conv from emb_dim, ResBlock, AttnBlock, ResBlock, the levels from the
  narrowest with an Upsample (`conv`) between them, GroupNorm, a 3x3 conv to RGB);
- `position_emb` (latent_size [256 = 16 x 16] x dim_embd [512]), `feat_emb` (emb_dim -> dim_embd), `ft_layers.<n>`
  [9] pre-norm transformer layers (`self_attn` as torch's MultiheadAttention, `linear1`, `linear2`, `norm1`,
  `norm2`), `idx_pred_layer` (LayerNorm, Linear to the codebook's logits without bias);
- `fuse_convs_dict.<size>` [32, 64, 128, 256]: the fusion blocks (`encode_enc` ResBlock from twice the width,
  `scale` and `shift`: conv, leaky ReLU, conv).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pipelines.upscalers.load import StateDict

_MARKERS = ("position_emb", "quantize.embedding.weight")


def is_codeformer(keys: Collection[str]) -> bool:
    """Whether a state dict with these keys is CodeFormer's (its position embedding and codebook)."""
    return all(k in keys for k in _MARKERS)


def _norm(ch: int) -> nn.GroupNorm:
    """VQGAN's GroupNorm: 32 groups (eps 1e-6); fewer where the width is not a multiple of 32 (tiny models only:
    the released widths all are)."""
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), the skip through a 1x1 `conv_out` when the width changes."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.conv_out = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.conv_out is None else self.conv_out(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels (1x1 convs `q`, `k`, `v`, `proj_out`), added to the input."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (conv(n).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # b x hw x c
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halves the size: zero-padded by one pixel right and below, then a 3x3 conv of stride 2."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Doubles the size (nearest neighbour), then a 3x3 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Blocks(nn.Module):
    """A VQGAN half: `blocks` run in order; `taps` maps a resolution to the block after which its features are
    fused (the generator) or kept for fusion (the encoder)."""

    def __init__(self, blocks: list[nn.Module], taps: dict[int, int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.taps = taps


def _encoder(nf: int, ch_mult: Sequence[int], res_blocks: int, img_size: int, attn: Collection[int],
             emb_dim: int) -> _Blocks:
    """The encoder; a level's features are taken after its last ResBlock (before its attention)."""
    blocks: list[nn.Module] = [nn.Conv2d(3, nf, 3, 1, 1)]
    taps: dict[int, int] = {}
    ch, res = nf, img_size
    for level, mult in enumerate(ch_mult):
        for _ in range(res_blocks):
            blocks.append(ResBlock(ch, nf * mult))
            ch, taps[res] = nf * mult, len(blocks) - 1
            if res in attn:
                blocks.append(AttnBlock(ch))
        if level < len(ch_mult) - 1:
            blocks.append(Downsample(ch))
            res //= 2
    blocks += [ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch), _norm(ch), nn.Conv2d(ch, emb_dim, 3, 1, 1)]
    return _Blocks(blocks, taps)


def _generator(nf: int, ch_mult: Sequence[int], res_blocks: int, img_size: int, attn: Collection[int],
               emb_dim: int) -> _Blocks:
    """The decoder; a level is fused after its first ResBlock, or its last (before its attention) where it has
    attention (CodeFormer's blocks 9, 12, 15, 18, 21 at 32 .. 512 and 6 at 16)."""
    ch, res = nf * ch_mult[-1], img_size // 2 ** (len(ch_mult) - 1)
    blocks: list[nn.Module] = [nn.Conv2d(emb_dim, ch, 3, 1, 1), ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)]
    taps: dict[int, int] = {}
    for level in reversed(range(len(ch_mult))):
        for j in range(res_blocks):
            blocks.append(ResBlock(ch, nf * ch_mult[level]))
            ch = nf * ch_mult[level]
            if j == 0 or res in attn:
                taps[res] = len(blocks) - 1
            if res in attn:
                blocks.append(AttnBlock(ch))
        if level:
            blocks.append(Upsample(ch))
            res *= 2
    blocks += [_norm(ch), nn.Conv2d(ch, 3, 3, 1, 1)]
    return _Blocks(blocks, taps)


class Quantizer(nn.Module):
    """The codebook (`embedding`: codebook_size x emb_dim)."""

    def __init__(self, codebook_size: int, emb_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, emb_dim)


class TransformerSALayer(nn.Module):
    """Pre-norm self-attention (the position embedding added to the queries and keys, not the values), then a
    GELU MLP, each residual."""

    def __init__(self, dim: int, n_head: int, dim_mlp: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, n_head, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, dim_mlp), nn.Linear(dim_mlp, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """`x`: b x tokens x dim; `pos`: tokens x dim."""
        n = self.norm1(x)
        x = x + self.self_attn(n + pos, n + pos, n, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class FuseSFT(nn.Module):
    """Fusion of encoder features into the decoder's: dec + w * (dec * scale + shift), scale and shift from
    `encode_enc` (a ResBlock on both, concatenated)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.encode_enc = ResBlock(2 * ch, ch)
        self.scale, self.shift = (nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2, True),
                                                nn.Conv2d(ch, ch, 3, 1, 1)) for _ in range(2))

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float) -> torch.Tensor:
        feat = self.encode_enc(torch.cat((enc, dec), dim=1))
        return dec + w * (dec * self.scale(feat) + self.shift(feat))


def _adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """`content` with each channel's mean and standard deviation (unbiased, + eps in the variance) made `style`'s."""

    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + eps).sqrt()[..., None, None]

    (c_mean, c_std), (s_mean, s_std) = stats(content), stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormer(nn.Module):
    """CodeFormer for inference: a face crop in [-1, 1] (b x 3 x img_size x img_size, RGB) to the restored one (same
    range, unclamped). The defaults are the released model's (94M parameters); `n_head` is not in the state dict
    (8 in the release)."""

    def __init__(self, *, img_size: int = 512, nf: int = 64, ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
                 res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), emb_dim: int = 256,
                 codebook_size: int = 1024, dim_embd: int = 512, n_head: int = 8, n_layers: int = 9,
                 dim_mlp: int = 1024, connect_list: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        latent_side = img_size // 2 ** (len(ch_mult) - 1)
        if latent_side * 2 ** (len(ch_mult) - 1) != img_size:
            raise ValueError(f"img_size {img_size} does not halve {len(ch_mult) - 1} times")
        sizes = {img_size // 2**level: nf * mult for level, mult in enumerate(ch_mult)}  # resolution: width
        if not set(connect_list) <= set(sizes):
            raise ValueError(f"connect_list {list(connect_list)} is not among the resolutions {sorted(sizes)}")
        self.img_size, self.latent_size = img_size, latent_side**2
        self.connect_list = tuple(connect_list)
        self.encoder = _encoder(nf, ch_mult, res_blocks, img_size, attn_resolutions, emb_dim)
        self.quantize = Quantizer(codebook_size, emb_dim)
        self.generator = _generator(nf, ch_mult, res_blocks, img_size, attn_resolutions, emb_dim)
        self.position_emb = nn.Parameter(torch.zeros(self.latent_size, dim_embd))
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.Sequential(*(TransformerSALayer(dim_embd, n_head, dim_mlp) for _ in range(n_layers)))
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False))
        self.fuse_convs_dict = nn.ModuleDict({str(s): FuseSFT(sizes[s]) for s in connect_list})
        self._enc_taps = {self.encoder.taps[s]: s for s in connect_list}  # block index: resolution
        self._gen_taps = {self.generator.taps[s]: s for s in connect_list}

    def forward(self, x: torch.Tensor, w: float = 0.5, adain: bool = True) -> torch.Tensor:
        """The restored face. `w` (0 to 1, A1111's CodeFormer weight) is how much of the input's own features are
        fused back: 0 is the codebook's face alone (most restored), 1 the most faithful to the input. `adain` gives
        the codebook's features the input features' per-channel mean and deviation (A1111 always does)."""
        kept: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in self._enc_taps:
                kept[self._enc_taps[i]] = x
        lq = x
        b, _, h, wd = lq.shape
        tokens = self.feat_emb(lq.flatten(2).transpose(1, 2))  # b x hw x dim_embd
        for layer in self.ft_layers:
            tokens = layer(tokens, self.position_emb)
        codes = self.idx_pred_layer(tokens).argmax(dim=2)  # the most likely code of each latent pixel
        x = self.quantize.embedding(codes).transpose(1, 2).reshape(b, -1, h, wd)
        if adain:
            x = _adain(x, lq)
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in self._gen_taps and w > 0:
                size = self._gen_taps[i]
                x = self.fuse_convs_dict[str(size)](kept[size], x, w)
        return x


def _count(sd: StateDict, pattern: str) -> int:
    return sum(1 for k in sd if re.fullmatch(pattern, k))


def codeformer_hyperparameters(sd: StateDict) -> dict[str, object]:
    """CodeFormer's constructor arguments read from a state dict's keys and shapes (KeyError when a key the layout
    needs is missing, ValueError when the sizes do not fit together):
    - nf: the first encoder conv's width; ch_mult: each level's ResBlock width / nf, the levels being the encoder's
      blocks before its last five split at its Downsamples (`conv.weight` only); res_blocks: ResBlocks a level;
    - codebook_size, emb_dim: the codebook's shape; latent_size, dim_embd: `position_emb`'s shape; img_size: the
      latent's side (sqrt latent_size) doubled once per level after the first; attn_resolutions: the resolutions
      of the levels with AttnBlocks (`q.weight`), ascending;
    - n_layers: the `ft_layers`; dim_mlp: `linear1`'s width (2 * dim_embd when there are none); n_head: not
      recorded anywhere, so 8 (the release) or the largest of 4, 2, 1 that divides dim_embd;
    - connect_list: the resolutions in `fuse_convs_dict`, ascending."""
    for key in (*_MARKERS, "encoder.blocks.0.weight", "feat_emb.weight", "idx_pred_layer.1.weight"):
        if key not in sd:
            raise KeyError(key)
    nf = sd["encoder.blocks.0.weight"].shape[0]
    n_blocks = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.blocks\.(\d+)\.", k)))
    levels: list[list[str]] = [[]]
    widths: list[int] = []
    width = 0
    for i in range(1, n_blocks - 5):  # the levels: what comes before ResBlock, AttnBlock, ResBlock, norm, conv
        if f"encoder.blocks.{i}.conv1.weight" in sd:
            levels[-1].append("res")
            width = sd[f"encoder.blocks.{i}.conv1.weight"].shape[0]
        elif f"encoder.blocks.{i}.q.weight" in sd:
            levels[-1].append("attn")
        elif f"encoder.blocks.{i}.conv.weight" in sd:
            levels.append([])
            widths.append(width)
            width = 0
        else:
            raise ValueError(f"encoder block {i} is neither a ResBlock, an AttnBlock nor a Downsample")
    widths.append(width)
    if any(wd % nf or not wd for wd in widths) or len({lv.count("res") for lv in levels}) != 1:
        raise ValueError("the encoder's levels do not fit one channel multiplier table")
    codebook_size, emb_dim = sd["quantize.embedding.weight"].shape
    latent_size, dim_embd = sd["position_emb"].shape
    side = math.isqrt(latent_size)
    if side * side != latent_size:
        raise ValueError(f"position_emb has {latent_size} rows, not a square latent")
    img_size = side * 2 ** (len(levels) - 1)
    n_layers = _count(sd, r"ft_layers\.\d+\.linear1\.weight")
    return {
        "img_size": img_size,
        "nf": nf,
        "ch_mult": tuple(wd // nf for wd in widths),
        "res_blocks": levels[0].count("res"),
        "attn_resolutions": tuple(sorted(img_size >> lv for lv, blocks in enumerate(levels) if "attn" in blocks)),
        "emb_dim": emb_dim,
        "codebook_size": codebook_size,
        "dim_embd": dim_embd,
        "n_head": next(h for h in (8, 4, 2, 1) if dim_embd % h == 0),
        "n_layers": n_layers,
        "dim_mlp": sd["ft_layers.0.linear1.weight"].shape[0] if n_layers else 2 * dim_embd,
        "connect_list": tuple(sorted(int(m[1]) for k in sd
                                     if (m := re.fullmatch(r"fuse_convs_dict\.(\d+)\.scale\.0\.weight", k)))),
    }


def codeformer_from_state_dict(sd: StateDict) -> CodeFormer:
    """The network `sd` describes, loaded strictly, in eval mode without gradients (KeyError, ValueError or
    RuntimeError when `sd` is not a CodeFormer state dict)."""
    net = CodeFormer(**codeformer_hyperparameters(sd))  # type: ignore[arg-type]
    net.load_state_dict(sd, strict=True)
    return net.eval().requires_grad_(False)
