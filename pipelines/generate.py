"""Generation: one `ImageJob` in, PIL images with their seeds out.

The shared pipeline is never mutated for one request: each call builds a per-request pipeline object from
the cached pipeline's components (no weights copied) with a scheduler built from config for this request.
Tiling changes conv padding on the shared modules for the duration of the call and always restores it; the
caller runs one job at a time per worker (the device thread), which is what makes that safe.

Noise comes from CPU generators seeded per image, so image i depends only on its own seed, whatever the
batch, and the same seed gives the same image on any device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageFilter, ImageOps

from pipelines.adapters.embeddings import expand_prompt
from pipelines.cache import LoadedModel, assemble_pipeline
from pipelines.errors import InvalidParameter
from pipelines.hires import HiresPlan, RefinerPlan, second_pass_steps, upscale_image, upscale_latents
from pipelines.prompts import chunked_embeds, needs_chunks
from pipelines.samplers import ResolvedSampler, build_scheduler, set_noise_seeds

log = logging.getLogger(__name__)

# A1111 resize_mode -> diffusers VaeImageProcessor.resize mode (3, "latent upscale", resizes like 0 here).
_RESIZE_MODES = {0: "default", 1: "crop", 2: "fill", 3: "default"}

ProgressFn = Callable[[int, int, int], bool]  # (step done, steps of this batch, batch index) -> keep going?
# Loads a second checkpoint (hires checkpoint, refiner) on the device thread: (model, load seconds, the
# textual-inversion entries it holds for the job's prompts).
LoadModelFn = Callable[[Any], tuple[LoadedModel, float, list[Any]]]


@dataclass
class ImageJob:
    """Everything one request asks of the model, already validated and resolved."""

    mode: str  # "txt2img" | "img2img"
    prompt: str
    negative_prompt: str
    seeds: list[int]  # one per image, batch_size * n_iter
    subseeds: list[int]
    subseed_strength: float
    batch_size: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    sampler: ResolvedSampler
    clip_skip: int = 1
    tiling: bool = False
    eta: float | None = None
    init_images: list[Image.Image] = field(default_factory=list)
    denoising_strength: float = 0.75
    resize_mode: int = 0
    mask: Image.Image | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 1
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: bool = False
    # Per-image prompts, one per seed, when requests are batched together (handler/runtime/batching.py); else None.
    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    # LoRAs (pipelines.adapters.lora.LoraUse) the device thread activates before running the job; `prompt` is already
    # free of their tags.
    loras: list[Any] = field(default_factory=list)
    # Textual-inversion embeddings (pipelines.adapters.embeddings entries) the device thread loaded for these prompts.
    embeddings: list[Any] = field(default_factory=list)
    # txt2img only: a second stage after the first pass (pipelines.hires); at most one of the two.
    hires: HiresPlan | None = None
    refiner: RefinerPlan | None = None
    # ControlNet units with their detected maps (handler side) and models (device thread).
    controls: list[Control] = field(default_factory=list)

    @property
    def staged(self) -> bool:
        """True when the first pass hands its result to a hires pass or a refiner."""
        return self.mode == "txt2img" and (self.hires is not None or self.refiner is not None)

    def prompts_for(self, first: int, n: int) -> tuple[list[str], list[str]]:
        """The prompts and negative prompts of images first..first+n."""
        if self.prompts is None or self.negative_prompts is None:
            return [self.prompt] * n, [self.negative_prompt] * n
        return self.prompts[first:first + n], self.negative_prompts[first:first + n]


@dataclass
class Control:
    """One ControlNet unit of a job: the parsed unit (pipelines.controlnet.units.ControlUnit), its model entry, its
    detected map at the first pass's size and, with hires fix, at the second pass's; `model` is the loaded
    ControlNetModel, set on the device thread."""

    unit: Any
    entry: Any
    map: Image.Image
    hr_map: Image.Image | None = None
    model: Any = None


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    generation_seconds: float  # time spent in the pipelines (what a consumer is billed for)
    interrupted: bool = False
    load_seconds: float = 0.0  # loading a hires checkpoint or refiner between the passes (not billed)


def _pipeline_class(arch: str, mode: str, inpaint: bool) -> type:
    import diffusers

    if arch == "sdxl":
        names = {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
                 "inpaint": "StableDiffusionXLInpaintPipeline"}
    else:
        names = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                 "inpaint": "StableDiffusionInpaintPipeline"}
    return getattr(diffusers, names["inpaint" if inpaint else mode])


def import_pipeline_classes() -> None:
    """Import every pipeline class a request can use (diffusers imports them lazily, at a cost of seconds), so
    that the import is paid at warm-up and not inside the first request or model load."""
    from pipelines.controlnet.stack import pipeline_class

    for arch in ("sd1", "sdxl"):
        for mode in ("txt2img", "img2img"):
            _pipeline_class(arch, mode, inpaint=False)
            pipeline_class(arch, mode, inpaint=False)
        _pipeline_class(arch, "img2img", inpaint=True)
        pipeline_class(arch, "img2img", inpaint=True)


def _with_controls(pipe: Any, arch: str, mode: str, inpaint: bool, controls: list[Control], call: dict[str, Any],
                   *, hires_pass: bool | None) -> Any:
    """`pipe` as the ControlNet pipeline of the same kind (same components and scheduler), with the units'
    arguments added to `call`; `pipe` itself when there are no units."""
    if not controls:
        return pipe
    from pipelines.controlnet.stack import call_kwargs, pipeline_class

    steps = call["num_inference_steps"]
    if "strength" in call:  # img2img runs int(steps * strength) of them
        steps = min(int(steps * call["strength"]), steps)
    maps = [c.hr_map if hires_pass else c.map for c in controls]
    kwargs = call_kwargs([c.model for c in controls], maps, [c.unit for c in controls],
                         "img2img" if mode == "img2img" or hires_pass else "txt2img",
                         guidance_scale=call["guidance_scale"], steps=steps, hires_pass=hires_pass)
    cls = pipeline_class(arch, mode, inpaint)
    components = {k: v for k, v in pipe.components.items() if k != "controlnet"}
    controlled = assemble_pipeline(cls, components, scheduler=pipe.scheduler, controlnet=kwargs.pop("controlnet"))
    call.update(kwargs)
    return controlled


def _request_pipeline(model: LoadedModel, job: ImageJob, inpaint: bool) -> Any:
    """A throwaway pipeline object over the cached components, with this request's scheduler."""
    base = model.pipe
    scheduler = build_scheduler(job.sampler, base.scheduler.config)
    cls = _pipeline_class(model.arch, job.mode, inpaint)
    return assemble_pipeline(cls, base.components, scheduler=scheduler)


