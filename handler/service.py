"""The function's runtime: request -> validated job -> warm pipeline -> A1111 response.

One `Service` per worker process. It owns the model store, the warm pipeline cache, the options store, the
job progress and the GPU lock (one generation at a time per worker; the HTTP threads only wait on it).
Nothing heavy happens in the constructor: torch and diffusers load on first use or at warm-up.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from handler import __version__
from handler.errors import InvalidRequest, NotFound, NotReady
from handler.images import b64, decode_image
from handler.options import DEFAULT_OPTIONS, MemoryOptionsStore, OptionsStore, check_option_value
from handler.progress import Progress
from handler.schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from handler.settings import Settings
from handler.storage import LocalStorage
from pipelines.errors import ModelNotFound
from pipelines.hashing import HashCache
from pipelines.store import CheckpointEntry, ModelStore, VaeEntry

log = logging.getLogger(__name__)

EAS_KEYS = ("sd_model_checkpoint", "sd_vae", "save_dir", "image_link", "id_task", "uid")
SEED_RANGE = 4294967294  # A1111: random.randrange(4294967294)
VERSION_TAG = f"sdfunc-{__version__}"


@dataclass
class Selection:
    """The models one request runs on and the options it sees."""

    checkpoint: CheckpointEntry
    vae: VaeEntry | None
    clip_skip: int
    options: dict[str, Any]


class Service:
    """Everything a worker needs to answer requests; built by the app factory."""

    def __init__(self, settings: Settings, options_store: OptionsStore | None = None) -> None:
        self.settings = settings
        settings.ensure_layout()
        self.store = ModelStore(settings.checkpoints_dir, settings.vae_dir, HashCache(settings.cache_dir / "sha256.json"))
        self.options_store: OptionsStore = options_store or MemoryOptionsStore()
        self.storage = LocalStorage(settings.outputs_dir)
        self.progress = Progress()
        self.gpu_lock = threading.Lock()
        self.state = "STARTING"
        self.accepting = True
        self._cache = None
        self._cache_lock = threading.Lock()
        self._warm_lock = threading.Lock()
        self._warmed = False

    # models ---------------------------------------------------------------------------------------------
    @property
    def cache(self):  # -> pipelines.cache.PipelineCache (imports torch lazily)
        with self._cache_lock:
            if self._cache is None:
                from pipelines.cache import PipelineCache

                device = self.settings.resolved_device()
                self._cache = PipelineCache(
                    self.store, device=device, dtype=self.settings.resolved_dtype(device),
                    capacity=self.settings.max_loaded_models,
                )
            return self._cache

    def default_checkpoint(self, consumer: str) -> CheckpointEntry:
        """The caller's `sd_model_checkpoint` option, else the configured default, else the first found."""
        chosen = self.options_store.get(consumer).get("sd_model_checkpoint") or self.settings.default_checkpoint
        if chosen:
            return self.store.find_checkpoint(chosen)
        entries = self.store.checkpoints
        if not entries:
            raise NotReady("no checkpoint under models/Stable-diffusion; add one or run `sdfunc demo-models`")
        return entries[0]

    def warmup(self) -> dict[str, Any]:
        """Load the default checkpoint and run one tiny generation (FC initializer). Idempotent."""
        with self._warm_lock:
            if self._warmed:
                return {"status": "READY", "warmed": False}
            started = time.perf_counter()
            try:
                from warmup.initializer import warm_checkpoint

                entry = self.default_checkpoint("")
                timings = warm_checkpoint(self.cache, entry, self.gpu_lock)
            except Exception:
                self.state = "SETUP_FAILED"
                raise
            self._warmed = True
            self.state = "READY"
            seconds = time.perf_counter() - started
            log.info("warm-up done in %.2f s (checkpoint %s)", seconds, entry.name)
            threading.Thread(target=self._hash_all, name="sdfunc-hash", daemon=True).start()
            return {"status": "READY", "warmed": True, "checkpoint": entry.name, "seconds": round(seconds, 3),
                    **timings}

    def _hash_all(self) -> None:
        """Hash every checkpoint once, in the background, so listings show titles with hashes (the hashes
        persist in <data>/cache/sha256.json, so each file is read once per mount, not once per instance)."""
        for entry in self.store.checkpoints:
            try:
                self.store.sha256(entry)
            except OSError:
                log.warning("could not hash %s", entry.name)

    # options --------------------------------------------------------------------------------------------
    def get_options(self, consumer: str) -> dict[str, Any]:
        options = dict(DEFAULT_OPTIONS)
        options.update(self.options_store.get(consumer))
        try:
            entry = self.default_checkpoint(consumer)
        except (NotReady, ModelNotFound):
            return options
        sha = self.store.sha256(entry)
        options["sd_model_checkpoint"] = self.store.title(entry, compute=True)
        options["sd_checkpoint_hash"] = sha
        return options

    def set_options(self, consumer: str, values: dict[str, Any]) -> None:
        """Validate every key first (422 / 404), then store all of them: all or nothing."""
        clean: dict[str, Any] = {}
        for key, value in values.items():
            reason = check_option_value(key, value)
            if reason:
                raise InvalidRequest(f"{key}: {reason}", field=key)
            if key == "sd_model_checkpoint":
                value = self.store.title(self.store.find_checkpoint(value), compute=True)
            elif key == "sd_vae":
                self.store.find_vae(value)
            elif key == "sd_checkpoint_hash":
                continue  # derived from sd_model_checkpoint
            clean[key] = value
        self.options_store.update(consumer, clean)

    # generation -----------------------------------------------------------------------------------------
    def txt2img(self, req: Txt2ImgRequest, consumer: str) -> dict[str, Any]:
        if req.enable_hr:
            raise InvalidRequest("enable_hr: hires fix is not offered yet", field="enable_hr")
        return self._generate("txt2img", req, consumer)

    def img2img(self, req: Img2ImgRequest, consumer: str) -> dict[str, Any]:
        if not req.init_images:
            raise InvalidRequest("init_images: at least one init image is required", field="init_images")
        if len(req.init_images) > req.batch_size and len(req.init_images) > 1:
            raise InvalidRequest(
                f"init_images: {len(req.init_images)} images but batch_size is {req.batch_size}", field="init_images"
            )
        return self._generate("img2img", req, consumer)

    def _check_common(self, req: GenerationRequest) -> tuple[int, int]:
        s = self.settings
        if req.restore_faces:
            raise InvalidRequest("restore_faces: face restoration is not offered", field="restore_faces")
        if req.script_name:
            raise InvalidRequest(f"script_name: script '{req.script_name}' is not installed", field="script_name")
        if req.refiner_checkpoint:
            raise InvalidRequest("refiner_checkpoint: the refiner is not offered yet", field="refiner_checkpoint")
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            if getattr(req, name) not in (-1, 0):
                raise InvalidRequest(f"{name}: seed resize is not offered", field=name)
        for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if len(text) > s.max_prompt_chars:
                raise InvalidRequest(f"{name}: longer than {s.max_prompt_chars} characters", field=name)
        if req.steps > s.max_steps:
            raise InvalidRequest(f"steps: at most {s.max_steps}", field="steps")
        width, height = req.width // 8 * 8, req.height // 8 * 8
        if width > s.max_width:
            raise InvalidRequest(f"width: at most {s.max_width}", field="width")
        if height > s.max_height:
            raise InvalidRequest(f"height: at most {s.max_height}", field="height")
        if req.batch_size * req.n_iter > s.max_images:
            raise InvalidRequest(
                f"batch_size: batch_size x n_iter = {req.batch_size * req.n_iter} exceeds {s.max_images} images",
                field="batch_size",
            )
        return width, height

    def _select(self, req: GenerationRequest, consumer: str) -> Selection:
        """Checkpoint, VAE and clip skip for this request: EAS alwayson_scripts, then override_settings, then
        the caller's options. Per-request choices never change anyone's defaults."""
        options = dict(DEFAULT_OPTIONS)
        options.update(self.options_store.get(consumer))
        eas = _eas_values(req.alwayson_scripts)
        overrides = req.override_settings or {}
        for key, value in overrides.items():
            if key in ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"):
                reason = check_option_value(key, value)
                if reason:
                    raise InvalidRequest(f"override_settings.{key}: {reason}", field=f"override_settings.{key}")
        ckpt_name = eas.get("sd_model_checkpoint") or overrides.get("sd_model_checkpoint")
        field = "alwayson_scripts.sd_model_checkpoint" if eas.get("sd_model_checkpoint") else "override_settings.sd_model_checkpoint"
        checkpoint = (self.store.find_checkpoint(ckpt_name, field=field) if ckpt_name
                      else self.default_checkpoint(consumer))
        vae_name = eas.get("sd_vae") or overrides.get("sd_vae") or options.get("sd_vae")
        vae_field = "alwayson_scripts.sd_vae" if eas.get("sd_vae") else "override_settings.sd_vae"
        vae = self.store.find_vae(vae_name, field=vae_field) if vae_name else None
        clip_skip = int(overrides.get("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1)))
        return Selection(checkpoint=checkpoint, vae=vae, clip_skip=clip_skip, options=options)

    def _generate(self, mode: str, req: GenerationRequest, consumer: str) -> dict[str, Any]:
        from pipelines.generate import ImageJob, generate
        from pipelines.infotext import build_infotext, png_bytes
        from pipelines.samplers import resolve_sampler

        if not self.accepting:
            raise NotReady("the function is stopping; retry on another instance", headers={"Retry-After": "1"})
        if req.infotext:
            req = apply_infotext(req)
        width, height = self._check_common(req)
        eas = _check_alwayson(req.alwayson_scripts)
        selection = self._select(req, consumer)
        sampler = resolve_sampler(req.sampler_name, req.sampler_index, req.scheduler)
        total = req.batch_size * req.n_iter
        seed = _fix_seed(req.seed)
        subseed = _fix_seed(req.subseed)
        if req.subseed_strength:
            seeds, subseeds = [seed] * total, [subseed + i for i in range(total)]
        else:
            seeds, subseeds = [seed + i for i in range(total)], [subseed + i for i in range(total)]
        job = ImageJob(
            mode=mode, prompt=req.prompt, negative_prompt=req.negative_prompt, seeds=seeds, subseeds=subseeds,
            subseed_strength=req.subseed_strength, batch_size=req.batch_size, steps=req.steps,
            cfg_scale=req.cfg_scale, width=width, height=height, sampler=sampler, clip_skip=selection.clip_skip,
            tiling=bool(req.tiling if req.tiling is not None else selection.options.get("tiling")), eta=req.eta,
        )
        if isinstance(req, Img2ImgRequest):
            self._img2img_inputs(req, job, selection.options)
        model = self.cache.get(selection.checkpoint, selection.vae)
        job_no = 0

        def on_step(step: int, steps: int) -> bool:
            return self.progress.step(step, steps, job_no)

        with self.gpu_lock:
            self.progress.begin(mode, job_count=req.n_iter, sampling_steps=req.steps)
            try:
                result = generate(model, job, progress=on_step)
            finally:
                self.progress.end()

        if self.state == "STARTING":
            self.state = "READY"  # served without a warm-up: the worker is usable
        params_base = self._infotext_params(req, job, model, sampler, width, height)
        infotexts: list[str] = []
        pngs: list[bytes] = []
        for i, image in enumerate(result.images):
            params = dict(params_base)
            params["Seed"] = result.seeds[i]
            if req.subseed_strength:
                params["Variation seed"] = result.subseeds[i]
            text = build_infotext(req.prompt, req.negative_prompt, params)
            infotexts.append(text)
            pngs.append(png_bytes(image, text))
        saved: list[str] = []
        if req.save_images:
            folder = f"{mode}-images/{dt.date.today().isoformat()}"
            stamp = time.strftime("%H%M%S")
            for i, data in enumerate(pngs):
                saved.append(self.storage.put(f"{folder}/{stamp}-{_short_id()}-{result.seeds[i]}.png", data))
        parameters = req.model_dump(mode="json")
        if isinstance(req, Img2ImgRequest) and not req.include_init_images:
            parameters["init_images"] = None
            parameters["mask"] = None
        if eas:
            parameters.update(id_task=eas.get("id_task"), status="finished", image_url=",".join(saved),
                              seed=str(result.seeds[0]) if result.seeds else "", error_msg="",
                              total_time=round(result.generation_seconds, 3))
        info = self._info(req, job, model, sampler, width, height, result, infotexts, params_base)
        log.info("%s: %d image(s) %dx%d, %d steps, %.3f s generating", mode, len(pngs), width, height, req.steps,
                 result.generation_seconds)
        return {
            "images": [b64(data) for data in pngs] if req.send_images else [],
            "parameters": parameters,
            "info": json.dumps(info, ensure_ascii=False),
            "_generation_seconds": result.generation_seconds,
        }

    def _img2img_inputs(self, req: Img2ImgRequest, job: Any, options: dict[str, Any]) -> None:
        limit = self.settings.max_input_pixels
        background = str(options.get("img2img_background_color", "#ffffff"))
        job.init_images = [decode_image(data, field=f"init_images.{i}", max_pixels=limit, background=background)
                           for i, data in enumerate(req.init_images or [])]
        if len(job.init_images) > 1:
            job.batch_size = len(job.init_images)
            if len(job.seeds) % job.batch_size:
                raise InvalidRequest("init_images: batch_size x n_iter must be a multiple of the number of init images",
                                     field="init_images")
        job.denoising_strength = req.denoising_strength
        job.resize_mode = req.resize_mode
        if req.mask:
            job.mask = decode_image(req.mask, field="mask", max_pixels=limit, background="#000000")
            blur = req.mask_blur
            job.mask_blur_x = req.mask_blur_x if blur is None else blur
            job.mask_blur_y = req.mask_blur_y if blur is None else blur
            job.inpainting_fill = req.inpainting_fill
            job.inpaint_full_res = req.inpaint_full_res
            job.inpaint_full_res_padding = req.inpaint_full_res_padding
            job.inpainting_mask_invert = bool(req.inpainting_mask_invert)

    def _infotext_params(self, req: GenerationRequest, job: Any, model: Any, sampler: Any, width: int,
                         height: int) -> dict[str, Any]:
        """The infotext keys shared by every image of the request (Seed is set per image)."""
        params: dict[str, Any] = {
            "Steps": req.steps,
            "Sampler": sampler.sampler.name,
            "Schedule type": sampler.schedule_label,
            "CFG scale": req.cfg_scale,
            "Seed": None,
            "Size": f"{width}x{height}",
            "Model hash": model.short_hash,
            "Model": model.entry.stem,
            "VAE hash": model.vae_sha256[:10] if model.vae_sha256 else None,
            "VAE": model.vae.name if model.vae else None,
            "Variation seed": None,
            "Variation seed strength": req.subseed_strength or None,
            "Denoising strength": job.denoising_strength if job.mode == "img2img" else None,
            "Clip skip": job.clip_skip if job.clip_skip > 1 else None,
            "RNG": "CPU",
            "Tiling": True if job.tiling else None,
        }
        if req.eta is not None and req.eta != _default_eta(sampler.sampler.name):
            params["Eta"] = req.eta
        if job.mode == "img2img" and job.mask is not None:
            params["Mask blur"] = job.mask_blur_x if job.mask_blur_x == job.mask_blur_y else None
            if params["Mask blur"] is None:
                params["Mask blur x"], params["Mask blur y"] = job.mask_blur_x, job.mask_blur_y
            if job.inpainting_mask_invert:
                params["Mask mode"] = "Inpaint not masked"
            params["Masked content"] = ("fill", "original", "latent noise", "latent nothing")[job.inpainting_fill]
            if job.inpaint_full_res:
                params["Inpaint area"] = "Only masked"
                params["Masked area padding"] = job.inpaint_full_res_padding
        params["Version"] = VERSION_TAG
        return params

    def _info(self, req: GenerationRequest, job: Any, model: Any, sampler: Any, width: int, height: int,
              result: Any, infotexts: list[str], params: dict[str, Any]) -> dict[str, Any]:
        """A1111's `info` object, keys in A1111's order."""
        n = len(result.images)
        extra = {k: v for k, v in params.items() if k in ("Schedule type", "Eta", "Mask blur", "Masked content",
                                                          "Inpaint area", "Masked area padding", "RNG")
                 and v is not None}
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
            "width": width,
            "height": height,
            "sampler_name": sampler.sampler.name,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": job.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": model.entry.stem,
            "sd_model_hash": model.short_hash,
            "sd_vae_name": model.vae.name if model.vae else None,
            "sd_vae_hash": model.vae_sha256[:10] if model.vae_sha256 else None,
            "seed_resize_from_w": req.seed_resize_from_w,
            "seed_resize_from_h": req.seed_resize_from_h,
            "denoising_strength": job.denoising_strength if job.mode == "img2img" else req.denoising_strength,
            "extra_generation_params": extra,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": list(req.styles or []),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": job.clip_skip,
            "is_using_inpainting_conditioning": bool(job.mode == "img2img" and job.mask is not None
                                                     and model.pipe.unet.config.in_channels == 9),
            "version": VERSION_TAG,
        }


# Infotext keys -> request fields and how to read their text (A1111 fills the fields a request did not set).
_INFOTEXT_FIELDS: tuple[tuple[str, str, type], ...] = (
    ("Prompt", "prompt", str), ("Negative prompt", "negative_prompt", str), ("Steps", "steps", int),
    ("Sampler", "sampler_name", str), ("Schedule type", "scheduler", str), ("CFG scale", "cfg_scale", float),
    ("Seed", "seed", int), ("Size-1", "width", int), ("Size-2", "height", int),
    ("Denoising strength", "denoising_strength", float), ("Variation seed", "subseed", int),
    ("Variation seed strength", "subseed_strength", float),
)


def apply_infotext(req: GenerationRequest) -> GenerationRequest:
    """A copy of `req` whose fields the client did not set are taken from `req.infotext` (A1111's `infotext`
    request field). The result is validated like any request; unreadable values are a 422 naming `infotext`."""
    from pydantic import ValidationError

    from pipelines.infotext import parse_infotext

    parsed = parse_infotext(req.infotext)
    values = req.model_dump()
    for key, name, kind in _INFOTEXT_FIELDS:
        if name in req.model_fields_set or key not in parsed or name not in values:
            continue
        text = str(parsed[key])
        try:
            values[name] = kind(float(text)) if kind is int else kind(text)
        except ValueError:
            raise InvalidRequest(f"infotext: '{key}' has an unreadable value", field="infotext") from None
    if "Clip skip" in parsed and "CLIP_stop_at_last_layers" not in (req.override_settings or {}):
        try:
            clip_skip = int(str(parsed["Clip skip"]))
        except ValueError:
            raise InvalidRequest("infotext: 'Clip skip' has an unreadable value", field="infotext") from None
        if clip_skip > 1:
            values["override_settings"] = {**(req.override_settings or {}), "CLIP_stop_at_last_layers": clip_skip}
    try:
        return type(req).model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequest(f"infotext: gives an invalid {field}: {first.get('msg')}", field="infotext") from None


def _fix_seed(seed: int | None) -> int:
    return random.randrange(SEED_RANGE) if seed is None or seed == -1 else int(seed)


def _short_id() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


def _default_eta(sampler_name: str) -> float:
    return 0.0 if sampler_name.startswith(("DDIM", "PLMS", "UniPC")) else 1.0


def _eas_values(scripts: dict[str, Any]) -> dict[str, Any]:
    """PAI-EAS keys of alwayson_scripts as plain values (EAS sends strings; `{"args": [v]}` is accepted too)."""
    values: dict[str, Any] = {}
    for key in EAS_KEYS:
        if key not in scripts:
            continue
        value = scripts[key]
        if isinstance(value, dict):
            args = value.get("args") or []
            value = args[0] if args else None
        values[key] = value
    return values


def _check_alwayson(scripts: dict[str, Any]) -> dict[str, Any]:
    """Validate alwayson_scripts and return the EAS values. `{"args": []}` for a script we lack is ignored
    (webuiapi adds such entries); any other unknown script is a 422 naming it."""
    for key, value in scripts.items():
        if key in EAS_KEYS:
            continue
        if isinstance(value, dict) and not value.get("args"):
            continue
        raise InvalidRequest(f"alwayson_scripts.{key}: script '{key}' is not installed", field=f"alwayson_scripts.{key}")
    eas = _eas_values(scripts)
    for key in ("sd_model_checkpoint", "sd_vae", "id_task", "uid", "save_dir", "image_link"):
        value = eas.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"alwayson_scripts.{key}: must be a string", field=f"alwayson_scripts.{key}")
    if eas.get("save_dir"):
        raise InvalidRequest("alwayson_scripts.save_dir: saving to a folder is not offered yet; use save_images",
                             field="alwayson_scripts.save_dir")
    if eas.get("image_link"):
        raise InvalidRequest("alwayson_scripts.image_link: fetching images by URL is not offered yet",
                             field="alwayson_scripts.image_link")
    return eas
