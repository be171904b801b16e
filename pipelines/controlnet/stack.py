"""ControlNet generation glue: the diffusers ControlNet pipeline for a request and its arguments.

`pipeline_class` picks the pipeline, `call_kwargs` gives the component and call arguments for the units. Every
unit runs through `controlnet_stack`, a `MultiControlNetModel` that applies each unit's control mode as
sd-webui-controlnet applies it (per-layer soft weights, conditional-only control), which diffusers' own
`guess_mode` does not.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from pipelines.controlnet.units import ControlMode, ControlUnit, HiResFixOption
from pipelines.loading import Arch

if TYPE_CHECKING:
    from diffusers import ControlNetModel

# "My prompt is more important" / "ControlNet is more important": the extension's per-layer soft weights,
# input blocks 0..11 then the middle block (SDXL ControlNets, with 10 outputs, take the first 10).
SOFT_LAYER_FACTORS: tuple[float, ...] = tuple(0.825 ** float(12 - i) for i in range(13))


_PIPELINES: dict[tuple[Arch, str], str] = {
    (Arch.SD1, "txt2img"): "StableDiffusionControlNetPipeline",
    (Arch.SD1, "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    (Arch.SD1, "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    (Arch.SDXL, "txt2img"): "StableDiffusionXLControlNetPipeline",
    (Arch.SDXL, "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    (Arch.SDXL, "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}


def pipeline_class(arch: Arch | str, mode: str, inpaint: bool) -> type:
    """The diffusers ControlNet pipeline for `arch` ("sd1"/"sdxl"), `mode` ("txt2img"/"img2img") and inpainting
    (img2img with a mask). Build it over the cached components with `assemble_pipeline(cls, components,
    controlnet=..., scheduler=...)`."""
    import diffusers

    if mode not in ("txt2img", "img2img") or (inpaint and mode != "img2img"):
        raise ValueError(f"no ControlNet pipeline for mode {mode!r} (inpaint={inpaint})")
    return getattr(diffusers, _PIPELINES[(Arch(arch), "inpaint" if inpaint else mode)])


def _cond_half(value: Any, batch: int) -> Any:
    """The conditional (second) half of a CFG batch: tensors with `batch` rows are cut, mappings recursively."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[batch // 2:]
    if isinstance(value, Mapping):
        return {k: _cond_half(v, batch) for k, v in value.items()}
    return value


def controlnet_stack(controlnets: Sequence[ControlNetModel], *, layer_factors: Sequence[Sequence[float] | None],
                     cond_only: Sequence[bool], cfg: bool) -> Any:
    """A `MultiControlNetModel` (what the diffusers pipelines take for several ControlNets; used for one too)
    that runs each ControlNet as its unit's control mode asks, the way the extension applies it:

    * every output of net i is multiplied by `layer_factors[i][j]` (output j: the input blocks, then the middle
      block), None = all 1;
    * with `cfg` (the pipeline batches unconditional + conditional), `cond_only[i]` runs net i on the
      conditional half only and adds nothing to the unconditional half (the extension's cfg injection;
      diffusers' guess mode does the same for all nets at once). Pooling ControlNets (`global_pool_conditions`,
      the extension's shuffle) are conditional-only always, as there.

    Call the pipeline with `guess_mode=False` (when a pooling ControlNet comes first the pipeline switches guess
    mode on by itself; the batch is then conditional-only and is taken as it comes). A net whose scale is 0 at
    a step (outside its guidance window) is not run, as the extension does not run it.
    """
    return _stack_class()(controlnets, layer_factors=layer_factors, cond_only=cond_only, cfg=cfg)


@functools.cache
def _stack_class() -> type:
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    class ControlNetStack(MultiControlNetModel):
        __doc__ = controlnet_stack.__doc__

        def __init__(self, controlnets: Sequence[Any], *, layer_factors: Sequence[Sequence[float] | None],
                     cond_only: Sequence[bool], cfg: bool) -> None:
            super().__init__(list(controlnets))
            if not (len(layer_factors) == len(cond_only) == len(self.nets)):
                raise ValueError("one layer_factors and one cond_only entry per ControlNet")
            self.layer_factors = [None if f is None else tuple(float(x) for x in f) for f in layer_factors]
            self.cond_only = [bool(c) for c in cond_only]
            self.cfg = bool(cfg)

        def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                    controlnet_cond: Sequence[torch.Tensor], conditioning_scale: Sequence[float],
                    class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None, added_cond_kwargs: dict[str, Any] | None = None,
                    cross_attention_kwargs: dict[str, Any] | None = None, guess_mode: bool = False,
                    return_dict: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
            doubled = self.cfg and not guess_mode
            batch = sample.shape[0]
            total_down: list[torch.Tensor] | None = None
            total_mid: torch.Tensor | None = None
            runs = [i for i, s in enumerate(conditioning_scale) if float(s) != 0.0] or [0]
            for i in runs:
                net = self.nets[i]
                half = doubled and (self.cond_only[i] or bool(net.config.global_pool_conditions))
                kwargs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                          "controlnet_cond": controlnet_cond[i], "class_labels": class_labels,
                          "timestep_cond": timestep_cond, "attention_mask": attention_mask,
                          "added_cond_kwargs": added_cond_kwargs}
                if half:
                    kwargs = {k: _cond_half(v, batch) for k, v in kwargs.items()}
                down, mid = net(**kwargs, conditioning_scale=conditioning_scale[i],
                                cross_attention_kwargs=cross_attention_kwargs, guess_mode=False, return_dict=False)
                factors = self.layer_factors[i]
                if factors is not None:
                    if len(factors) != len(down) + 1:
                        raise ValueError(f"ControlNet {i}: {len(down) + 1} outputs, {len(factors)} layer factors")
                    down = [d * f for d, f in zip(down, factors)]
                    mid = mid * factors[-1]
                if half:
                    down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                    mid = torch.cat([torch.zeros_like(mid), mid])
                if total_down is None:
                    total_down, total_mid = list(down), mid
                else:
                    total_down = [a + b for a, b in zip(total_down, down)]
                    total_mid = total_mid + mid
            return total_down, total_mid

    ControlNetStack.__module__ = __name__
    return ControlNetStack