# torch's group norm on one value per group (a 1x1 latent deep in a small UNet, one image, no CFG batch)
_TOO_SMALL = "Expected more than 1 value per channel"


def _too_small(job: ImageJob) -> InvalidParameter:
    field = "width" if job.width <= job.height else "height"
    return InvalidParameter(f"{field}: {job.width}x{job.height} is too small for this checkpoint (its deepest layers "
                            "would see a single value); use a larger size", field=field)


def _one_step(strength: float, finest: int) -> tuple[int, float]:
    """(steps, strength) for which diffusers' img2img runs exactly one step: int(steps * strength) == 1, with
    steps at most `finest` and strength raised to 1 / finest when it is smaller (tiny values, denormals)."""
    steps = min(math.ceil(1 / max(strength, 1 / finest)), finest)
    strength = max(strength, 1 / steps)
    while int(steps * strength) < 1:  # float rounding: 1/steps * steps may fall just short of 1
        strength = math.nextafter(strength, 2.0)
    return steps, strength


@contextlib.contextmanager
def _tiling(modules: list[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Circular padding on every Conv2d for the duration of the block (seamless tiles); always restored."""
    if not enabled:
        yield
        return
    saved: list[tuple[torch.nn.Conv2d, str]] = []
    try:
        for module in modules:
            for conv in module.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    saved.append((conv, conv.padding_mode))
                    conv.padding_mode = "circular"
        yield
    finally:
        for conv, mode in saved:
            conv.padding_mode = mode


def _noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (A1111's variation seed)."""
    low_n = low / low.norm()
    high_n = high / high.norm()
    dot = (low_n * high_n).sum()
    if dot.abs() > 0.9995:
        return (1 - t) * low + t * high
    omega = torch.acos(dot.clamp(-1, 1))
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so) * low + (torch.sin(t * omega) / so) * high


def _fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 `inpainting_fill=0`: paint the masked area with colours spread from its surroundings, coarse to fine."""
    keep = ImageOps.invert(mask.convert("L"))
    source = image.convert("RGBA")
    source.putalpha(keep)
    premultiplied = source.convert("RGBa")
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA") if radius else source
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def _prepare_inpaint(job: ImageJob, image: Image.Image, mask: Image.Image, seed: int) -> tuple[Image.Image, Image.Image]:
    """Mask invert + blur, and the masked-content fill (0 fill, 1 original, 2 noise, 3 nothing)."""
    mask = mask.convert("L")
    if job.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if job.mask_blur_x or job.mask_blur_y:
        mask = mask.filter(ImageFilter.GaussianBlur((job.mask_blur_x, job.mask_blur_y)))
    if job.inpainting_fill == 0:
        image = _fill_masked(image, mask)
    elif job.inpainting_fill == 2:
        noise = (_noise(seed, (image.height, image.width, 3)).clamp(-2, 2) * 64 + 128).clamp(0, 255)
        image = Image.composite(Image.fromarray(noise.to(torch.uint8).numpy(), "RGB"), image, mask)
    elif job.inpainting_fill == 3:
        image = Image.composite(Image.new("RGB", image.size, (128, 128, 128)), image, mask)
    return image, mask


def generate(model: LoadedModel, job: ImageJob, progress: ProgressFn | None = None,
             load_model: LoadModelFn | None = None) -> GenerationResult:
    """Run `job` on `model`; images come back in seed order. Raises InvalidParameter for requests the
    model cannot serve (checked before any work, so nothing is half done). A staged job (hires fix, refiner)
    runs every first pass, then loads its second checkpoint with `load_model` if it names one, then every
    second pass; the load time is reported apart (`load_seconds`), not as generation time."""
    inpaint = job.mode == "img2img" and job.mask is not None
    if job.mode == "img2img" and not job.init_images:
        raise InvalidParameter("init_images: at least one image is required", field="init_images")
    if job.mode == "img2img" and job.subseed_strength:
        raise InvalidParameter("subseed_strength: variation seeds are offered for txt2img only", field="subseed_strength")
    pipe = _request_pipeline(model, job, inpaint)
    depth = min(enc.config.num_hidden_layers for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
                if enc is not None)
    if job.clip_skip > depth:
        raise InvalidParameter(f"CLIP_stop_at_last_layers: {job.clip_skip} exceeds the {depth} layers of this "
                               "checkpoint's text encoder", field="CLIP_stop_at_last_layers")
    latent_channels = pipe.unet.config.in_channels  # txt2img only: img2img's latents come from the image
    scale = pipe.vae_scale_factor
    call: dict[str, Any] = {
        "num_inference_steps": job.steps,
        "guidance_scale": job.cfg_scale,
        "output_type": "pil",
    }
    sd1_clip_skip = job.clip_skip > 1 and model.arch != "sdxl"
    if job.clip_skip > 1 and not sd1_clip_skip:
        call["clip_skip"] = job.clip_skip - 1
    if job.eta is not None:
        call["eta"] = job.eta
    if job.mode == "txt2img" or inpaint:
        call["height"], call["width"] = job.height, job.width
    if job.mode == "img2img":
        call["strength"] = job.denoising_strength
        # diffusers runs int(steps * strength) steps; A1111 still denoises when that is 0, so take enough
        # steps for one. Strength 0 means "no change": the (resized) input comes back as it is.
        # Only those steps run, but the schedule cannot be finer than the scheduler's training timesteps: a
        # smaller strength denoises as the finest single step does.
        if 0 < job.denoising_strength and job.steps * job.denoising_strength < 1:
            call["num_inference_steps"], call["strength"] = _one_step(
                job.denoising_strength, pipe.scheduler.config.get("num_train_timesteps", 1000))
    if model.arch == "sdxl":
        call["original_size"] = call["target_size"] = (job.height, job.width)
    _widen_lcm(pipe, call["num_inference_steps"])
    pipe = _with_controls(pipe, model.arch, job.mode, inpaint, job.controls, call,
                          hires_pass=False if job.hires is not None else None)
    if job.staged:
        if job.refiner is not None:
            call["denoising_end"], call["output_type"] = job.refiner.switch_at, "latent"
        elif job.hires is not None and job.hires.latent:
            call["output_type"] = "latent"

    images_out: list[Image.Image] = []
    interrupted = False
    total_images = len(job.seeds)
    started = time.perf_counter()
    with _tiling([pipe.unet, pipe.vae], job.tiling):
        for batch_no, first in enumerate(range(0, total_images, job.batch_size)):
            seeds = job.seeds[first : first + job.batch_size]
            subseeds = job.subseeds[first : first + job.batch_size]
            n = len(seeds)
            args = dict(call)
            _prompt_args(pipe, model.arch, job, *job.prompts_for(first, n), args)
            args["generator"] = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            if job.mode == "txt2img":
                shape = (latent_channels, job.height // scale, job.width // scale)
                noise = [_noise(s, shape) for s in seeds]
                if job.subseed_strength:
                    noise = [_slerp(job.subseed_strength, a, _noise(b, shape)) for a, b in zip(noise, subseeds)]
                args["latents"] = torch.stack(noise).to(device=pipe.unet.device, dtype=pipe.unet.dtype)
            else:
                sized = _image_inputs(pipe, job, first, seeds, args)
            steps = _Steps(progress, _effective_steps(job), batch_no)
            args["callback_on_step_end"] = steps
            # diffusers crops "only masked" inpainting for one PIL image at a time.
            runs = _one_image_runs(args, n) if "padding_mask_crop" in args else [args]
            batch_images: list[Image.Image] = []
            if job.mode == "img2img" and job.denoising_strength == 0:
                runs, batch_images = [], [img.copy() for img in sized]
            for run in runs:
                # DPM++ SDE draws from a Brownian tree seeded per image, not from `generator`.
                set_noise_seeds(pipe.scheduler, [g.initial_seed() for g in run["generator"]])
                with torch.inference_mode():
                    try:
                        batch_images.extend(pipe(**run).images)
                    except ValueError as exc:
                        if _TOO_SMALL not in str(exc):
                            raise
                        raise _too_small(job) from None
            if inpaint and "padding_mask_crop" not in args:
                # Keep unmasked pixels exactly as given (A1111 pastes the result back through the blurred mask).
                batch_images = [Image.composite(gen, src, m) for gen, src, m in
                                zip(batch_images, sized, args["mask_image"])]
            images_out.extend(batch_images)
            if steps.interrupted:
                interrupted = True
                break
    load_seconds = 0.0
    if job.staged and interrupted:  # A1111 returns the first pass when stopped before the second
        images_out = _decoded(pipe, images_out)
    elif job.staged:
        images_out, load_seconds, interrupted = _second_stage(model, job, images_out, progress, load_model)
    if torch.cuda.is_available() and str(pipe.unet.device).startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started - load_seconds
    done = len(images_out)
    return GenerationResult(images=images_out, seeds=job.seeds[:done], subseeds=job.subseeds[:done],
                            generation_seconds=seconds, interrupted=interrupted, load_seconds=load_seconds)


class _Steps:
    """diffusers' `callback_on_step_end` for one pipeline call: reports each step to `progress` as step i of
    `total` in job `job_no`, and stops the call after the current step when `progress` says so."""

    def __init__(self, progress: ProgressFn | None, total: int, job_no: int) -> None:
        self.progress, self.total, self.job_no = progress, total, job_no
        self.interrupted = False

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        if self.progress is not None and not self.progress(step + 1, self.total, self.job_no):
            self.interrupted = True
            pipe._interrupt = True
        return kwargs


def _widen_lcm(pipe: Any, steps: int) -> None:
    """LCMScheduler picks its timesteps from `original_inference_steps` (50) and refuses more steps than that;
    A1111's LCM takes any step count. The request's scheduler is its own, so widen its origin schedule."""
    origin = pipe.scheduler.config.get("original_inference_steps")
    if origin is not None and steps > origin:
        pipe.scheduler.register_to_config(original_inference_steps=steps)


def _decoded(pipe: Any, outputs: list[Any]) -> list[Image.Image]:
    """First-pass outputs as images: latents (C, h, w) are decoded with `pipe`'s VAE, images pass through."""
    if not outputs or isinstance(outputs[0], Image.Image):
        return outputs
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)  # SDXL's VAE overflows in fp16
    dtype = torch.float32 if upcast else vae.dtype
    images: list[Image.Image] = []
    with torch.inference_mode():
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            for latent in outputs:
                latent = latent.unsqueeze(0).to(device=vae.device, dtype=dtype)
                decoded = vae.decode(latent / vae.config.scaling_factor, return_dict=False)[0]
                images.extend(pipe.image_processor.postprocess(decoded, output_type="pil"))
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
    return images


