"""A txt2img request's later stages (hires fix, refiner, or both): their fields checked and turned into plans
(pipelines.hires), and the infotext keys A1111 writes for them, in A1111's order.

Every refusal is a 422 naming the field (404 for an unknown checkpoint) before any device work; A1111 answers
most of these with a 500.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handler.contract.schemas import Txt2ImgRequest
from handler.errors import InvalidRequest
from pipelines.errors import ModelNotFound
from pipelines.hires import IMAGE_UPSCALERS, LATENT_MODES, HiresPlan, RefinerPlan, target_size
from pipelines.store import CheckpointEntry, ModelStore

if TYPE_CHECKING:
    from handler.runtime.upscaling import Upscaling
    from pipelines.samplers import ResolvedSampler

DEFAULT_HR_DENOISING = 0.75  # txt2img's own default (A1111's API model leaves it null, which fails there)
SAME_CHECKPOINT = ("", "Use same checkpoint", "None")  # the UI's words for "no other checkpoint"


def first_pass_size(req: Txt2ImgRequest) -> tuple[int, int]:
    """The first pass's requested size: `firstphase_width/height` when set (legacy fields; A1111 1.10 then still
    takes the hires target from hr_scale or hr_resize_x/y), else width x height."""
    if req.enable_hr and (req.firstphase_width or req.firstphase_height):
        return req.firstphase_width or req.width, req.firstphase_height or req.height
    return req.width, req.height


def hires_plan(req: Txt2ImgRequest, width: int, height: int, sampler: ResolvedSampler, store: ModelStore,
               options: dict[str, Any], max_width: int, max_height: int, prompt: str,
               upscaling: Upscaling) -> HiresPlan:
    """The hires pass of `req` for a first pass of width x height (already floored to multiples of 8).
    `prompt` is the hires prompt without its LoRA tags (those of the first pass stay active). `hr_upscaler` is a
    latent mode or any listed upscaler (404 naming it when there is no such upscaler)."""
    upscaler = req.hr_upscaler if req.hr_upscaler is not None else str(options.get("latent_upscale_default_mode", "Latent"))
    model_upscale = None
    if upscaler not in LATENT_MODES and upscaler not in IMAGE_UPSCALERS:
        upscaler = upscaling.check(upscaler, "hr_upscaler")
        model_upscale = functools.partial(upscaling.upscale, options=options)
    if not req.hr_resize_x and not req.hr_resize_y and not 1.0 <= req.hr_scale <= 8.0:
        raise InvalidRequest("hr_scale: must be between 1 and 8", field="hr_scale")
    up_w, up_h, final_w, final_h = target_size(width, height, req.hr_scale, req.hr_resize_x, req.hr_resize_y)
    size_field = "hr_resize_x" if req.hr_resize_x or req.hr_resize_y else "hr_scale"
    if up_w > max_width or up_h > max_height:
        raise InvalidRequest(f"{size_field}: the hires size {up_w}x{up_h} exceeds the {max_width}x{max_height} limit",
                             field=size_field)
    if final_w < 8 or final_h < 8:
        raise InvalidRequest(f"{size_field}: the hires size {final_w}x{final_h} is too small", field=size_field)
    strength = DEFAULT_HR_DENOISING if req.denoising_strength is None else req.denoising_strength
    hr_sampler = sampler
    if req.hr_sampler_name or req.hr_scheduler:
        hr_sampler = _resolve(req.hr_sampler_name or req.sampler_name, req.sampler_index,
                              req.hr_scheduler or req.scheduler, "hr_sampler_name" if req.hr_sampler_name else "hr_scheduler")
    if model_upscale is not None and max(up_w / width, up_h / height) > 1.0:  # A1111 runs the model only to grow
        upscaling.check_size(width, height, max(up_w / width, up_h / height), upscaler, "hr_upscaler", "the first pass")
    checkpoint = other_checkpoint(store, req.hr_checkpoint_name, "hr_checkpoint_name")
    if checkpoint is not None:
        checkpoint_arch(checkpoint, "hr_checkpoint_name")  # a file no pipeline loads is refused now, not after pass 1
    return HiresPlan(
        upscale_width=up_w, upscale_height=up_h, width=final_w, height=final_h, upscaler=upscaler,
        steps=req.hr_second_pass_steps or req.steps, denoising_strength=strength, sampler=hr_sampler,
        prompt=prompt, negative_prompt=req.hr_negative_prompt or req.negative_prompt, checkpoint=checkpoint,
        model_upscale=model_upscale)


def refiner_plan(req: Txt2ImgRequest, store: ModelStore, base: CheckpointEntry, hires: HiresPlan | None,
                 hires_pass: str) -> RefinerPlan | None:
    """The refiner of `req`, or None when it names none or `refiner_switch_at` is 1 (A1111 never switches).
    Both checkpoints must be SDXL: the switch uses the SDXL pipelines' `denoising_end` / `denoising_start`.
    With hires fix, `hires_pass` (A1111's `hires_fix_refiner_pass`, already validated) says which pass the
    refiner finishes; a hires checkpoint whose pass the refiner finishes must be SDXL too."""
    entry = other_checkpoint(store, req.refiner_checkpoint, "refiner_checkpoint")
    if entry is None:
        return None
    switch = req.refiner_switch_at
    if switch is None or not 0.0 < switch <= 1.0:
        raise InvalidRequest("refiner_switch_at: a fraction of the steps above 0 and at most 1 is required with "
                             "refiner_checkpoint", field="refiner_switch_at")
    if switch == 1.0:
        return None
    plan = RefinerPlan(checkpoint=entry, switch_at=switch, hires_pass=hires_pass if hires is not None else None)
    checked = [("sd_model_checkpoint", base), ("refiner_checkpoint", entry)]
    if hires is not None and hires.checkpoint is not None and plan.in_hires_pass:
        checked.append(("hr_checkpoint_name", hires.checkpoint))
    for field, checkpoint in checked:
        if checkpoint_arch(checkpoint, "refiner_checkpoint") != "sdxl":
            raise InvalidRequest(f"refiner_checkpoint: the refiner switch is offered for SDXL checkpoints; "
                                 f"{checkpoint.name} ({field}) is not SDXL", field="refiner_checkpoint")
    return plan


def other_checkpoint(store: ModelStore, name: str | None, field: str) -> CheckpointEntry | None:
    """The checkpoint `name` designates (any form `find_checkpoint` takes, else the first title containing it,
    as A1111's `get_closet_checkpoint_match`), None for none; unknown -> 404 naming `field`."""
    if name is None or name.strip() in SAME_CHECKPOINT:
        return None
    try:
        return store.find_checkpoint(name, field=field)
    except ModelNotFound:
        wanted = name.strip()
        for entry in sorted(store.checkpoints, key=lambda e: e.name):
            if wanted in store.title(entry):
                return entry
        raise ModelNotFound(f"{field}: checkpoint '{wanted}' not found under models/Stable-diffusion",
                            field=field) from None


def checkpoint_arch(entry: CheckpointEntry, field: str) -> str:
    """"sd1" or "sdxl" (the SDXL refiner's layout too), read from the file's header or the folder's
    model_index.json (no loading). A file of another architecture (SD 2.x) or an unreadable one is a 422 naming
    `field`."""
    from pipelines.errors import CheckpointError

    try:
        return _kind(entry)[0]
    except (CheckpointError, OSError, ValueError) as exc:
        raise InvalidRequest(f"{field}: {getattr(exc, 'message', None) or exc}", field=field) from None


def _kind(entry: CheckpointEntry) -> tuple[str, bool]:
    """(architecture, is a refiner) of a checkpoint; the header is read once per file version."""
    index = entry.path / "model_index.json" if entry.is_dir else entry.path
    stat = index.stat()
    return _read_kind(str(entry.path), entry.is_dir, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _read_kind(path: str, is_dir: bool, mtime_ns: int, size: int) -> tuple[str, bool]:
    from pipelines.loading import REFINER_CLASS, config_dir_for, refiner_config

    if is_dir:
        name = str(json.loads((Path(path) / "model_index.json").read_text()).get("_class_name", ""))
        return ("sdxl" if "XL" in name else "sd1"), name == REFINER_CLASS
    arch, config = config_dir_for(Path(path))
    return arch.value, refiner_config(config)


def check_not_refiner(entry: CheckpointEntry, field: str) -> None:
    """A checkpoint in the SDXL refiner's own layout only finishes another model's sampling: as the request's
    model it is a 422 naming `field` (it has no first text encoder and no txt2img pipeline)."""
    from pipelines.errors import CheckpointError

    try:
        refiner = _kind(entry)[1]
    except (CheckpointError, OSError, ValueError):
        return  # unreadable or another architecture: the loader's own error says so
    if refiner:
        raise InvalidRequest(f"{field}: {entry.name} is an SDXL refiner; use it as refiner_checkpoint (or "
                             "hr_checkpoint_name) with an SDXL model", field=field)


def infotext_keys(req: Txt2ImgRequest, plan: HiresPlan | None, sampler: ResolvedSampler,
                  store: ModelStore) -> dict[str, Any]:
    """The hires pass's infotext keys, in the order A1111 adds them (when the job is set up, before the
    extra networks' and the refiner's)."""
    keys: dict[str, Any] = {}
    if plan is not None:
        if plan.checkpoint is not None:
            keys["Hires checkpoint"] = _short_title(store, plan.checkpoint)
        if req.hr_sampler_name is not None and plan.sampler.sampler.name != sampler.sampler.name:
            keys["Hires sampler"] = plan.sampler.sampler.name
        if req.hr_prompt and req.hr_prompt != req.prompt:
            keys["Hires prompt"] = req.hr_prompt
        if req.hr_negative_prompt and req.hr_negative_prompt != req.negative_prompt:
            keys["Hires negative prompt"] = req.hr_negative_prompt
        if req.hr_scheduler is not None and plan.sampler.schedule_label != sampler.schedule_label:
            keys["Hires schedule type"] = plan.sampler.schedule_label
        if req.hr_resize_x or req.hr_resize_y:
            keys["Hires resize"] = f"{req.hr_resize_x}x{req.hr_resize_y}"
        else:
            keys["Hires upscale"] = req.hr_scale
        if req.hr_second_pass_steps:
            keys["Hires steps"] = req.hr_second_pass_steps
        if req.hr_upscaler is not None:
            keys["Hires upscaler"] = req.hr_upscaler
    return keys


def refiner_infotext_keys(refiner: RefinerPlan, store: ModelStore) -> dict[str, Any]:
    """The keys A1111's `apply_refiner` adds when it switches to the refiner (so only for a job whose refiner
    ran), after every other: `Hires refiner` with hires fix unless the option is its default "second pass",
    then `Refiner` and `Refiner switch at`."""
    keys: dict[str, Any] = {}
    if refiner.hires_pass is not None and refiner.hires_pass != "second pass":
        keys["Hires refiner"] = refiner.hires_pass
    keys["Refiner"] = _short_title(store, refiner.checkpoint)
    keys["Refiner switch at"] = refiner.switch_at
    return keys


def _short_title(store: ModelStore, entry: CheckpointEntry) -> str:
    """A1111's `short_title`: the file stem and the 10-hex short hash."""
    sha = store.sha256(entry)
    return f"{entry.stem} [{sha[:10]}]" if sha else entry.stem


def _resolve(name: str | None, index: str | None, scheduler: str | None, field: str) -> ResolvedSampler:
    from pipelines.errors import UnknownSampler
    from pipelines.samplers import resolve_sampler

    try:
        return resolve_sampler(name, index, scheduler)
    except UnknownSampler as exc:
        raise InvalidRequest(exc.message.replace("sampler_name", field, 1), field=field) from None