def is_stack(module: Any) -> bool:
    """Whether `module` was made by `controlnet_stack`."""
    return type(module).__name__ == "ControlNetStack" and type(module).__module__ == __name__


def layer_factors(model: ControlNetModel, control_mode: ControlMode) -> list[float] | None:
    """Per-output weights of a control mode: None for Balanced; the extension's soft weights
    `0.825 ** (12 - j)` for the other two (first `outputs` of them, as it takes 10 for SDXL)."""
    if control_mode is ControlMode.BALANCED:
        return None
    outputs = len(model.controlnet_down_blocks) + 1
    return list(SOFT_LAYER_FACTORS[:outputs]) + [1.0] * max(0, outputs - len(SOFT_LAYER_FACTORS))


def call_kwargs(models: Sequence[ControlNetModel], maps: Sequence[Image.Image], units: Sequence[ControlUnit],
                mode: str, *, guidance_scale: float, steps: int | None = None,
                hires_pass: bool | None = None) -> dict[str, Any]:
    """Everything the ControlNet pipeline needs for these units (one model and one detected map per unit).

    Returns `{"controlnet": controlnet_stack(...), "image" (txt2img) | "control_image" (img2img, inpaint): maps,
    "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end": one per unit,
    "guess_mode": False}`. Pop "controlnet" into the pipeline's components; pass the rest to the call.
    `guidance_scale` is the request's CFG scale (above 1 the pipeline batches unconditional + conditional).

    How the extension's fields map:
    * `weight` -> `controlnet_conditioning_scale` (every output times the weight, as there).
    * `control_mode` Balanced -> plain ControlNet on both halves of the CFG batch; "My prompt is more important"
      -> outputs times `weight * 0.825 ** (12 - j)`, both halves (the extension's soft injection, exactly);
      "ControlNet is more important" -> the same soft weights on the conditional half only (its cfg injection).
      diffusers' own `guess_mode` is the latter for all nets at once with `logspace(-1, 0)` weights: within 1 %
      of these for SD 1.5's 13 outputs, but 0.1 .. 1 over SDXL's 10 where the extension takes 0.825 ** 12 ..
      0.825 ** 3; it is not used, so units can differ and SDXL matches too.
    * `guidance_start` / `guidance_end` -> `control_guidance_start/end`. The extension runs a unit at step i
      (of N) while start <= i/N <= end, diffusers while start <= i/N and (i+1)/N <= end: with `steps` = N
      (the number of denoising steps the pipeline runs) the end is moved by 1/N so the same steps run; without
      it diffusers stops one step earlier. A window that holds no step makes the unit's scale 0.
    * `hr_option` (only with hires fix: `hires_pass` False for its first pass, True for the second, None
      without hires fix): "Low res only" units get scale 0 in the second pass, "High res only" ones in the first.
      In the second pass canny units take the soft weights even when Balanced, as the extension forces them.
    """
    if not (len(models) == len(maps) == len(units)) or not units:
        raise ValueError("one model and one map per unit, at least one unit")
    if mode not in ("txt2img", "img2img"):
        raise ValueError(f"unknown mode {mode!r}")
    scales: list[float] = []
    starts: list[float] = []
    ends: list[float] = []
    for unit in units:
        start, end, scale = unit.guidance_start, unit.guidance_end, float(unit.weight)
        if hires_pass is not None and unit.hr_option is not HiResFixOption.BOTH and hires_pass == (
                unit.hr_option is HiResFixOption.LOW_RES_ONLY):
            scale = 0.0  # "Low res only" in the second pass, "High res only" in the first
        if steps:
            end = min(1.0, end + 1.0 / steps + 1e-9)
        if start >= end:  # no step inside the window (diffusers refuses an empty one)
            start, end, scale = 0.0, 1.0, 0.0
        scales.append(scale)
        starts.append(float(start))
        ends.append(float(end))
    stack = controlnet_stack(
        list(models),
        layer_factors=[layer_factors(m, ControlMode.PROMPT if hires_pass and u.module == "canny"
                                     and u.control_mode is ControlMode.BALANCED else u.control_mode)
                       for m, u in zip(models, units)],
        cond_only=[u.control_mode is ControlMode.CONTROL for u in units],
        cfg=guidance_scale > 1.0,
    )
    return {
        "controlnet": stack,
        "image" if mode == "txt2img" else "control_image": list(maps),
        "controlnet_conditioning_scale": scales,
        "control_guidance_start": starts,
        "control_guidance_end": ends,
        "guess_mode": False,
    }
