"""A1111's hires fix and SDXL refiner as plans the generation runs after its first pass.

Hires fix (A1111 `StableDiffusionProcessingTxt2Img`): the first pass runs at `width` x `height`; its result is
upscaled to the target size, either in latent space (`hr_upscaler` "Latent ...": `torch.nn.functional.interpolate`
with A1111's mode and antialias) or as decoded images (a plain resize: "None" and "Lanczos" use Lanczos,
"Nearest" nearest neighbour; a model upscaler such as ESRGAN runs through `HiresPlan.model_upscale`, then a Lanczos
resize to the exact size, as A1111's `resize_image` does), and then denoised again as img2img at
`denoising_strength`. The target is `hr_scale` times the first pass, or
`hr_resize_x/y` (one of them 0: the other follows the aspect ratio; both set: the image is scaled to cover the
box and the latent cropped to it, as A1111 does).

A1111 runs the second pass for exactly `hr_second_pass_steps or steps` steps, over a schedule of
`int(steps / min(strength, 0.999))` steps (`setup_img2img_steps` with explicit steps); `second_pass_steps` gives
diffusers' img2img the step count and strength that run the same number of steps.

Refiner (A1111 `refiner_checkpoint`, `refiner_switch_at`): the base model samples the first
`refiner_switch_at` of the schedule and the refiner model finishes it from the same latents (diffusers'
`denoising_end` / `denoising_start`, which exist on the SDXL pipelines). A1111 switches once the completed ratio
`(999 - timestep) / 1000` of the step about to run reaches `refiner_switch_at`: the same absolute-timestep cut
diffusers makes (`round(1000 - 1000 * switch_at)`), so it falls wherever the pass's own schedule crosses it.
With hires fix, A1111's option `hires_fix_refiner_pass` says which pass switches: "second pass" (its default),
"first pass" or "both passes". The hires pass starts part-way down its schedule: when it starts below the cut
the refiner runs all of it; when it ends above the cut the refiner never runs (and is not loaded, nor named in
the infotext, as A1111 never switched to it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:  # the request side plans without importing torch or diffusers (the device thread does that)
    import torch

    from pipelines.samplers import ResolvedSampler

# A1111 `shared.latent_upscale_modes`: name -> (torch interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# The image upscalers that need no weights (A1111's "None", "Lanczos", "Nearest"); each ends, like A1111's
# `resize_image`, with a Lanczos resize to the exact target.
IMAGE_UPSCALERS: dict[str, Image.Resampling] = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
LATENT_FACTOR = 8  # A1111's `opt_f`: pixels per latent cell


@dataclass
class HiresPlan:
    """What the hires pass does for one request, already validated."""

    upscale_width: int  # the size the first pass is upscaled to
    upscale_height: int
    width: int  # the final size: the upscaled size less A1111's crop (`truncate_x/y`)
    height: int
    upscaler: str  # a LATENT_MODES or IMAGE_UPSCALERS name, or a model upscaler's (with `model_upscale`)
    steps: int  # steps the second pass runs
    denoising_strength: float
    sampler: ResolvedSampler
    prompt: str
    negative_prompt: str
    checkpoint: Any = None  # pipelines.store.CheckpointEntry of `hr_checkpoint_name`, None for the same model
    # a model upscaler's (image, upscaler name, scale) -> image, called on the device thread; None for the others
    model_upscale: Callable[[Image.Image, str, float], Image.Image] | None = None

    @property
    def latent(self) -> bool:
        return self.upscaler in LATENT_MODES


@dataclass
class RefinerPlan:
    """The refiner model and where the schedule switches to it (a fraction of the steps, 0 < switch_at < 1).
    `hires_pass` is A1111's `hires_fix_refiner_pass` when the job has a hires pass, None without one (the
    refiner then finishes the only pass)."""

    checkpoint: Any  # pipelines.store.CheckpointEntry
    switch_at: float
    hires_pass: str | None = None

    @property
    def in_first_pass(self) -> bool:
        """True when the refiner finishes the first pass."""
        return self.hires_pass in (None, "first pass", "both passes")

    @property
    def in_hires_pass(self) -> bool:
        """True when the refiner finishes the hires pass."""
        return self.hires_pass in ("second pass", "both passes")


def target_size(width: int, height: int, scale: float, resize_x: int, resize_y: int) -> tuple[int, int, int, int]:
    """(upscale_width, upscale_height, final_width, final_height) for a first pass of width x height, as A1111's
    `calculate_target_resolution` computes them (its latent crop expressed in pixels). The final size is what
    the latent holds: a multiple of 8."""
    if resize_x == 0 and resize_y == 0:
        to_x, to_y = int(width * scale), int(height * scale)
        return to_x, to_y, to_x // LATENT_FACTOR * LATENT_FACTOR, to_y // LATENT_FACTOR * LATENT_FACTOR
    if resize_y == 0 or resize_x == 0:
        to_x, to_y = (resize_x, resize_x * height // width) if resize_y == 0 else (resize_y * width // height, resize_y)
        return to_x, to_y, to_x // LATENT_FACTOR * LATENT_FACTOR, to_y // LATENT_FACTOR * LATENT_FACTOR
    if width / height < resize_x / resize_y:
        to_x, to_y = resize_x, resize_x * height // width
    else:
        to_x, to_y = resize_y * width // height, resize_y
    cut_x = (to_x - resize_x) // LATENT_FACTOR
    cut_y = (to_y - resize_y) // LATENT_FACTOR
    return to_x, to_y, (to_x // LATENT_FACTOR - cut_x) * LATENT_FACTOR, (to_y // LATENT_FACTOR - cut_y) * LATENT_FACTOR


def upscale_latents(latents: torch.Tensor, plan: HiresPlan) -> torch.Tensor:
    """First-pass latents (N, C, h, w) at the hires size, then cropped as A1111 crops (`truncate_x/y`)."""
    import torch

    mode, antialias = LATENT_MODES[plan.upscaler]
    size = (plan.upscale_height // LATENT_FACTOR, plan.upscale_width // LATENT_FACTOR)
    out = torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, antialias=antialias).to(latents.dtype)
    return _crop(out, plan)


def upscale_image(image: Image.Image, plan: HiresPlan) -> Image.Image:
    """A decoded first-pass image at the hires size (A1111 `resize_image(0, ...)`: a weightless upscaler's resize,
    or the model upscaler when the image grows, then Lanczos to the exact size), then cropped to the final size."""
    size = (plan.upscale_width, plan.upscale_height)
    if plan.upscaler in IMAGE_UPSCALERS or plan.model_upscale is None:
        scaled = image.resize(size, resample=IMAGE_UPSCALERS.get(plan.upscaler, Image.Resampling.LANCZOS))
    else:
        scale = max(size[0] / image.width, size[1] / image.height)
        scaled = plan.model_upscale(image, plan.upscaler, scale) if scale > 1.0 else image
        if scaled.size != size:
            scaled = scaled.resize(size, resample=Image.Resampling.LANCZOS)
    left = (plan.upscale_width - plan.width) // LATENT_FACTOR // 2 * LATENT_FACTOR
    top = (plan.upscale_height - plan.height) // LATENT_FACTOR // 2 * LATENT_FACTOR
    return scaled.crop((left, top, left + plan.width, top + plan.height))


def _crop(latents: torch.Tensor, plan: HiresPlan) -> torch.Tensor:
    cut_y = latents.shape[2] - plan.height // LATENT_FACTOR
    cut_x = latents.shape[3] - plan.width // LATENT_FACTOR
    return latents[:, :, cut_y // 2: latents.shape[2] - (cut_y + 1) // 2, cut_x // 2: latents.shape[3] - (cut_x + 1) // 2]


def switch_cutoff(switch_at: float, train_timesteps: int = 1000) -> int:
    """The timestep below which the refiner runs: diffusers' `discrete_timestep_cutoff` for `denoising_end` /
    `denoising_start` = `switch_at` (a step at timestep t runs on the base when t >= the cutoff)."""
    return int(round(train_timesteps - switch_at * train_timesteps))


def second_pass_steps(steps: int, strength: float, finest: int = 1000) -> tuple[int, float]:
    """(num_inference_steps, strength) for which diffusers' img2img runs exactly `steps` steps over a schedule
    of `int(steps / min(strength, 0.999))` steps, as A1111's second pass does; the schedule is at most `finest`
    steps long (the scheduler's training timesteps; a smaller strength denoises as the finest schedule does).
    `strength` must be > 0 and `steps` at most `finest`."""
    total = min(finest, max(steps, int(steps / min(strength, 0.999))))
    adjusted = steps / total
    while int(total * adjusted) < steps:  # float rounding: steps/total * total may fall just short
        adjusted = math.nextafter(adjusted, 2.0)
    return total, min(adjusted, 1.0)
