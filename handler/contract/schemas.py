"""Request and response schemas: the A1111 API (v1.10.1) field set with its API defaults.

These models are both the validation and the OpenAPI document. Unknown top-level keys are ignored, as
A1111 does. Numbers are taken as JSON numbers only: a bool or a string for a number is refused (A1111's
pydantic v1 coerced them; clients we know send proper numbers, and a schema that says "integer" must mean
it); a flag is true or false, or 1 or 0, never a string such as "yes". Integral floats such as `688.0` are accepted for integers. Bounds that depend on settings (largest
size, most images) are checked in the service, which names the field the same way.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)


def _number_only(value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError("must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _int_or_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    return _number_only(value)


Int = Annotated[int, BeforeValidator(_number_only)]
Float = Annotated[float, BeforeValidator(_number_only)]
def _bool_or_bit(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)  # A1111's clients have sent 1 and 0 for flags (its pydantic v1 took them)
    raise ValueError("must be true or false (or 1 or 0)")


# A request flag: true or false, or 1 or 0; never a string (pydantic's lax mode would take "yes" and "on").
Bool = Annotated[bool, BeforeValidator(_bool_or_bit), WithJsonSchema(
    {"oneOf": [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]}]})]
IntOrBool = Annotated[int, BeforeValidator(_int_or_bool)]  # its document: oneOf integer (with the field's bounds), boolean

# An http(s) URL as clients send it: a host name or IPv4 address, an optional port, then printable ASCII.
HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
HTTP_URL = rf"^[Hh][Tt][Tt][Pp][Ss]?://{HOST}(?::[0-9]{{1,5}})?(?:[/?#][!-~]*)?$"

MAX_TEXT = 100_000  # hard ceiling; the configurable prompt limit is checked in the service



MAX_JSON_DEPTH = 64  # A1111 bodies nest under 10 deep; pydantic's serializer gives up past ~250 (after generating)


def nested_deeper(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when `value` (parsed JSON) has objects or arrays nested more than `limit` deep (iterative: a deep
    value must not exhaust the stack here either)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False

_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _null_is_default_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """The document says what `A1111Model` accepts: null for every field with a non-null default, and the
    bounds of optional numbers (which pydantic leaves as `ge`/`le` behind a BeforeValidator) as JSON Schema's."""
    for name, prop in schema.get("properties", {}).items():
        for alternative in prop.get("anyOf", ()):
            for key, standard in _BOUNDS.items():
                if key in alternative:
                    alternative[standard] = alternative.pop(key)
        field = model.model_fields.get(name)
        if field is None or field.is_required() or field.default is None or "anyOf" in prop:
            continue
        meta = {key: prop.pop(key) for key in ("title", "description", "default") if key in prop}
        schema["properties"][name] = {**meta, "anyOf": [prop, {"type": "null"}]}