def _second_stage(model: LoadedModel, job: ImageJob, firsts: list[Any], progress: ProgressFn | None,
                  load_model: LoadModelFn | None) -> tuple[list[Image.Image], float, bool]:
    """The hires pass or the refiner over every first-pass output (latents or images), batch by batch, on
    the second checkpoint if the job names one. Returns (images, load seconds, interrupted)."""
    plan = job.hires if job.hires is not None else job.refiner
    second, load_seconds, embeddings = model, 0.0, job.embeddings
    if plan.checkpoint is not None and plan.checkpoint.path != model.entry.path:
        if load_model is None:
            raise RuntimeError("a second checkpoint is needed but no loader was given")
        second, load_seconds, embeddings = load_model(plan.checkpoint)
    sampler = job.hires.sampler if job.hires is not None else job.sampler
    cls = _pipeline_class(second.arch, "img2img", inpaint=False)
    config = {key: second.pipe.config[key] for key in ("requires_aesthetics_score",) if key in second.pipe.config}
    pipe = assemble_pipeline(cls, second.pipe.components,  # a refiner's aesthetic-score conditioning kept
                             scheduler=build_scheduler(sampler, second.pipe.scheduler.config), **config)
    stage_job = job if embeddings is job.embeddings else _with_embeddings(job, embeddings)
    batches = math.ceil(len(firsts) / job.batch_size)
    images: list[Image.Image] = []
    interrupted = False
    with _tiling([pipe.unet, pipe.vae], job.tiling):
        for batch_no, first in enumerate(range(0, len(firsts), job.batch_size)):
            items = firsts[first: first + job.batch_size]
            seeds = job.seeds[first: first + len(items)]
            args: dict[str, Any] = {"guidance_scale": job.cfg_scale, "output_type": "pil"}
            if job.eta is not None and sampler is job.sampler:
                args["eta"] = job.eta
            if job.clip_skip > 1 and second.arch == "sdxl":
                args["clip_skip"] = job.clip_skip - 1
            if job.hires is not None:
                hires = job.hires
                if hires.latent:
                    image: Any = upscale_latents(torch.stack(items), hires)
                else:
                    image = [upscale_image(im, hires) for im in items]
                if hires.denoising_strength == 0:  # nothing to denoise: the upscaled first pass is the result
                    images.extend(_decoded(pipe, list(image)) if hires.latent else image)
                    continue
                args["num_inference_steps"], args["strength"] = second_pass_steps(
                    hires.steps, hires.denoising_strength, pipe.scheduler.config.get("num_train_timesteps", 1000))
                prompts, negatives = [hires.prompt] * len(items), [hires.negative_prompt] * len(items)
                width, height = hires.width, hires.height
            else:
                image = torch.stack(items)
                args["num_inference_steps"], args["denoising_start"] = job.steps, job.refiner.switch_at
                prompts, negatives = job.prompts_for(first, len(items))
                width, height = job.width, job.height
            args["image"] = image
            if second.arch == "sdxl":
                args["original_size"] = args["target_size"] = (height, width)
            _widen_lcm(pipe, args["num_inference_steps"])
            if job.controls:
                run_pipe = _with_controls(pipe, second.arch, "img2img", False, job.controls, args, hires_pass=True)
            else:
                run_pipe = pipe
            _prompt_args(run_pipe, second.arch, stage_job, prompts, negatives, args)
            args["generator"] = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            step_total = job.hires.steps if job.hires is not None else job.steps - int(job.steps * job.refiner.switch_at)
            steps = _Steps(progress, step_total, batches + batch_no)
            args["callback_on_step_end"] = steps
            set_noise_seeds(run_pipe.scheduler, seeds)
            with torch.inference_mode():
                images.extend(run_pipe(**args).images)
            if steps.interrupted:
                interrupted = True
                break
    return images, load_seconds, interrupted


