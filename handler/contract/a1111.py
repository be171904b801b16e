"""A1111 request and response details that are format, not orchestration: seeds, the PAI-EAS keys of
`alwayson_scripts`, the `infotext` request field, the infotext keys of a generation, and the `info` object."""

from __future__ import annotations

import math
import random
import time
from typing import Any

from handler import __version__
from handler.contract.schemas import GenerationRequest
from handler.errors import InvalidRequest

MAX_TASK_ID = 200  # characters of a task id followed for progress (A1111's force_task_id limit here)
EAS_KEYS = ("sd_model_checkpoint", "sd_vae", "save_dir", "image_link", "id_task", "uid", "save_to_db")
SCRIPTS = ("controlnet",)  # always-on scripts sdfunc implements (keys matched case-insensitively, as A1111 does)
_FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
SEED_RANGE = 4294967294  # A1111: random.randrange(4294967294)
VERSION_TAG = f"sdfunc-{__version__}"

# Samplers whose eta sdfunc applies, with A1111's infotext key and default (written only when different).
# A1111 also records Eta for its k-diffusion ancestral/SDE samplers, whose diffusers twins take no eta: there
# it is not applied, so it is not written (docs/samplers.md).
ETA_KEYS: dict[str, tuple[str, float]] = {"DDIM": ("Eta DDIM", 0.0), "DDIM CFG++": ("Eta DDIM", 0.0)}


def fix_seed(seed: int | None) -> int:
    """-1 / None -> a random seed in A1111's range; anything else as given."""
    return random.randrange(SEED_RANGE) if seed is None or seed == -1 else int(seed)


def all_seeds(req: GenerationRequest) -> tuple[list[int], list[int]]:
    """Per-image seeds and variation seeds: image i gets seed + i, except with a variation strength, where
    every image keeps the seed and only the variation seed advances."""
    total = req.batch_size * req.n_iter
    seed, subseed = fix_seed(req.seed), fix_seed(req.subseed)
    subseeds = [subseed + i for i in range(total)]
    if req.subseed_strength:
        return [seed] * total, subseeds
    return [seed + i for i in range(total)], subseeds


def eas_values(scripts: dict[str, Any]) -> dict[str, Any]:
    """Validate `alwayson_scripts` and return its PAI-EAS keys as plain strings.

    EAS sends plain strings; `{"args": [value]}` is accepted too. `{"args": []}` for a script sdfunc lacks is
    ignored (webuiapi adds such entries); any other unknown script is a 422 naming it."""
    values: dict[str, Any] = {}
    for key, value in scripts.items():
        field = f"alwayson_scripts.{key}"
        if key.lower() in SCRIPTS:  # a script sdfunc runs: its args are read by its own parser
            continue
        if key not in EAS_KEYS:
            if isinstance(value, dict) and value.get("args") in (None, []):
                continue
            raise InvalidRequest(f"{field}: script '{key}' is not installed", field=field)
        if isinstance(value, dict):
            args = value.get("args")
            if not isinstance(args, list):
                raise InvalidRequest(f"{field}: 'args' must be a list", field=field)
            value = args[0] if args else None
        if key == "save_to_db":  # the RDS plugin's per-request "Save to DataBase" switch
            flag = value if value is None or isinstance(value, bool) else _FLAGS.get(str(value).strip().lower())
            if value is not None and flag is None:
                raise InvalidRequest(f"{field}: must be true or false", field=field)
            if flag is not None:
                values[key] = flag
            continue
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"{field}: must be a string", field=field)
        values[key] = value
    link = values.get("image_link")
    if link and (len(link) > 2048 or not link.lower().startswith(("http://", "https://"))):
        raise InvalidRequest("alwayson_scripts.image_link: an http or https URL of at most 2048 characters "
                             "is required", field="alwayson_scripts.image_link")
    return values


def task_ids(req: GenerationRequest) -> list[str]:
    """The ids a generation request's progress is asked for by (POST /internal/progress, GET /tasks/<id>): PAI-EAS
    `alwayson_scripts.id_task` (an asynchronous task's id; the task runner sets it) and A1111's `force_task_id`.
    Never raises: a malformed value is the plan's 422, and no id here; ids over MAX_TASK_ID characters are none."""
    value = req.alwayson_scripts.get("id_task")
    if isinstance(value, dict):
        args = value.get("args")
        value = args[0] if isinstance(args, list) and args else None
    ids = [v for v in (value, req.force_task_id) if isinstance(v, str) and 0 < len(v) <= MAX_TASK_ID]
    return list(dict.fromkeys(ids))


# Infotext keys -> request fields and how to read their text (A1111 fills the fields a request did not set).
_INFOTEXT_FIELDS: tuple[tuple[str, str, type], ...] = (
    ("Prompt", "prompt", str), ("Negative prompt", "negative_prompt", str), ("Steps", "steps", int),
    ("Sampler", "sampler_name", str), ("Schedule type", "scheduler", str), ("CFG scale", "cfg_scale", float),
    ("Seed", "seed", int), ("Size-1", "width", int), ("Size-2", "height", int),
    ("Denoising strength", "denoising_strength", float), ("Variation seed", "subseed", int),
    ("Variation seed strength", "subseed_strength", float),
)


def _read_number(key: str, text: str, kind: type) -> Any:
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequest(f"infotext: '{key}' has an unreadable value", field="infotext") from None
    if not math.isfinite(value) or (kind is int and abs(value) > 2**63):
        raise InvalidRequest(f"infotext: '{key}' is out of range", field="infotext")
    return int(value) if kind is int else value