class A1111Model(BaseModel):
    """Unknown keys are ignored; a JSON null for a field that has a non-null default means that default
    (A1111's request fields are all Optional, and its processing treats None as "use the default")."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, json_schema_extra=_null_is_default_schema)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if not (v is None and k in fields and (fields[k].default is not None or fields[k].default_factory))}


class GenerationRequest(A1111Model):
    """Fields common to txt2img and img2img (A1111 `StableDiffusionProcessing` API model)."""

    prompt: str = Field("", max_length=MAX_TEXT, description="Positive prompt.")
    negative_prompt: str = Field("", max_length=MAX_TEXT, description="Negative prompt.")
    styles: list[str] | None = Field(None, max_length=32, description="Style names from <data>/styles.csv (GET /prompt-styles), applied in order.")
    seed: Int = Field(-1, ge=-(2**31), le=2**32 - 1, description="-1 or null = random in 0..4294967293; image i gets seed + i.")
    subseed: Int = Field(-1, ge=-(2**31), le=2**32 - 1, description="Variation seed; -1 or null = random.")
    subseed_strength: Float = Field(0.0, ge=0.0, le=1.0, description="Variation strength; 0 = off.")
    seed_resize_from_h: Int = Field(-1, ge=-1, description="Not offered: -1 or 0.")
    seed_resize_from_w: Int = Field(-1, ge=-1, description="Not offered: -1 or 0.")
    sampler_name: str | None = Field(None, max_length=100, description="Sampler; empty = sampler_index.")
    scheduler: str | None = Field(None, max_length=100, description="Schedule type name or label; null = Automatic.")
    sampler_index: str = Field("Euler", max_length=100, description="Legacy sampler field, used when sampler_name is empty.")
    batch_size: Int = Field(1, ge=1, le=64, description="Images per batch.")
    n_iter: Int = Field(1, ge=1, le=64, description="Number of batches.")
    steps: Int = Field(50, ge=1, le=150, description="Sampling steps.")
    cfg_scale: Float = Field(7.0, ge=0.0, le=100.0, description="Classifier-free guidance scale.")
    width: Int = Field(512, ge=8, description="Width; floored to a multiple of 8.")
    height: Int = Field(512, ge=8, description="Height; floored to a multiple of 8.")
    restore_faces: Bool | None = Field(None, description="Restore faces with GFPGAN (weights in models/GFPGAN); null = "
                                       "the face_restoration option.")
    tiling: Bool | None = Field(None, description="Seamless tiling (circular padding) for this request.")
    do_not_save_samples: Bool = Field(False)
    do_not_save_grid: Bool = Field(False)
    eta: Annotated[Float, Field(ge=0.0)] | None = Field(None, description="Noise multiplier; applied by DDIM (see docs/samplers.md).")
    denoising_strength: Annotated[Float, Field(ge=0.0, le=1.0)] | None = Field(None)
    s_min_uncond: Float | None = Field(None)
    s_churn: Float | None = Field(None)
    s_tmax: Float | None = Field(None)
    s_tmin: Float | None = Field(None)
    s_noise: Float | None = Field(None)
    override_settings: dict[str, Any] | None = Field(
        None, description="Per-request option overrides: sd_model_checkpoint, sd_vae, CLIP_stop_at_last_layers."
    )
    override_settings_restore_afterwards: Bool = Field(True)
    refiner_checkpoint: str | None = Field(
        None, max_length=1000, description="txt2img: an SDXL checkpoint that finishes the sampling (title, name, hash or "
        "a substring of a title); the base checkpoint must be SDXL too. Not with enable_hr.")
    refiner_switch_at: Float | None = Field(
        None, description="Fraction of the steps after which the refiner takes over (0 < x <= 1; 1 = never).")
    disable_extra_networks: Bool = Field(False)
    firstpass_image: str | None = Field(None, description="Ignored: the first pass is always generated.")
    comments: dict[str, Any] | None = Field(None)
    script_name: str | None = Field(None, max_length=200, description="Selectable script; none are installed.")
    script_args: list[Any] = Field(default_factory=list)
    send_images: Bool = Field(True, description="false -> images: []. With PAI-EAS `alwayson_scripts.save_dir` "
                                                "the images are left out unless this is sent as true.")
    save_images: Bool = Field(False, description="Write the images under <data>/outputs.")
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict,
        description="Always-on scripts, and the PAI-EAS keys sd_model_checkpoint, sd_vae, save_dir, image_link, id_task, "
        "uid. `controlnet: {\"args\": [unit, ...]}` takes sd-webui-controlnet units (up to 4): image (base64) or "
        "image_link, mask, module (GET /controlnet/module_list), model (GET /controlnet/model_list), weight, "
        "resize_mode, processor_res, threshold_a, threshold_b, guidance_start, guidance_end, control_mode, "
        "pixel_perfect, hr_option, save_detected_map, enabled.",
    )
    force_task_id: str | None = Field(None, max_length=200, description="A1111: the id `POST /internal/progress` "
                                      "follows this request by (the caller's own ids; admins see any).")
    infotext: str | None = Field(None, max_length=MAX_TEXT, description="An infotext; fields the request does not set are taken from it.")

    @field_validator("alwayson_scripts", mode="before")
    @classmethod
    def _null_scripts(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("script_args", mode="before")
    @classmethod
    def _null_args(cls, value: Any) -> Any:
        return [] if value is None else value


class Txt2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/txt2img."""

    enable_hr: Bool = Field(False, description="Hires fix: upscale the first pass and denoise it again (img2img at "
                            "denoising_strength, 0.75 when null).")
    firstphase_width: Int = Field(0, ge=0, description="Legacy: non-zero runs the first pass at this width and makes "
                                  "width x height the hires target.")
    firstphase_height: Int = Field(0, ge=0, description="Legacy, as firstphase_width.")
    hr_scale: Float = Field(2.0, description="Hires target = first pass x hr_scale (1..8) unless hr_resize_x/y is set.")
    hr_upscaler: str | None = Field(None, max_length=200, description="A latent upscale mode (GET /latent-upscale-modes) "
                                    "or an upscaler (GET /upscalers: None, Lanczos, Nearest and the models found); "
                                    "null = the latent_upscale_default_mode option.")
    hr_second_pass_steps: Int = Field(0, ge=0, description="Steps the second pass runs; 0 = steps.")
    hr_resize_x: Int = Field(0, ge=0, description="Hires target width; 0 = from hr_resize_y's aspect ratio or hr_scale.")
    hr_resize_y: Int = Field(0, ge=0, description="Hires target height; both set: cover the box, then crop.")
    hr_checkpoint_name: str | None = Field(None, max_length=1000, description="Checkpoint of the second pass; null = same.")
    hr_sampler_name: str | None = Field(None, max_length=100, description="Sampler of the second pass; null = same.")
    hr_scheduler: str | None = Field(None, max_length=100, description="Schedule type of the second pass; null = same.")
    hr_prompt: str = Field("", max_length=MAX_TEXT, description="Prompt of the second pass; empty = prompt.")
    hr_negative_prompt: str = Field("", max_length=MAX_TEXT, description="Negative prompt of the second pass; empty = same.")


