"""Planning: a parsed A1111 / PAI-EAS generation request -> a complete, validated generation plan.

The plan holds everything the device needs (handler.runtime.flow runs it): the checkpoint, VAE and clip skip
(`Selection`), the sampler, seeds, LoRAs, the img2img inputs, the second stage (hires fix or refiner,
handler.runtime.stages), the ControlNet units with their detected maps, and where outputs go. Every refusal
(422 naming the field, 404 for an unknown model) is raised here, before any device work; the checks run in a
fixed order so that the same field is named when several are wrong. Input images given by URL (PAI-EAS
`image_link`) are fetched here too, through handler.security.netguard.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from handler.contract import a1111
from handler.contract.images import decode_image, read_image
from handler.contract.options import check_option_value
from handler.contract.schemas import GenerationRequest, Img2ImgRequest, Txt2ImgRequest
from handler.errors import InvalidRequest
from handler.runtime import stages
from handler.runtime.consumer_options import ConsumerOptions
from handler.runtime.controlnets import ControlNets
from handler.runtime.upscaling import Upscaling
from handler.settings import Settings
from handler.storage import outputs
from handler.storage.backends import Storage
from pipelines.adapters.lora import LoraStore
from pipelines.store import CheckpointEntry, ModelStore, VaeEntry
from pipelines.styles import StyleStore

# override_settings keys whose values are checked before any work (others are taken as A1111 takes them)
_CHECKED_OVERRIDES = frozenset({"sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "n_rows",
                                "grid_prevent_empty_spots", "grid_only_if_multiple", "hires_fix_refiner_pass"})
IMAGE_LINK_FIELD = "alwayson_scripts.image_link"


@dataclass
class Selection:
    """The models one request runs on and the options it sees."""

    checkpoint: CheckpointEntry
    vae: VaeEntry | None
    clip_skip: int
    options: dict[str, Any]


@dataclass
class Plan:
    """A validated generation: `job` (pipelines.generate.ImageJob) on the `selection`'s models. `req` is the
    request with its infotext and styles applied (what the infotexts describe); `sent` is the request as sent
    (what the response's `parameters` echo); `eas` its PAI-EAS `alwayson_scripts` values."""

    mode: str
    sent: GenerationRequest
    req: GenerationRequest
    eas: dict[str, Any]
    job: Any
    selection: Selection


def require_init_image(req: Img2ImgRequest) -> None:
    """img2img needs exactly one source of its input image: `init_images` or PAI-EAS `alwayson_scripts.image_link`.
    Neither is a 422 naming init_images; both (non-empty) a 422 naming alwayson_scripts.image_link, rather than
    silently dropping one of them."""
    image_link = a1111.eas_values(req.alwayson_scripts).get("image_link")
    if req.init_images and image_link:
        raise InvalidRequest(f"{IMAGE_LINK_FIELD}: give the input image either as init_images or as image_link, "
                             "not both", field=IMAGE_LINK_FIELD)
    if not req.init_images and not image_link:
        raise InvalidRequest("init_images: at least one init image (or alwayson_scripts.image_link) is required",
                             field="init_images")


class Planner:
    """Turns requests into plans for one worker. Reads the models folders, the consumer's options and the
    settings (limits) at call time; never touches the device."""

    def __init__(self, settings: Settings, *, store: ModelStore, loras: LoraStore, styles: StyleStore,
                 options: ConsumerOptions, storage: Storage, controlnets: ControlNets, upscaling: Upscaling) -> None:
        self.settings = settings
        self.store = store
        self.loras = loras
        self.styles = styles
        self.options = options
        self.storage = storage
        self.controlnets = controlnets
        self.upscaling = upscaling

    # entry points ---------------------------------------------------------------------------------------
    def img2img_request(self, req: Img2ImgRequest) -> Img2ImgRequest:
        """The img2img checks made before admission (`require_init_image`: one input image source), and the PAI-EAS
        `image_link` fetched into `init_images` (a slow link must not hold a place in the queue). The request it
        returns holds the fetched image and still names the link: plan it, never check it again."""
        require_init_image(req)
        if len(req.init_images or []) > req.batch_size:
            raise InvalidRequest(
                f"init_images: {len(req.init_images)} images but batch_size is {req.batch_size}", field="init_images"
            )
        if not req.init_images:
            req = req.model_copy(update={"init_images": [self._fetch_image_link(req)]})
        return req

    def plan(self, mode: str, req: GenerationRequest, consumer: str) -> Plan:
        """The complete plan of `req` for `consumer`, or the refusal."""
        req = self._completed(req)
        sent, req = req, self.styled(req)
        eas = a1111.eas_values(req.alwayson_scripts)
        job, selection = self._build_job(mode, req, consumer, eas)
        return Plan(mode=mode, sent=sent, req=req, eas=eas, job=job, selection=selection)

    def validate(self, req: GenerationRequest, consumer: str) -> None:
        """The checks a generation makes before any device work (img2img's input image source, limits, models,
        sampler, stages, ControlNet units), without fetching or decoding its images or detecting its control maps:
        a task is refused at submission."""
        from pipelines.samplers import resolve_sampler

        if isinstance(req, Img2ImgRequest):
            require_init_image(req)
        req = self.styled(self._completed(req))
        width, height = self._check_common(req)
        selection = self._select(req, consumer, a1111.eas_values(req.alwayson_scripts))
        sampler = resolve_sampler(req.sampler_name, req.sampler_index, req.scheduler)
        self.loras.resolve(req.prompt, apply=not req.disable_extra_networks)
        hires, refiner = self._stages(req, width, height, sampler, selection)
        self._control_units(req, selection, hires, refiner)

    def _completed(self, req: GenerationRequest) -> GenerationRequest:
        """`req` as it runs: the fields its infotext gives, then the deployment's defaults for what is left out."""
        return self.deployment_defaults(a1111.apply_infotext(req) if req.infotext else req)

    def deployment_defaults(self, req: GenerationRequest) -> GenerationRequest:
        """`req` with the A1111 defaults it left out (width, height 512; steps 50) lowered to this deployment's
        limits, as the served document states them: leaving a field out is never refused."""
        s = self.settings
        update = {name: limit for name, limit in (("width", s.max_width), ("height", s.max_height),
                                                  ("steps", s.max_steps))
                  if name not in req.model_fields_set and getattr(req, name) > limit}
        return req.model_copy(update=update) if update else req

    def styled(self, req: GenerationRequest) -> GenerationRequest:
        """`req` with its `styles` applied to the prompts (hires prompts too, when given), as A1111 does
        before anything else; 422 naming `styles.<i>` for an unknown style."""
        if not req.styles:
            return req
        update: dict[str, Any] = {}
        update["prompt"], update["negative_prompt"] = self.styles.apply(req.prompt, req.negative_prompt, req.styles)
        if isinstance(req, Txt2ImgRequest) and (req.hr_prompt or req.hr_negative_prompt):
            hr, hr_negative = self.styles.apply(req.hr_prompt or req.prompt, req.hr_negative_prompt or req.negative_prompt,
                                                req.styles)
            update["hr_prompt"] = hr if req.hr_prompt else ""
            update["hr_negative_prompt"] = hr_negative if req.hr_negative_prompt else ""
        return req.model_copy(update=update)

    # the checks, in order -------------------------------------------------------------------------------
    def _check_common(self, req: GenerationRequest) -> tuple[int, int]:
        """The limits and refusals every generation shares; the first pass's size, floored to multiples of 8."""
        s = self.settings
        if req.script_name:
            raise InvalidRequest(f"script_name: script '{req.script_name}' is not installed", field="script_name")
        if not isinstance(req, Txt2ImgRequest) and stages.other_checkpoint(self.store, req.refiner_checkpoint,
                                                                        "refiner_checkpoint") is not None:
            raise InvalidRequest("refiner_checkpoint: the refiner is offered for txt2img", field="refiner_checkpoint")
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            if getattr(req, name) not in (-1, 0):
                raise InvalidRequest(f"{name}: seed resize is not offered", field=name)
        texts = [("prompt", req.prompt, None), ("negative_prompt", req.negative_prompt, None)]
        if isinstance(req, Txt2ImgRequest) and req.enable_hr:
            # bounded by max_steps, checked below: an alternation lists every step
            hires_steps = min(req.hr_second_pass_steps or req.steps, s.max_steps)
            texts += [("hr_prompt", req.hr_prompt, hires_steps), ("hr_negative_prompt", req.hr_negative_prompt,
                                                                 hires_steps)]
        from pipelines.errors import InvalidParameter
        from pipelines.prompts import check_prompt

        for name, text, hires_steps in texts:
            if len(text) > s.max_prompt_chars:
                raise InvalidRequest(f"{name}: longer than {s.max_prompt_chars} characters", field=name)
            try:  # malformed schedules and weights such as `(word:1.2.3)`; the message never quotes the prompt
                check_prompt(text, name, min(req.steps, s.max_steps), negative=name.endswith("negative_prompt"),
                             hires_steps=hires_steps)
            except InvalidParameter as e:
                raise InvalidRequest(str(e), field=name) from None
        if req.steps > s.max_steps:
            raise InvalidRequest(f"steps: at most {s.max_steps}", field="steps")
        width, height = stages.first_pass_size(req) if isinstance(req, Txt2ImgRequest) else (req.width, req.height)
        width, height = width // 8 * 8, height // 8 * 8
        for name, size in (("firstphase_width", width), ("firstphase_height", height)):
            if size < 8:  # only the legacy first-pass fields can get here (width and height are at least 8)
                raise InvalidRequest(f"{name}: at least 8", field=name)
        if isinstance(req, Txt2ImgRequest) and req.enable_hr and req.hr_second_pass_steps > s.max_steps:
            raise InvalidRequest(f"hr_second_pass_steps: at most {s.max_steps}", field="hr_second_pass_steps")
        for name, sent, size, limit in (("width", req.width, width, s.max_width),
                                        ("height", req.height, height, s.max_height)):
            if sent // 8 * 8 > limit:  # floored, as it is used; the document's maximum is limit // 8 * 8 + 7
                raise InvalidRequest(f"{name}: at most {limit}", field=name)
            if size > limit:  # a legacy first pass (firstphase_width / _height) over the limit
                raise InvalidRequest(f"firstphase_{name}: the first pass is at most {limit}",
                                     field=f"firstphase_{name}")
        if req.batch_size * req.n_iter > s.max_images:
            field = "batch_size" if req.batch_size > s.max_images else "n_iter"  # the one that tipped it over
            raise InvalidRequest(
                f"{field}: batch_size x n_iter = {req.batch_size * req.n_iter} exceeds {s.max_images} images",
                field=field,
            )
        outputs.check_request(req, self.storage, s.outputs_dir)  # a bad save_dir is a 422 before any work
        return width, height

    def _select(self, req: GenerationRequest, consumer: str, eas: dict[str, Any]) -> Selection:
        """Checkpoint, VAE and clip skip for this request: EAS alwayson_scripts, then override_settings, then
        the caller's options. Per-request choices never change anyone's defaults."""
        options = self.options.options(consumer)
        overrides = req.override_settings or {}
        for key, value in overrides.items():
            if key in _CHECKED_OVERRIDES:
                reason = check_option_value(key, value)
                if reason:
                    raise InvalidRequest(f"override_settings.{key}: {reason}", field=f"override_settings.{key}")
        ckpt_name = eas.get("sd_model_checkpoint") or overrides.get("sd_model_checkpoint")
        field = ("alwayson_scripts.sd_model_checkpoint" if eas.get("sd_model_checkpoint")
                 else "override_settings.sd_model_checkpoint")
        checkpoint = (self.store.find_checkpoint(ckpt_name, field=field) if ckpt_name
                      else self.options.checkpoint_or_default(options["sd_model_checkpoint"]))
        stages.check_not_refiner(checkpoint, field if ckpt_name else "sd_model_checkpoint")
        vae_name = eas.get("sd_vae") or overrides.get("sd_vae") or options.get("sd_vae")
        vae_field = "alwayson_scripts.sd_vae" if eas.get("sd_vae") else "override_settings.sd_vae"
        vae = self.store.find_vae(vae_name, field=vae_field) if vae_name else None
        clip_skip = int(overrides.get("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1)))
        return Selection(checkpoint=checkpoint, vae=vae, clip_skip=clip_skip, options=options)

    def _build_job(self, mode: str, req: GenerationRequest, consumer: str,
                   eas: dict[str, Any]) -> tuple[Any, Selection]:
        from pipelines.generate import ImageJob
        from pipelines.samplers import resolve_sampler

        width, height = self._check_common(req)
        selection = self._select(req, consumer, eas)
        sampler = resolve_sampler(req.sampler_name, req.sampler_index, req.scheduler)
        seeds, subseeds = a1111.all_seeds(req)
        prompt, loras = self.loras.resolve(req.prompt, apply=not req.disable_extra_networks)
        job = ImageJob(
            mode=mode, prompt=prompt, negative_prompt=req.negative_prompt, seeds=seeds, subseeds=subseeds,
            subseed_strength=req.subseed_strength, batch_size=req.batch_size, steps=req.steps,
            cfg_scale=req.cfg_scale, width=width, height=height, sampler=sampler, clip_skip=selection.clip_skip,
            clip_skip_field=("override_settings.CLIP_stop_at_last_layers"
                             if "CLIP_stop_at_last_layers" in (req.override_settings or {}) else None),
            tiling=bool(req.tiling if req.tiling is not None else selection.options.get("tiling")),
            eta=req.eta if sampler.sampler.name in a1111.ETA_KEYS else None, loras=loras,
        )
        if isinstance(req, Img2ImgRequest):
            self._img2img_inputs(req, job, selection.options)
            self._img2img_upscaler(req, job, selection.options)
        self._face_restoration(req, job, selection.options)
        job.hires, job.refiner = self._stages(req, width, height, sampler, selection)
        if job.hires is not None:
            job.denoising_strength = job.hires.denoising_strength
        job.controls = self._controls(req, job, selection)
        return job, selection

    def _option(self, req: GenerationRequest, options: dict[str, Any], key: str) -> tuple[Any, str]:
        """An option's value for this request (override_settings, then the caller's options) and the field that
        names it in a 422."""
        overrides = req.override_settings or {}
        if key in overrides:
            return overrides[key], f"override_settings.{key}"
        return options.get(key), key

    def _img2img_upscaler(self, req: Img2ImgRequest, job: Any, options: dict[str, Any]) -> None:
        """A1111's `upscaler_for_img2img` option: the upscaler that enlarges init images (checked: 404 / 422)."""
        name, field = self._option(req, options, "upscaler_for_img2img")
        if name in (None, "", "None"):
            return
        job.init_upscaler = self.upscaling.check(str(name), field)
        if job.init_upscaler == "None":
            return
        job.init_upscale = functools.partial(self.upscaling.upscale, options=options)
        if job.resize_mode == 3:  # latent upscale: A1111 does not resize the init images
            return
        for i, image in enumerate(job.init_images):  # the model's passes stay within the pixel limit
            ratios = (job.width / image.width, job.height / image.height)
            scale = min(ratios) if job.resize_mode == 2 else max(ratios)
            if scale > 1.0:
                self.upscaling.check_size(image.width, image.height, scale, job.init_upscaler, "init_images",
                                          f"init image {i}")

    def _face_restoration(self, req: GenerationRequest, job: Any, options: dict[str, Any]) -> None:
        """`restore_faces` (null: the `face_restoration` option) with the `face_restoration_model` option: a 422
        naming the field when no restorer is installed or CodeFormer is asked for."""
        restore = req.restore_faces
        if restore is None:
            value, _ = self._option(req, options, "face_restoration")
            restore = bool(value)
        if not restore:
            return
        name, field = self._option(req, options, "face_restoration_model")
        if self.upscaling.faces.restorer is None or not field.startswith("override_settings."):
            field = "restore_faces"  # the request's field (an option is not one); or what to install is the answer
        job.face_restorer = self.upscaling.check_restorer(str(name or "GFPGAN"), field)
        weight, _ = self._option(req, options, "code_former_weight")
        job.restore_faces = functools.partial(self.upscaling.restore, name=job.face_restorer,
                                              weight=float(weight if weight is not None else 0.5))

    def _stages(self, req: GenerationRequest, width: int, height: int, sampler: Any,
                selection: Selection) -> tuple[Any, Any]:
        """The hires plan and the refiner plan of a txt2img request (None, None otherwise); 422 / 404 for
        fields that cannot be honoured. The `hires_fix_refiner_pass` option (override_settings, then the
        caller's options) says which pass a refiner finishes when both are asked for."""
        if not isinstance(req, Txt2ImgRequest):
            return None, None
        hires = None
        if req.enable_hr:
            hr_prompt, _ = self.loras.resolve(req.hr_prompt or req.prompt, apply=False)
            hires = stages.hires_plan(req, width, height, sampler, self.store, selection.options,
                                      self.settings.max_width, self.settings.max_height, hr_prompt, self.upscaling)
        hires_pass = (req.override_settings or {}).get("hires_fix_refiner_pass",
                                                      selection.options.get("hires_fix_refiner_pass", "second pass"))
        return hires, stages.refiner_plan(req, self.store, selection.checkpoint, hires, str(hires_pass))

    def _img2img_inputs(self, req: Img2ImgRequest, job: Any, options: dict[str, Any]) -> None:
        """The init images (decoded within the pixel limit), the mask and the inpainting fields onto `job`."""
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

    # ControlNet -----------------------------------------------------------------------------------------
    def _control_units(self, req: GenerationRequest, selection: Selection, hires: Any,
                       refiner: Any) -> list[tuple[Any, Any]]:
        """The ControlNet units of `req` with their model entries: parsed, models found (404) and matched to
        the checkpoint's architecture (422), all before any device work."""
        from pipelines.controlnet.loading import check_compatible
        from pipelines.controlnet.units import controlnet_script_args, parse_units

        found = controlnet_script_args(req.alwayson_scripts)
        if found is None:
            return []
        prefix, value = found
        units = parse_units(value, prefix, img2img=isinstance(req, Img2ImgRequest))
        if not units:
            return []
        if refiner is not None:
            raise InvalidRequest("refiner_checkpoint: the refiner together with ControlNet is not offered",
                                 field="refiner_checkpoint")
        archs = [stages.checkpoint_arch(selection.checkpoint, "sd_model_checkpoint")]
        if hires is not None and hires.checkpoint is not None:
            archs.append(stages.checkpoint_arch(hires.checkpoint, "hr_checkpoint_name"))
        store = self.controlnets.store
        out = []
        for unit in units:
            entry = store.find(unit.model, unit.field("model"))
            for arch in archs:
                check_compatible(store.spec(entry, unit.field("model")), arch, unit.field("model"), entry.title)
            out.append((unit, entry))
        return out

    def _controls(self, req: GenerationRequest, job: Any, selection: Selection) -> list[Any]:
        """The job's ControlNet units with their detected maps (computed here, on the request's thread: no device
        time): the unit's image (base64, PAI-EAS `image_link`, or img2img's init image), its mask."""
        from PIL import Image

        from pipelines.controlnet.detectmap import detect, fit_map
        from pipelines.controlnet.units import resize_mode_from_value
        from pipelines.generate import Control

        controls = []
        limit = self.settings.max_input_pixels
        for unit, entry in self._control_units(req, selection, job.hires, job.refiner):
            resize_mode = None
            if unit.use_init_image:
                image = job.init_images[0]
                resize_mode = resize_mode_from_value(job.resize_mode)
            elif unit.image_link:
                image = decode_image(self.fetch_link(unit.image_link, unit.field("image_link")),
                                     field=unit.field("image_link"), max_pixels=limit)
            else:
                image = read_image(unit.image, field=unit.image_field, max_pixels=limit)
            mask = read_image(unit.mask, field=unit.mask_field, max_pixels=limit) if unit.mask else None
            mode = resize_mode or unit.resize_mode
            detected = detect(unit, image, job.width, job.height, mask=mask, resize_mode=mode)

            def fitted(width: int, height: int) -> Image.Image:  # the one detection, fitted to a pass's size
                return Image.fromarray(fit_map(detected, mode, width // 8 * 8, height // 8 * 8), "RGB")

            hr_map = fitted(job.hires.width, job.hires.height) if job.hires is not None else None
            controls.append(Control(unit=unit, entry=entry, map=fitted(job.width, job.height), hr_map=hr_map))
        return controls

    # images by URL --------------------------------------------------------------------------------------
    def _fetch_image_link(self, req: Img2ImgRequest) -> str:
        """PAI-EAS `image_link`: the init image by URL, as base64 for the usual decoding and limits."""
        return self.fetch_link(a1111.eas_values(req.alwayson_scripts)["image_link"], IMAGE_LINK_FIELD)

    def fetch_link(self, url: str, field: str) -> str:
        """An image by URL (handler.security.netguard: public addresses only unless allow-listed, pinned
        connection, size and time limits), as base64; a bad link or image is a 422 naming `field`."""
        import base64

        from handler.security.netguard import FetchError, Guard

        net = self.settings.network
        try:
            raw = Guard(net).get_bytes(url, max_bytes=net.max_image_bytes, deadline_seconds=net.fetch_deadline_seconds)
        except FetchError as exc:
            raise exc.for_field(field) from None
        data = base64.b64encode(raw).decode("ascii")
        decode_image(data, field=field, max_pixels=self.settings.max_input_pixels)  # a bad image names the link
        return data