def apply_infotext(req: GenerationRequest) -> GenerationRequest:
    """A copy of `req` whose fields the client did not set are taken from `req.infotext` (A1111's `infotext`
    request field). The result is validated like any request; unreadable values are a 422 naming `infotext`.
    Its `model_fields_set` are the fields the client set plus those the infotext gave (so that "sent explicitly"
    still means what the client sent, e.g. `send_images`)."""
    from pydantic import ValidationError

    from pipelines.infotext import parse_infotext

    parsed = parse_infotext(req.infotext)
    values = req.model_dump(exclude_unset=True)
    for key, name, kind in _INFOTEXT_FIELDS:
        if name in req.model_fields_set or key not in parsed or name not in type(req).model_fields:
            continue
        text = str(parsed[key])
        values[name] = text if kind is str else _read_number(key, text, kind)
    if "Clip skip" in parsed and "CLIP_stop_at_last_layers" not in (req.override_settings or {}):
        clip_skip = _read_number("Clip skip", str(parsed["Clip skip"]), int)
        if clip_skip > 1:
            values["override_settings"] = {**(req.override_settings or {}), "CLIP_stop_at_last_layers": clip_skip}
    try:
        return type(req).model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequest(f"infotext: gives an invalid {field}: {first.get('msg')}", field="infotext") from None


def extra_params(req: GenerationRequest, job: Any) -> dict[str, Any]:
    """A1111's `extra_generation_params` for this job, in A1111's order (also `info.extra_generation_params`)."""
    extras: dict[str, Any] = {"Schedule type": job.sampler.schedule_label}
    eta_key = ETA_KEYS.get(job.sampler.sampler.name)
    if eta_key and req.eta is not None and req.eta != eta_key[1]:
        extras[eta_key[0]] = req.eta
    if job.mode == "img2img" and job.mask is not None:
        if job.inpainting_mask_invert:
            extras["Mask mode"] = "Inpaint not masked"
        if job.mask_blur_x == job.mask_blur_y and job.mask_blur_x > 0:
            extras["Mask blur"] = job.mask_blur_x
        if job.inpaint_full_res:
            extras["Inpaint area"] = "Only masked"
            extras["Masked area padding"] = job.inpaint_full_res_padding
        if job.inpainting_fill == 0:
            extras["Masked content"] = "fill"
    return extras


def infotext_params(req: GenerationRequest, job: Any, model: Any, extras: dict[str, Any]) -> dict[str, Any]:
    """The infotext keys shared by every image of the request (Seed and Variation seed are set per image)."""
    return {
        "Steps": job.steps,
        "Sampler": job.sampler.sampler.name,
        "CFG scale": job.cfg_scale,
        "Seed": None,
        "Face restoration": job.face_restorer,
        "Size": f"{job.width}x{job.height}",
        "Model hash": model.short_hash,
        "Model": model.entry.stem,
        "VAE hash": model.vae_sha256[:10] if model.vae_sha256 else None,
        "VAE": model.vae.name if model.vae else None,
        "Variation seed": None,
        "Variation seed strength": job.subseed_strength or None,
        "Denoising strength": job.denoising_strength if job.mode == "img2img" or job.hires is not None else None,
        "Clip skip": job.clip_skip if job.clip_skip > 1 else None,
        "RNG": "CPU",
        "Tiling": True if job.tiling else None,
        **extras,
        "Version": VERSION_TAG,
    }


def image_infotext(prompt: str, negative_prompt: str, params: dict[str, Any], seed: int, subseed: int | None) -> str:
    """The infotext of one image."""
    from pipelines.infotext import build_infotext

    return build_infotext(prompt, negative_prompt, {**params, "Seed": seed, "Variation seed": subseed})


def info_object(req: GenerationRequest, job: Any, model: Any, result: Any, infotexts: list[str],
                extras: dict[str, Any], index_of_first_image: int = 0) -> dict[str, Any]:
    """A1111's `info` object (the JSON string in the txt2img / img2img response), keys in A1111's order;
    `infotexts` has the grid's first when `index_of_first_image` is 1."""
    n = len(result.images)
    return {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n,
        "seed": result.seeds[0] if result.seeds else job.seeds[0],
        "all_seeds": result.seeds,
        "subseed": result.subseeds[0] if result.subseeds else job.subseeds[0],
        "all_subseeds": result.subseeds,
        "subseed_strength": req.subseed_strength,
        "width": job.width,
        "height": job.height,
        "sampler_name": job.sampler.sampler.name,
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": job.batch_size,
        "restore_faces": job.face_restorer is not None,
        "face_restoration_model": job.face_restorer,
        "sd_model_name": model.entry.stem,
        "sd_model_hash": model.short_hash,
        "sd_vae_name": model.vae.name if model.vae else None,
        "sd_vae_hash": model.vae_sha256[:10] if model.vae_sha256 else None,
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": (job.denoising_strength if job.mode == "img2img" or job.hires is not None
                               else req.denoising_strength),
        "extra_generation_params": extras,
        "index_of_first_image": index_of_first_image,
        "infotexts": infotexts,
        "styles": list(req.styles or []),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": job.clip_skip,
        "is_using_inpainting_conditioning": bool(job.mode == "img2img" and job.mask is not None
                                                 and model.pipe.unet.config.in_channels == 9),
        "version": VERSION_TAG,
    }