class Img2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/img2img (inpainting when `mask` is given)."""

    init_images: list[str] | None = Field(
        None, description="Base64 images or data: URLs. Required unless alwayson_scripts.image_link gives the init "
                          "image by http(s) URL (fetched with the network.* limits); when both are given, "
                          "init_images are used and image_link is not fetched.")
    resize_mode: Int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale.")
    denoising_strength: Float = Field(0.75, ge=0.0, le=1.0)
    image_cfg_scale: Float | None = Field(None, description="instruct-pix2pix only; ignored.")
    mask: str | None = Field(None, description="Base64 mask; white = repaint.")
    mask_blur_x: Int = Field(4, ge=0, le=256)
    mask_blur_y: Int = Field(4, ge=0, le=256)
    mask_blur: Annotated[Int, Field(ge=0, le=256)] | None = Field(None, description="Sets both mask_blur_x and mask_blur_y.")
    mask_round: Bool = Field(True)
    inpainting_fill: Int = Field(0, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing.")
    inpaint_full_res: Bool = Field(True, description="true = only the masked area, at full resolution.")
    inpaint_full_res_padding: Int = Field(0, ge=0, le=1024)
    inpainting_mask_invert: Annotated[IntOrBool, WithJsonSchema(
        {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 1}, {"type": "boolean"}]})] = Field(
        0, ge=0, le=1, description="1 or true: repaint what the mask leaves black.")
    initial_noise_multiplier: Annotated[Float, Field(ge=0.0, le=2.0)] | None = Field(None)
    latent_mask: str | None = Field(None)
    include_init_images: Bool = Field(False)


class GenerationResponse(BaseModel):
    """A1111 response: raw base64 PNGs (no data: prefix), the request echoed, and `info` as a JSON string."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class PngInfoRequest(A1111Model):
    image: str = Field(..., description="Base64 image or data: URL.")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float | None


class NameItem(BaseModel):
    name: str


class PromptStyleItem(BaseModel):
    name: str
    prompt: str
    negative_prompt: str


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class EmbeddingsList(BaseModel):
    loaded: dict[str, Any]
    skipped: dict[str, Any]


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None


class ProgressQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown query parameter is a 422, as the document says

    skip_current_image: bool = False


class InternalProgressRequest(A1111Model):
    """POST /internal/progress (A1111's ProgressRequest)."""

    id_task: str | None = Field(None, max_length=200, description="The task: an asynchronous task's id, or a "
                                "request's `force_task_id`. Another consumer's task is answered as an unknown one.")
    id_live_preview: Int = Field(-1, description="The last live preview received (echoed while the task runs).")
    live_preview: Bool = Field(True, description="Accepted for A1111's clients; there are no live previews.")


class InternalProgressResponse(BaseModel):
    """A1111's answer: queued ("In queue: i/n"), active (progress and ETA) or completed; "Waiting..." for an id
    that is neither running nor queued (an unknown one too)."""

    active: bool = Field(..., description="The task's job is on the device now (its model loading included).")
    queued: bool = Field(..., description="The task waits for the device or for a worker.")
    completed: bool = Field(..., description="The task has ended (succeeded or failed).")
    progress: float | None = Field(..., description="While active: 0..1, job_no / job_count + step / steps / "
                                   "job_count; else null.")
    eta: float | None = Field(..., description="While active: seconds left, elapsed / progress - elapsed; null "
                              "before the first step and when not active.")
    live_preview: str | None = Field(..., description="Always null: no live previews are made.")
    id_live_preview: int | None = Field(..., description="While active: the request's id_live_preview; else -1.")
    textinfo: str | None = Field(..., description='"In queue: i/n" while queued, "Waiting..." when neither '
                                 "running nor queued, null while active.")


class OptionsUpdate(BaseModel):
    """POST /sdapi/v1/options: any subset of the option keys (unknown keys are a 422)."""

    model_config = ConfigDict(extra="allow")


class ColdStartReport(BaseModel):
    complete: bool = Field(..., description="The first image was made (by the warm-up or a request).")
    total_seconds: float | None = Field(..., description="Server process start to the first image.")
    phases: dict[str, float] = Field(..., description="process_to_app, imports, device_init, read_weights, "
                                                      "to_device, first_generation (seconds, one after another) "
                                                      "and prefetch (in the background, overlapping them); "
                                                      "absent if not reached")
    critical_path_seconds: float = Field(..., description="The foreground phases' sum: what the first image "
                                                          "waited for.")
    overlapped_seconds: float = Field(..., description="Background seconds (prefetch) hidden behind the "
                                                       "foreground phases.")


class CacheReport(BaseModel):
    device_bytes: int = Field(..., description="Weights on the device (shared components once).")
    device_budget: int = Field(..., description="cache.device_bytes, resolved.")
    host_bytes: int = Field(..., description="Weights kept in host RAM for pipelines evicted from the GPU.")
    host_budget: int = Field(..., description="cache.host_bytes; 0 when the tier is off (always on CPU).")
    device_models: int
    host_models: int
    hits: int
    host_hits: int
    misses: int
    loads: int
    evictions: int
    host_evictions: int
    trims: int = Field(0, description="Times an out-of-memory error trimmed the device to one pipeline.")


class HealthResponse(BaseModel):
    status: Literal["STARTING", "READY", "BUSY", "FAILED", "STOPPING"]
    version: str
    instance_id: str
    device: str = Field(..., description="cpu or cuda; the configured value (auto) before the first load")
    uptime_seconds: float
    loaded_models: list[str]
    cache: CacheReport | None = Field(None, description="The warm pipeline cache; null before the first load.")
    in_flight: int = Field(..., description="Generation requests (and a warm-up) admitted and not yet answered; "
                                            "sdfunc_requests_in_flight counts every HTTP request instead.")
    queued: int = Field(..., description="Device jobs waiting behind the running one.")
    cold_start: ColdStartReport


class WarmupGeneration(BaseModel):
    width: int
    height: int
    steps: int
    seconds: float