def _with_embeddings(job: ImageJob, embeddings: list[Any]) -> ImageJob:
    import dataclasses

    return dataclasses.replace(job, embeddings=embeddings)


def _prompt_args(pipe: Any, arch: str, job: ImageJob, prompts: list[str], negatives: list[str],
                 args: dict[str, Any]) -> None:
    """Put the prompts of one batch into `args`: as text where diffusers encodes them as A1111 does, else as
    embeddings (attention weights, BREAK, prompts past the 77-token window, SD 1.x clip skip)."""
    prompts = [expand_prompt(pipe, p, job.embeddings) for p in prompts]
    negatives = [expand_prompt(pipe, p, job.embeddings) for p in negatives]
    if needs_chunks(pipe, prompts + negatives):
        args.pop("clip_skip", None)
        args.update(chunked_embeds(pipe, prompts, negatives, job.clip_skip, sdxl=arch == "sdxl"))
    elif job.clip_skip > 1 and arch != "sdxl":
        args["prompt_embeds"] = _sd1_embeds(pipe, prompts, job.clip_skip)
        args["negative_prompt_embeds"] = _sd1_embeds(pipe, negatives, job.clip_skip)
    else:
        args["prompt"] = prompts
        args["negative_prompt"] = negatives
    if arch == "sdxl" and not any(negatives):
        _zero_negatives(pipe, args)


