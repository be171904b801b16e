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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageFilter, ImageOps

from pipelines import conditioning
from pipelines.adapters.embeddings import expand_prompt
from pipelines.cache import LoadedModel, assemble_pipeline
from pipelines.errors import InvalidParameter
from pipelines.hires import HiresPlan, RefinerPlan, second_pass_steps, switch_cutoff, upscale_image, upscale_latents
from pipelines.prompts import chunked_embeds, needs_chunks
from pipelines.samplers import ResolvedSampler, build_scheduler, set_noise_seeds

log = logging.getLogger(__name__)

# A1111 resize_mode -> diffusers VaeImageProcessor.resize mode (3, "latent upscale", resizes like 0 here).
_RESIZE_MODES = {0: "default", 1: "crop", 2: "fill", 3: "default"}

ProgressFn = Callable[[int, int, int], bool]  # (step done, steps of this batch, batch index) -> keep going?
# Loads a second checkpoint (hires checkpoint, refiner; or the job's own again, with its VAE entry, after another)
# on the device thread: (checkpoint entry, VAE entry or None) -> (model, load seconds, the textual-inversion
# entries it holds for the job's prompts).
LoadModelFn = Callable[[Any, Any], tuple[LoadedModel, float, list[Any]]]


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
    # the request field that set clip_skip (a 422 names it when the text encoder is shallower); None: the caller's
    # option, which applies to every checkpoint and is taken as deep as this one goes
    clip_skip_field: str | None = None
    tiling: bool = False
    eta: float | None = None
    init_images: list[Image.Image] = field(default_factory=list)
    denoising_strength: float = 0.75
    resize_mode: int = 0
    # img2img: A1111's `upscaler_for_img2img`: (image, upscaler name, scale) -> image, called on the device thread
    # to enlarge an init image before its resize; with its name
    init_upscale: Callable[[Image.Image, str, float], Image.Image] | None = None
    init_upscaler: str | None = None
    # A1111's `restore_faces`: each final image -> the same with its faces restored (device thread), with the name
    restore_faces: Callable[[Image.Image], Image.Image] | None = None
    face_restorer: str | None = None
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
    # txt2img only: a second stage after the first pass (pipelines.hires): a hires pass, a refiner, or both (the
    # refiner's `hires_pass` says which pass it finishes).
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
    refined: bool = False  # the refiner ran (A1111 names it in the infotext only then)


def _pipeline_class(arch: str, mode: str, inpaint: bool) -> type:
    import diffusers

    if arch == "sdxl":
        names = {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
                 "inpaint": "StableDiffusionXLInpaintPipeline"}
    else:
        names = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                 "inpaint": "StableDiffusionInpaintPipeline"}
    return getattr(diffusers, names["inpaint" if inpaint else mode])


def import_pipeline_classes(archs: Iterable[str]) -> None:
    """Import the pipeline classes a request on a checkpoint of each of `archs` ("sd1", "sdxl") can use without
    ControlNet: txt2img, img2img, inpaint (diffusers imports them lazily, at a cost of seconds), so that the
    import is paid at start or warm-up, not inside the first request. The ControlNet classes are imported by the
    first request that uses a unit: a feature that is off by default costs nothing at start."""
    for arch in archs:
        for mode in ("txt2img", "img2img"):
            _pipeline_class(arch, mode, inpaint=False)
        _pipeline_class(arch, "img2img", inpaint=True)


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
    """A1111's variation-seed mix of one image's noise [C, H, W] (modules/rng.py `slerp`): spherical
    interpolation per column, the vectors taken along the height; where the two noises are nearly the same
    (mean cosine above 0.9995) A1111's linear fallback, whose weights are `low * t + high * (1 - t)` as it has
    them."""
    low_n = low / low.norm(dim=1, keepdim=True)
    high_n = high / high.norm(dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot.clamp(-1, 1))
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