class WarmupCheckpoint(BaseModel):
    checkpoint: str
    arch: str
    load_seconds: float
    generations: list[WarmupGeneration]


class InitializeResponse(BaseModel):
    status: Literal["READY"]
    warmed: bool = Field(..., description="True for the call that did the warm-up; later calls load nothing.")
    seconds: float = Field(..., description="Wall time of the warm-up.")
    checkpoints: list[WarmupCheckpoint]
    cold_start: ColdStartReport


class PreStopResponse(BaseModel):
    status: Literal["stopped"]
    drained: bool = Field(..., description="Every admitted request finished within the grace period.")
    waited_for: int = Field(..., description="Generation requests (and warm-up) in flight when pre-stop began.")
    in_flight: int = Field(..., description="Still in flight when pre-stop answered (0 when drained).")
    waited_seconds: float
    released_models: int


# Records and billing (handler/api/account.py) -----------------------------------------------------------------
def utc_naive(value: Any) -> Any:
    """Times without a zone are UTC; every time is compared as naive UTC, as the database stores it."""
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


class TaskProgress(BaseModel):
    """Where a task is: queued (its place), running (step and ETA) or completed."""

    active: bool = Field(..., description="Running: its job is on a device (its model loading included).")
    queued: bool = Field(..., description="Waiting for a device or for a worker.")
    completed: bool = Field(..., description="Ended (succeeded or failed).")
    position: int | None = Field(None, description="While queued: its 1-based place, when known.")
    step: int | None = Field(None, description="While running: the sampling step done (of the current pass).")
    steps: int | None = Field(None, description="While running: the steps of the current pass.")
    progress: float = Field(..., description="0 while queued, 0..1 while running (A1111's formula), 1 when completed.")
    eta: float | None = Field(None, description="While running: seconds left (null before the first step); 0 when "
                              "completed.")
    textinfo: str | None = Field(None, description='A1111\'s: "In queue: i/n", "Waiting..." or null while running.')


class TaskView(BaseModel):
    """An asynchronous task (202 on submit; GET /tasks/<id>)."""

    task_id: str
    tag: str | None = Field(None, description="The `task_id` query parameter of the submit (EAS)")
    status: Literal["queued", "running", "succeeded", "failed"]
    consumer: str
    request_id: str = Field(..., description="The ledger's id for the task's generation")
    deliveries: int = Field(..., description="Runs so far (a dead worker's task is run again up to max_delivery)")
    created_at: str
    started_at: str | None
    finished_at: str | None
    error_msg: str
    callback_status: str | None
    result: dict[str, Any] | None = Field(
        None, description="When done, PAI-EAS's response: `images` (empty: the images are in storage), "
                          "`parameters` (`status` 0, or the HTTP status of a failure; `image_url`: the saved grid, "
                          "then each image; `seed`: every image's seed; `error_msg`, `total_time`), `info`; sdfunc "
                          "adds `task_id`, `tag` and the task's `status`")
    progress: TaskProgress | None = Field(None, description="Where the task is (GET /tasks/<id>; not on submit)")
    queue: str | None = Field(None, description="The PAI-EAS input queue it was put on (`<service>/<path>`)")
    tags: dict[str, str] | None = Field(None, description="That put's tags (its query parameters and `requestId`)")


class TaskPath(BaseModel):
    task_id: str = Field(..., min_length=1, max_length=32)


class AccountInfo(BaseModel):
    consumer: str = Field(..., description="The consumer the credentials belong to")
    admin: bool = Field(..., description="May read every consumer's records and charge others by uid")
    auth_mode: str
    records: bool = Field(..., description="The ledger and image records are kept (GET /images, /billing/usage)")


_DATE = r"\d{4}-\d{2}-\d{2}"
_RFC3339 = re.compile(rf"{_DATE}[Tt]\d{{2}}:\d{{2}}:\d{{2}}(\.\d+)?([Zz]|[+-]\d{{2}}:\d{{2}})")