def _zero_negatives(pipe: Any, args: dict[str, Any]) -> None:
    """SDXL with every negative prompt empty: A1111 zeroes the negative text conditioning (embeddings and
    pooled), as diffusers' `force_zeros_for_empty_prompt` does for a negative prompt of None."""
    if "prompt_embeds" in args:
        for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            if key in args:
                args[key] = torch.zeros_like(args[key])
        return
    if pipe.config.get("force_zeros_for_empty_prompt", False):
        args["negative_prompt"] = None
        return
    encoded = pipe.encode_prompt(prompt=args.pop("prompt"), device=pipe.unet.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, negative_prompt=args.pop("negative_prompt"),
                                 clip_skip=args.pop("clip_skip", None))
    embeds, negative, pooled, negative_pooled = encoded
    args.update(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(negative),
                pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=torch.zeros_like(negative_pooled))


def _image_inputs(pipe: Any, job: ImageJob, first: int, seeds: list[int], args: dict[str, Any]) -> list[Image.Image]:
    """Put one batch's init images (and masks) into `args`; returns the init images at the output size.

    One init image serves every image of the batch; several are taken in turn. Inpainting prepares each mask
    (invert, blur, masked-content fill) and uses "only masked" cropping unless the mask is empty, where A1111
    falls back to the whole picture."""
    sources = [job.init_images[(first + i) % len(job.init_images)] for i in range(len(seeds))]
    sized = [_resize(pipe, img.convert("RGB"), job, "init_images") for img in sources]
    if job.mask is None:
        args["image"] = sized
        return sized
    mask = _resize(pipe, job.mask.convert("L"), job, "mask")
    prepared = [_prepare_inpaint(job, img, mask, seed) for img, seed in zip(sized, seeds)]
    args["image"] = [image for image, _ in prepared]
    args["mask_image"] = [m for _, m in prepared]
    if job.inpaint_full_res and prepared[0][1].getbbox() is not None:
        args["padding_mask_crop"] = job.inpaint_full_res_padding
    return sized