@contextlib.contextmanager
def _variation_noise(pipe: Any, subseeds: list[int], strength: float) -> Iterator[None]:
    """img2img and inpainting with a variation seed, for one pipeline call: the noise diffusers draws (row i from
    image i's seed generator) becomes slerp(strength, that noise, subseed i's noise), the subseed's drawn the same
    way (a CPU generator, the row's shape and dtype), as A1111 mixes its initial noise. `pipe.scheduler.add_noise`
    (the request's own scheduler) is wrapped: img2img's start and inpainting's per-step re-noising of the kept
    area; so is `pipe.prepare_latents` for inpainting at denoising strength 1, which starts from the noise itself
    (its `latents` are never passed here). Strength 0 wraps nothing: the call is exactly what it is without."""
    if not strength:
        yield
        return
    scheduler = pipe.scheduler
    add_noise, prepare_latents = scheduler.add_noise, pipe.prepare_latents
    last: list[tuple[torch.Tensor, torch.Tensor]] = []  # the inpainting loop passes the same noise every step

    def mixed(noise: torch.Tensor) -> torch.Tensor:
        if last and last[0][0] is noise:
            return last[0][1]
        if noise.shape[0] != len(subseeds):
            raise RuntimeError(f"{noise.shape[0]} noise rows for {len(subseeds)} variation seeds")
        rows = []
        for row, subseed in zip(noise, subseeds):
            generator = torch.Generator("cpu").manual_seed(subseed)
            other = torch.randn(row.shape, generator=generator, dtype=row.dtype)
            rows.append(_slerp(strength, row.detach().cpu().float(), other.float()))
        out = torch.stack(rows).to(device=noise.device, dtype=noise.dtype)
        last[:] = [(noise, out)]
        return out

    def mixing_add_noise(original: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        return add_noise(original, mixed(noise), timesteps)

    def mixing_prepare_latents(*args: Any, **kwargs: Any) -> Any:
        out = prepare_latents(*args, **kwargs)
        if isinstance(out, tuple) and kwargs.get("is_strength_max") and kwargs.get("add_noise", True):
            latents, noise, *rest = out  # diffusers: latents = noise * init_noise_sigma
            return (mixed(noise) * scheduler.init_noise_sigma, noise, *rest)
        return out

    scheduler.add_noise, pipe.prepare_latents = mixing_add_noise, mixing_prepare_latents
    try:
        yield
    finally:
        del scheduler.add_noise, pipe.prepare_latents  # the instance attributes: the class's methods again


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
    model cannot serve (checked before any work, so nothing is half done). A staged job (hires fix, refiner, or
    both) runs every first pass, then each later phase over every batch (`_second_stage`), loading the checkpoints
    it names with `load_model`; the load time is reported apart (`load_seconds`), not as generation time."""
    inpaint = job.mode == "img2img" and job.mask is not None
    if job.mode == "img2img" and not job.init_images:
        raise InvalidParameter("init_images: at least one image is required", field="init_images")
    pipe = _request_pipeline(model, job, inpaint)
    depth = min(enc.config.num_hidden_layers for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
                if enc is not None)
    if job.clip_skip > depth and job.clip_skip_field is not None:
        raise InvalidParameter(f"{job.clip_skip_field}: {job.clip_skip} exceeds the {depth} layers of this "
                               "checkpoint's text encoder", field=job.clip_skip_field)
    if job.clip_skip > depth:
        log.info("clip skip %d (the caller's option) is taken as %d, the depth of this checkpoint's text encoder",
                    job.clip_skip, depth)
        job.clip_skip = depth
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
        if job.refiner is not None and job.refiner.in_first_pass:
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
            conditioned = _prompt_args(pipe, model.arch, job, *job.prompts_for(first, n), args)
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
            variation = job.subseed_strength if job.mode == "img2img" else 0.0  # txt2img mixed its `latents`
            for k, run in enumerate(runs):
                # DPM++ SDE draws from a Brownian tree seeded per image, not from `generator`.
                set_noise_seeds(pipe.scheduler, [g.initial_seed() for g in run["generator"]])
                alone = len(runs) > 1  # "only masked" inpainting: one call per image
                per_call = conditioned.select(k) if conditioned is not None and alone else conditioned
                run_subseeds = subseeds[k:k + 1] if alone else subseeds
                with torch.inference_mode(), _conditioned(per_call, pipe), \
                        _variation_noise(pipe, run_subseeds, variation):
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
    load_seconds, refined = 0.0, False
    if job.staged and interrupted:  # A1111 returns the first pass when stopped before the second
        images_out = _decoded(pipe, images_out)
    elif job.staged:
        images_out, load_seconds, interrupted, refined = _second_stage(model, job, images_out, progress, load_model)
    if torch.cuda.is_available() and str(pipe.unet.device).startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started - load_seconds
    done = len(images_out)
    return GenerationResult(images=images_out, seeds=job.seeds[:done], subseeds=job.subseeds[:done],
                            generation_seconds=seconds, interrupted=interrupted, load_seconds=load_seconds,
                            refined=refined)


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
                  load_model: LoadModelFn | None) -> tuple[list[Image.Image], float, bool, bool]:
    """Everything after the first passes, each phase over every batch before the next one's checkpoint is loaded:
    the refiner finishing the first passes (a refiner without hires fix, or `hires_fix_refiner_pass` "first pass"
    / "both passes"), then the hires pass, on the base or `hr_checkpoint_name`, handed to the refiner where its
    schedule crosses the switch ("second pass" / "both passes"). A refiner phase whose pass never reaches the
    switch is skipped (nothing loaded). Returns (images, load seconds, interrupted, whether the refiner ran)."""
    models = _StageModels(model, job, load_model)
    outputs, interrupted, refined = firsts, False, False
    refiner = job.refiner
    if refiner is not None and refiner.in_first_pass:
        outputs, interrupted, refined = _refine_first_pass(models, job, outputs, progress)
    if job.hires is not None and not interrupted:
        outputs, interrupted, refined_hires = _hires_pass(models, job, outputs, progress)
        refined = refined or refined_hires
    return outputs, models.load_seconds, interrupted, refined


class _StageModels:
    """The checkpoints a staged job's phases run on, in turn: the job's own model, then others through
    `load_model` (from the warm cache, where one may evict another: once another has been loaded, the job's
    own model is asked for again rather than used as it was). Sums the load seconds."""

    def __init__(self, base: LoadedModel, job: ImageJob, load_model: LoadModelFn | None) -> None:
        self.base, self.job, self.load_model = base, job, load_model
        self.load_seconds = 0.0
        self._left_base = False

    def get(self, entry: Any) -> tuple[LoadedModel, list[Any]]:
        """The model of checkpoint `entry` (None: the job's own) and the textual inversions loaded into it."""
        vae = None
        if entry is None or entry.path == self.base.entry.path:
            if not self._left_base:
                return self.base, self.job.embeddings
            entry, vae = self.base.entry, self.base.vae
        if self.load_model is None:
            raise RuntimeError("a second checkpoint is needed but no loader was given")
        loaded, seconds, embeddings = self.load_model(entry, vae)
        self._left_base = True
        self.load_seconds += seconds
        return loaded, embeddings


@dataclass
class _Phase:
    """One img2img call per batch on one model: the refiner finishing the first pass, the hires pass, or the
    refiner finishing the hires pass. `call` holds the step arguments (num_inference_steps, strength,
    denoising_start / denoising_end, output_type); progress reports step `offset + i` of `total` as job
    `job_offset + batch`; `start` is the model calls the pass made before this phase (prompt schedules go on
    counting from there, as A1111's one sampling does)."""

    sampler: ResolvedSampler
    hires: bool  # the hires pass's prompts, size and ControlNet maps (else the first pass's)
    call: dict[str, Any]
    total: int
    offset: int
    job_offset: int
    start: int = 0


def _refine_first_pass(models: _StageModels, job: ImageJob, latents: list[Any],
                       progress: ProgressFn | None) -> tuple[list[Any], bool, bool]:
    """The refiner finishing every first pass from its latents (`denoising_start`). Its outputs are images, or
    latents for a latent hires pass. Without hires fix the refiner's steps are reported as jobs of their own
    (after the first passes); with it, as the rest of each first pass (the hires passes are the later jobs).
    Returns (outputs, interrupted, whether the refiner ran); outputs are images when interrupted."""
    refiner, hires = job.refiner, job.hires
    base_calls, refiner_calls = _switch_split(build_scheduler(job.sampler, models.base.pipe.scheduler.config),
                                              job.steps, None, refiner.switch_at)
    latent_out = hires is not None and hires.latent
    if refiner_calls == 0:  # the first pass ended above the switch: A1111 never loads the refiner
        return (latents if latent_out else _decoded(models.base.pipe, latents)), False, False
    second, embeddings = models.get(refiner.checkpoint)
    batches = math.ceil(len(latents) / job.batch_size)
    if hires is None:  # as before hires fix could take a refiner: the refiner's steps as jobs of their own
        total, offset, job_offset = job.steps - int(job.steps * refiner.switch_at), 0, batches
    else:
        total, offset, job_offset = job.steps, base_calls, 0
    phase = _Phase(sampler=job.sampler, hires=False, total=total, offset=offset, job_offset=job_offset,
                   start=base_calls, call={"num_inference_steps": job.steps, "denoising_start": refiner.switch_at,
                         "output_type": "latent" if latent_out else "pil"})
    inputs = [torch.stack(latents[i: i + job.batch_size]) for i in range(0, len(latents), job.batch_size)]
    outputs, interrupted = _run_phase(second, embeddings, job, phase, inputs, progress)
    if interrupted and latent_out:
        outputs = _decoded(second.pipe, outputs)
    return outputs, interrupted, True


def _hires_pass(models: _StageModels, job: ImageJob, firsts: list[Any],
                progress: ProgressFn | None) -> tuple[list[Any], bool, bool]:
    """The hires pass over every first-pass output (latents or images): upscaled, then denoised again on the
    base or the hires checkpoint; with the refiner in this pass, A1111's switch on the pass's own schedule (see
    `_switch_split`): the base runs the steps above the cut (`denoising_end`) and the refiner the rest from
    those latents (`denoising_start`, the same steps and strength: one schedule); a pass that starts below the
    cut runs on the refiner alone (A1111 switches at its first step), one that ends above it on the base alone.
    Returns (images, interrupted, whether the refiner ran)."""
    hires, refiner = job.hires, job.refiner
    base, embeddings = models.get(hires.checkpoint)
    inputs = []
    for first in range(0, len(firsts), job.batch_size):
        items = firsts[first: first + job.batch_size]
        inputs.append(upscale_latents(torch.stack(items), hires) if hires.latent
                      else [upscale_image(im, hires) for im in items])
    batches = len(inputs)
    if hires.denoising_strength == 0:  # nothing to denoise: the upscaled first pass is the result
        images = [im for batch in inputs for im in (_decoded(base.pipe, list(batch)) if hires.latent else batch)]
        return images, False, False
    train_steps = base.pipe.scheduler.config.get("num_train_timesteps", 1000)
    steps, strength = second_pass_steps(hires.steps, hires.denoising_strength, train_steps)
    call = {"num_inference_steps": steps, "strength": strength}
    base_calls, refiner_calls = hires.steps, 0
    if refiner is not None and refiner.in_hires_pass and refiner.checkpoint.path != base.entry.path:
        # (the refiner as the hires checkpoint: A1111 finds it already loaded and never switches)
        base_calls, refiner_calls = _switch_split(build_scheduler(hires.sampler, base.pipe.scheduler.config),
                                                  steps, strength, refiner.switch_at)
    if refiner_calls == 0:
        phase = _Phase(sampler=hires.sampler, hires=True, call=call, total=hires.steps, offset=0, job_offset=batches)
        outputs, interrupted = _run_phase(base, embeddings, job, phase, inputs, progress)
        return outputs, interrupted, False
    if base_calls > 0:
        phase = _Phase(sampler=hires.sampler, hires=True, total=hires.steps, offset=0, job_offset=batches,
                       call={**call, "denoising_end": refiner.switch_at, "output_type": "latent"})
        latents, interrupted = _run_phase(base, embeddings, job, phase, inputs, progress)
        if interrupted:
            return _decoded(base.pipe, latents), True, False
        inputs = [torch.stack(latents[i: i + job.batch_size]) for i in range(0, len(latents), job.batch_size)]
        call["denoising_start"] = refiner.switch_at  # the rest of the same schedule, from those latents
    second, embeddings = models.get(refiner.checkpoint)
    phase = _Phase(sampler=hires.sampler, hires=True, call=call, total=hires.steps, offset=base_calls,
                   job_offset=batches, start=base_calls)
    outputs, interrupted = _run_phase(second, embeddings, job, phase, inputs, progress)
    return outputs, interrupted, True


def _switch_split(scheduler: Any, steps: int, strength: float | None, switch_at: float) -> tuple[int, int]:
    """(denoiser calls on the base, calls on the refiner) of one pass of `steps` inference steps on `scheduler`
    (a throwaway: its timesteps are set here), started part-way at `strength` as diffusers' img2img starts
    (None: a whole txt2img pass), when the base stops at `denoising_end` = `switch_at` and the refiner takes
    over with `denoising_start` = `switch_at`, as diffusers' SDXL pipelines cut the schedule: the base keeps the
    pass's timesteps t >= the cutoff, the refiner runs the schedule's t < the cutoff (before diffusers adds one
    to an even count on a second-order scheduler). A1111's switch (completed ratio (999 - t) / 1000 reaching
    `switch_at`) falls at the same place."""
    origin = scheduler.config.get("original_inference_steps")  # as _widen_lcm does for the pipeline's
    if origin is not None and steps > origin:
        scheduler.register_to_config(original_inference_steps=steps)
    scheduler.set_timesteps(steps, device="cpu")
    timesteps = scheduler.timesteps
    ran = timesteps
    if strength is not None:  # diffusers' img2img get_timesteps without denoising_start
        ran = timesteps[max(steps - min(int(steps * strength), steps), 0) * scheduler.order:]
    cutoff = switch_cutoff(switch_at, scheduler.config.get("num_train_timesteps", 1000))
    return int((ran >= cutoff).sum()), int((timesteps < cutoff).sum())


def _run_phase(second: LoadedModel, embeddings: list[Any], job: ImageJob, phase: _Phase, inputs: list[Any],
               progress: ProgressFn | None) -> tuple[list[Any], bool]:
    """`phase` on `second`'s img2img pipeline (a refiner's aesthetic-score conditioning kept), one call per batch
    of `inputs` (latents (N, C, h, w) or a list of images). Returns (outputs, one per image: images, or latents
    (C, h, w) for output_type "latent"; interrupted: stopped after the current batch)."""
    cls = _pipeline_class(second.arch, "img2img", inpaint=False)
    config = {key: second.pipe.config[key] for key in ("requires_aesthetics_score",) if key in second.pipe.config}
    pipe = assemble_pipeline(cls, second.pipe.components,
                             scheduler=build_scheduler(phase.sampler, second.pipe.scheduler.config), **config)
    stage_job = job if embeddings is job.embeddings else _with_embeddings(job, embeddings)
    hires = job.hires if phase.hires else None
    outputs: list[Any] = []
    interrupted = False
    with _tiling([pipe.unet, pipe.vae], job.tiling):
        for batch_no, image in enumerate(inputs):
            first = batch_no * job.batch_size
            seeds = job.seeds[first: first + len(image)]
            args: dict[str, Any] = {"guidance_scale": job.cfg_scale, "output_type": "pil", **phase.call}
            if job.eta is not None and phase.sampler is job.sampler:
                args["eta"] = job.eta
            if job.clip_skip > 1 and second.arch == "sdxl":
                args["clip_skip"] = job.clip_skip - 1
            if hires is not None:
                prompts, negatives = [hires.prompt] * len(seeds), [hires.negative_prompt] * len(seeds)
                width, height = hires.width, hires.height
            else:
                prompts, negatives = job.prompts_for(first, len(seeds))
                width, height = job.width, job.height
            args["image"] = image
            if second.arch == "sdxl":
                args["original_size"] = args["target_size"] = (height, width)
            _widen_lcm(pipe, args["num_inference_steps"])
            if job.controls:
                run_pipe = _with_controls(pipe, second.arch, "img2img", False, job.controls, args,
                                          hires_pass=phase.hires)
            else:
                run_pipe = pipe
            if hires is not None:
                conditioned = _prompt_args(
                    run_pipe, second.arch, stage_job, prompts, negatives, args, start=phase.start,
                    hires_steps=conditioning.schedule_steps(hires.steps, _second_order(hires.sampler)),
                    fields=("hr_prompt", "hr_negative_prompt"))
            else:
                conditioned = _prompt_args(run_pipe, second.arch, stage_job, prompts, negatives, args,
                                           start=phase.start)
            args["generator"] = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            steps = _Steps(_shifted(progress, phase.offset, phase.total), phase.total, phase.job_offset + batch_no)
            args["callback_on_step_end"] = steps
            set_noise_seeds(run_pipe.scheduler, seeds)
            with torch.inference_mode(), _conditioned(conditioned, run_pipe):
                outputs.extend(run_pipe(**args).images)
            if steps.interrupted:
                interrupted = True
                break
    return outputs, interrupted


def _shifted(progress: ProgressFn | None, offset: int, total: int) -> ProgressFn | None:
    """`progress` with each step moved on by `offset` (a pass the refiner finishes reports on from where the
    base stopped) and its total `total`."""
    if progress is None or not offset:
        return progress
    return lambda step, _total, job_no: progress(step + offset, total, job_no)


def _with_embeddings(job: ImageJob, embeddings: list[Any]) -> ImageJob:
    import dataclasses

    return dataclasses.replace(job, embeddings=embeddings)


def _second_order(sampler: ResolvedSampler | None) -> bool:
    return sampler is not None and "second_order" in sampler.sampler.options


def _conditioned(conditioned: conditioning.StepConditioning | None, pipe: Any) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if conditioned is None else conditioned.applied(pipe)


def _prompt_args(pipe: Any, arch: str, job: ImageJob, prompts: list[str], negatives: list[str],
                 args: dict[str, Any], *, hires_steps: int | None = None, start: int = 0,
                 fields: tuple[str, str] = ("prompt", "negative_prompt")) -> conditioning.StepConditioning | None:
    """Put the prompts of one batch into `args`: as text where diffusers encodes them as A1111 does, else as
    embeddings (attention weights, BREAK, prompts past the 77-token window, SD 1.x clip skip). Prompts that
    change during sampling (prompt editing, alternation, `AND`) get a StepConditioning, returned, that the
    pipeline call must run under (`applied`); else None. `hires_steps` marks a hires pass (schedules laid over
    it, `when` counted from the first pass's end); `start` is the model call a continuing pass starts at."""
    if conditioning.is_dynamic(prompts, negatives):
        args.pop("clip_skip", None)
        built = conditioning.build(
            pipe, prompts, negatives, steps=conditioning.schedule_steps(job.steps, _second_order(job.sampler)),
            hires_steps=hires_steps, clip_skip=job.clip_skip, sdxl=arch == "sdxl", guidance=job.cfg_scale,
            expand=lambda text: expand_prompt(pipe, text, job.embeddings), fields=fields, start=start)
        args.update(built.pipeline_args(arch == "sdxl"))
        return built
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
    return None


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
    """`image` at the output size by A1111's resize mode; an image too thin to resize that way is a 422. With
    `init_upscale` (A1111's `upscaler_for_img2img`), an init image that must grow is first enlarged by that
    upscaler (by the factor its resize mode needs: to cover for 0 and 1, to fit for 2), as A1111's `resize_image`
    does."""
    if job.init_upscale is not None and job.init_upscaler and field == "init_images" and job.resize_mode != 3:
        cover = max(job.width / image.width, job.height / image.height)
        scale = min(job.width / image.width, job.height / image.height) if job.resize_mode == 2 else cover
        if scale > 1.0:
            image = job.init_upscale(image, job.init_upscaler, scale)
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