def _moment(value: Any) -> dt.datetime:
    """An RFC 3339 date-time (its offset required) or a full date (midnight UTC), as naive UTC. Numbers and
    other ISO 8601 spellings are refused: the document says `date-time` or `date`. A moment beyond the
    calendar's ends in UTC (year 1 with a positive offset) is the calendar's end."""
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time (2026-12-01T08:00:00Z) or a date (2026-12-01)")
    try:
        if re.fullmatch(_DATE, value):
            return dt.datetime.combine(dt.date.fromisoformat(value), dt.time())
        if _RFC3339.fullmatch(value):
            parsed = dt.datetime.fromisoformat(value.upper())
            try:
                return utc_naive(parsed)
            except OverflowError:
                return dt.datetime.min if parsed.year == dt.MINYEAR else dt.datetime.max
    except ValueError:
        raise ValueError("not a valid date") from None
    raise ValueError("must be an RFC 3339 date-time (2026-12-01T08:00:00Z) or a date (2026-12-01)")


Moment = Annotated[dt.datetime, BeforeValidator(_moment), WithJsonSchema(
    {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "format": "date"}]})]


class _TimeRange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: Moment | None = Field(None, description="From this time (inclusive): an RFC 3339 date-time (with its "
                                                   "offset, e.g. Z) or a date (midnight UTC).")
    until: Moment | None = Field(None, description="Before this time (exclusive), as since; at or before since: "
                                                   "nothing.")
    consumer: str | None = Field(None, max_length=64, description="Another consumer's records (admins only); "
                                                                  "`*` = every consumer.")


class GenerationQuery(BaseModel):
    """The query of txt2img and img2img: asynchronous submission (PAI-EAS style). Other parameters are a 422, as
    the document says (PAI-EAS sends `task_id` only; its queue service's tags go to /api/predict/...)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    async_: bool = Field(False, alias="async", description="true: answer 202 with a task (`GET /tasks/<id>`) "
                                                            "instead of waiting for the images; as the header "
                                                            "`Prefer: respond-async`.")
    task_id: str | None = Field(None, min_length=1, max_length=128, description="Kept as the task's tag.")
    callback_url: str | None = Field(None, min_length=1, max_length=2048, pattern=HTTP_URL,
                                     description="Receives the task's result by POST when it ends.")


class ImagesQuery(_TimeRange):
    request_id: str | None = Field(None, max_length=128, description="Only the images of this request id.")
    page: int = Field(1, ge=1, le=1_000_000)
    per_page: int = Field(50, ge=1, le=500)


class ImagePath(BaseModel):
    image_id: int = Field(..., ge=1, le=2**63 - 1)


class ImageItem(BaseModel):
    id: int
    request_id: str
    consumer: str
    prompt: str
    negative_prompt: str
    steps: int
    seed: int
    sampler: str
    cfg_scale: float
    size: str = Field(..., description="WIDTHxHEIGHT, e.g. 512x512")
    model_hash: str | None
    model: str | None
    image_url: str | None = Field(..., description="Where the PNG was saved, if it was")
    stored: bool = Field(..., description="The PNG is kept in the database (GET /images/{id} serves it)")
    created_at: str


class ImageList(BaseModel):
    images: list[ImageItem]
    page: int
    per_page: int
    total: int


class UsageQuery(_TimeRange):
    group: Literal["day", "model"] | None = Field(None, description="Rows per UTC day or per checkpoint; none: "
                                                                    "one row.")


class UsageRow(BaseModel):
    key: str = Field(..., description="The day (YYYY-MM-DD), the checkpoint, or `all`")
    currency: str
    requests: int
    succeeded: int
    failed: int
    images: int
    billed_ms: int
    amount: str = Field(..., description="Decimal string, exact")


class UsageTotals(BaseModel):
    requests: int
    succeeded: int
    failed: int
    images: int
    billed_ms: int
    amount: dict[str, str] = Field(..., description="Per currency, decimal strings")


class UsageResponse(BaseModel):
    consumer: str | None = Field(..., description="Whose usage; null = every consumer")
    since: str | None
    until: str | None
    group: str
    rows: list[UsageRow]
    totals: UsageTotals
