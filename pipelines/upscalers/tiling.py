"""An image upscaled by a network, whole or tile by tile (A1111's `ESRGAN_tile`, `ESRGAN_tile_overlap`).

Each tile is run with `overlap` pixels of the image around it as context and only its own part of the output is
kept, so tiles meet without a seam when the overlap covers the network's reach, and differ only slightly near the
seams when it does not. Device memory is bounded by the tile, not the image: each tile's result comes back to the
CPU as 8-bit pixels at once. `keep_going`, called before each tile, stops the work (Interrupted) when it says no.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from pipelines.upscalers.load import UpscalerNet


def _run(model: UpscalerNet, x: torch.Tensor) -> torch.Tensor:
    """`model` on `x` (1 x C x H x W), padded by edge replication to its size multiple, the padding cut off again."""
    h, w = x.shape[-2:]
    m = model.multiple
    pad_h, pad_w = -h % m, -w % m
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    out = model.net(x)
    return out[..., : h * model.scale, : w * model.scale]


class Interrupted(Exception):
    """The caller's `keep_going` said stop between two tiles."""


def _pixels(out: torch.Tensor) -> np.ndarray:
    """A 1 x 3 x H x W result in [0, 1] as H x W x 3 8-bit pixels on the CPU."""
    return (out[0].float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@torch.inference_mode()
def upscale(model: UpscalerNet, image: Image.Image, *, tile: int = 192, overlap: int = 8,
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
            keep_going: Callable[[], bool] | None = None) -> Image.Image:
    """`image` (RGB) upscaled by `model.scale`; `tile` 0 runs it whole."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    x = x.to(device=device, dtype=dtype)
    h, w = x.shape[-2:]
    s = model.scale
    if tile <= 0 or (h <= tile and w <= tile):
        return Image.fromarray(_pixels(_run(model, x)), "RGB")
    out = np.empty((h * s, w * s, 3), dtype=np.uint8)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            if keep_going is not None and not keep_going():
                raise Interrupted
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            cy0, cx0 = max(0, y0 - overlap), max(0, x0 - overlap)
            cy1, cx1 = min(h, y1 + overlap), min(w, x1 + overlap)
            part = _run(model, x[..., cy0:cy1, cx0:cx1])
            out[y0 * s:y1 * s, x0 * s:x1 * s] = _pixels(part[..., (y0 - cy0) * s:(y1 - cy0) * s,
                                                             (x0 - cx0) * s:(x1 - cx0) * s])
    return Image.fromarray(out, "RGB")
