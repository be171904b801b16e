"""A1111's image post-processing, as its extras tab and `/sdapi/v1/extra-*` run it, given the upscale and
face-restore steps as functions (the device side supplies them: handler.runtime.upscaling).

- `upscale_by`: A1111's `Upscaler.upscale`: the target is `(size * scale) // 8 * 8`; the model (or resize) runs up
  to three times until the image covers it, then a Lanczos resize to exactly the target.
- `run_extras`: the extras chain in A1111 1.10's order (its scripts' `order`: Upscale 1000, GFPGAN 2000,
  CodeFormer 3000; `upscale_first` is accepted and, as in A1111 1.10, changes nothing): upscaler 1 (scale by
  `upscaling_resize`, or to `upscaling_resize_w` x `upscaling_resize_h`, pasted centred on a black canvas of that
  size when `upscaling_crop`), upscaler 2 blended in at its visibility, then GFPGAN and CodeFormer each blended in
  at theirs. It returns the image and A1111's infotext items (`Postprocess upscale by`, `Postprocess upscaler`...),
  in A1111's order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

LANCZOS = Image.Resampling.LANCZOS
WEIGHTLESS_RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}

Step = Callable[[Image.Image], Image.Image]  # one pass of an upscaler (by its own factor)


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's upscale target: each side times `scale`, floored to a multiple of 8."""
    return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)


def upscale_by(image: Image.Image, scale: float, step: Step | None) -> Image.Image:
    """`image` upscaled by `scale` as A1111's `Upscaler.upscale` does with `step` as its `do_upscale` (None: the
    upscaler "None", which only resizes)."""
    dest_w, dest_h = target_size(image.width, image.height, scale)
    if step is not None:
        for i in range(3):
            if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
                break
            shape = image.size
            image = step(image)
            if image.size == shape:
                break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


def weightless_step(name: str, scale: float) -> Step | None:
    """The `do_upscale` of A1111's Lanczos and Nearest upscalers (a resize by `scale`); None for "None"."""
    resample = WEIGHTLESS_RESAMPLE.get(name)
    if resample is None:
        return None
    return lambda im: im.resize((int(im.width * scale), int(im.height * scale)), resample=resample)


@dataclass(frozen=True)
class ExtrasPlan:
    """What the extras chain does to each image; upscaler names already resolved (None: no upscale)."""

    resize_mode: int  # 0 scale by `upscaling_resize`, 1 scale to `width` x `height`
    upscaling_resize: float
    width: int
    height: int
    crop: bool
    upscaler_1: str | None
    upscaler_2: str | None
    upscaler_2_visibility: float
    gfpgan_visibility: float
    codeformer_visibility: float
    codeformer_weight: float

    def scale_for(self, image: Image.Image) -> float:
        """The factor upscaler 1 (and 2) scale `image` by."""
        if self.resize_mode == 1:
            return max(self.width / image.width, self.height / image.height)
        return self.upscaling_resize

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The size of the result for an input of width x height."""
        if self.upscaler_1 is None:
            return width, height
        if self.resize_mode == 1 and self.crop:
            return self.width, self.height
        return target_size(width, height, max(self.width / width, self.height / height)
                           if self.resize_mode == 1 else self.upscaling_resize)


Upscale = Callable[[Image.Image, str, float], Image.Image]  # (image, upscaler name, scale) -> upscaled
Restore = Callable[[Image.Image, str, float], Image.Image]  # (image, "GFPGAN" | "CodeFormer", weight) -> restored


def run_extras(image: Image.Image, plan: ExtrasPlan, upscale: Upscale, restore: Restore) -> tuple[Image.Image,
                                                                                                  dict[str, Any]]:
    """`image` (RGB or RGBA) through the extras chain (module docstring); returns it with its infotext items."""
    info: dict[str, Any] = {}
    if plan.upscaler_1 is not None:
        scale = plan.scale_for(image)
        if plan.resize_mode == 1:
            info["Postprocess upscale to"] = f"{plan.width}x{plan.height}"
        else:
            info["Postprocess upscale by"] = plan.upscaling_resize

        def one(name: str) -> Image.Image:
            out = upscale(image, name, scale)
            if plan.resize_mode == 1 and plan.crop:
                canvas = Image.new("RGB", (plan.width, plan.height))
                canvas.paste(out, box=(plan.width // 2 - out.width // 2, plan.height // 2 - out.height // 2))
                out = canvas
                info["Postprocess crop to"] = f"{out.width}x{out.height}"
            return out

        upscaled = one(plan.upscaler_1)
        info["Postprocess upscaler"] = plan.upscaler_1
        if plan.upscaler_2 is not None and plan.upscaler_2_visibility > 0:
            second = one(plan.upscaler_2)
            if second.mode != upscaled.mode:
                second = second.convert(upscaled.mode)
            upscaled = Image.blend(upscaled, second, plan.upscaler_2_visibility)
            info["Postprocess upscaler 2"] = plan.upscaler_2
        image = upscaled
    if plan.gfpgan_visibility > 0:
        image = _blend(image, restore(image.convert("RGB"), "GFPGAN", 0.0), plan.gfpgan_visibility)
        info["GFPGAN visibility"] = round(plan.gfpgan_visibility, 3)
    if plan.codeformer_visibility > 0:
        image = _blend(image, restore(image.convert("RGB"), "CodeFormer", plan.codeformer_weight),
                       plan.codeformer_visibility)
        info["CodeFormer visibility"] = round(plan.codeformer_visibility, 3)
        info["CodeFormer weight"] = round(plan.codeformer_weight, 3)
    return image, info


def _blend(image: Image.Image, restored: Image.Image, visibility: float) -> Image.Image:
    """A1111's visibility: the restored image, blended over the input below 1."""
    if visibility >= 1.0:
        return restored
    return Image.blend(image.convert(restored.mode), restored, visibility)