def _resize(pipe: Any, image: Image.Image, job: ImageJob, field: str) -> Image.Image:
    """`image` at the output size by A1111's resize mode; an image too thin to resize that way is a 422."""
    try:
        return pipe.image_processor.resize(image, job.height, job.width, resize_mode=_RESIZE_MODES[job.resize_mode])
    except ValueError:  # "resize and fill" scales a side down to 0 pixels
        raise InvalidParameter(
            f"{field}: a {image.width}x{image.height} image cannot be resized with resize_mode {job.resize_mode} "
            f"to {job.width}x{job.height}", field=field) from None


def _one_image_runs(args: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Split one batch's pipeline arguments into n single-image calls (same seeds, same prompts)."""
    runs = []
    for i in range(n):
        run = dict(args)
        for key in ("prompt", "negative_prompt", "generator"):
            if run.get(key) is not None:
                run[key] = [args[key][i]]
        for key in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
            if key in run:
                run[key] = args[key][i : i + 1]
        run["image"], run["mask_image"] = args["image"][i], args["mask_image"][i]
        runs.append(run)
    return runs


def _sd1_embeds(pipe: Any, prompts: list[str], clip_skip: int) -> torch.Tensor:
    """SD 1.x prompt embeddings taken `clip_skip` layers from the end, then final-layer-normed (A1111's
    "Clip skip"). diffusers 0.42's own `clip_skip` reaches for `text_encoder.text_model`, which transformers
    >= 5.6 no longer has on CLIPTextModel, so this does the same computation on the model as it is now."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(encoder.device)
    with torch.inference_mode():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
        norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
        return norm(hidden).to(dtype=pipe.unet.dtype)


def _effective_steps(job: ImageJob) -> int:
    if job.mode == "img2img":
        return max(1, min(job.steps, int(math.floor(job.steps * job.denoising_strength)) or 1))
    return job.steps
