"""The AUTOMATIC1111 API routes (`/sdapi/v1/...`), thin: validate (schemas), call the service, shape JSON."""

from __future__ import annotations

from typing import Any

from flask import current_app, g, jsonify, request
from flask_openapi3 import APIBlueprint, Tag

from handler.contract.extras import (
    ExtrasBatchImagesRequest,
    ExtrasBatchImagesResponse,
    ExtrasRequest,
    ExtrasSingleImageRequest,
    ExtrasSingleImageResponse,
    FaceRestorerItem,
    RealesrganItem,
)
from handler.contract.images import read_image
from handler.contract.schemas import (
    EmbeddingsList,
    GenerationQuery,
    GenerationRequest,
    GenerationResponse,
    Img2ImgRequest,
    NameItem,
    OptionsUpdate,
    PngInfoRequest,
    PngInfoResponse,
    ProgressQuery,
    ProgressResponse,
    PromptStyleItem,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
    TaskView,
    Txt2ImgRequest,
    UpscalerItem,
)
from handler.errors import ErrorModel, Forbidden, InvalidRequest, ServiceError
from handler.runtime.service import Service
from pipelines.errors import PipelineError

_tag = Tag(name="sdapi", description="AUTOMATIC1111 web UI API (v1.10.1) with PAI-EAS extensions")
_errors: dict[Any, Any] = {401: ErrorModel, 403: ErrorModel, 404: ErrorModel, 409: ErrorModel, 413: ErrorModel,
                           422: ErrorModel, 429: ErrorModel, 500: ErrorModel, 503: ErrorModel}
_null = {"description": "JSON null (A1111 returns null; clients call .json() on it)"}

bp = APIBlueprint("sdapi", __name__, url_prefix="/sdapi/v1", abp_tags=[_tag], abp_responses=_errors)

LATENT_UPSCALE_MODES = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                        "Latent (nearest)", "Latent (nearest-exact)"]


def service() -> Service:
    return current_app.extensions["sdfunc"]


def consumer() -> str:
    """The caller's consumer id (handler.security.auth): options are per consumer."""
    return g.caller.consumer


def charged_consumer(body: GenerationRequest) -> str:
    """The consumer a generation is charged to: the caller, or `alwayson_scripts.uid` where allowed."""
    from handler.contract.a1111 import eas_values

    uid = eas_values(body.alwayson_scripts).get("uid")
    name = service().auth.consumer_for(g.caller, uid)
    g.meter.consumer = name
    return name


def async_requested(query: GenerationQuery) -> bool:
    """`?async=true` or `Prefer: respond-async`. Not FC's `X-Fc-Invocation-Type: Async`: FC has already
    answered that client with 202 and queued the call; it waits for this response (up to the function's
    timeout) and hands it to the configured destinations, so the function runs such a call to the end."""
    return query.async_ or "respond-async" in request.headers.get("Prefer", "").lower()


def check_inputs(mode: str, body: GenerationRequest, *, queued: bool) -> None:
    """A txt2img with an `image_link` is refused; so is, for a task that runs later (`queued`), what would fail
    when it runs: an img2img without an input image, an `image_link` the network guard refuses (the task fetches
    and checks it again)."""
    from handler.contract.a1111 import eas_values

    image_link = eas_values(body.alwayson_scripts).get("image_link")
    if mode == "txt2img" and image_link:
        raise InvalidRequest("alwayson_scripts.image_link: txt2img takes no input image; use img2img, or give "
                             "a ControlNet unit its own image_link", field="alwayson_scripts.image_link")
    if not queued:
        return
    if mode == "img2img":
        service().require_init_image(body)
    if image_link and not body.init_images:
        from handler.security.netguard import FetchError, Guard

        try:
            Guard(service().settings.network).check(image_link)
        except FetchError as exc:
            raise exc.for_field("alwayson_scripts.image_link") from None


def submit(mode: str, body: GenerationRequest, query: GenerationQuery):
    """Answer now (200 with the images), or queue a task (202, `Location: /tasks/<id>`) when asked to."""
    consumer = charged_consumer(body)
    check_inputs(mode, body, queued=async_requested(query))
    if not async_requested(query):
        return jsonify((service().txt2img if mode == "txt2img" else service().img2img)(body, consumer))
    task, created = service().submit_task(mode, body, consumer, tag=query.task_id, callback_url=query.callback_url)
    response = jsonify(task)
    response.status_code = 202
    response.headers["Location"] = f"/tasks/{task['task_id']}"
    return response


@bp.post("/txt2img", responses={200: GenerationResponse, 202: TaskView})
def txt2img(body: Txt2ImgRequest, query: GenerationQuery):
    """Text to image. Charged for device generation time: headers `X-Billed-Duration-Ms`, `X-Charge` and
    `parameters.billing`; `Server-Timing` splits the server's time (queue, load, gen, encode, total); an
    `Idempotency-Key` header makes retries safe (a charged id answers 409; after a 503 `charge_unknown`, with
    `X-Charge: unknown`, the retry with the same key tells: 409 if it was charged). With
    `?async=true` or `Prefer: respond-async`: 202 and a task (`GET /tasks/<id>`);
    query `task_id` is kept as the task's tag, `callback_url` receives the result by POST."""
    return submit("txt2img", body, query)


@bp.post("/img2img", responses={200: GenerationResponse, 202: TaskView})
def img2img(body: Img2ImgRequest, query: GenerationQuery):
    """Image to image; inpainting when `mask` is given. Charged as txt2img; asynchronous as txt2img."""
    return submit("img2img", body, query)


@bp.post("/png-info", responses={200: PngInfoResponse})
def png_info(body: PngInfoRequest):
    """Read the generation parameters written into an image."""
    from pipelines.infotext import parse_infotext, read_image_info

    image = read_image(body.image, field="image", max_pixels=service().settings.max_input_pixels)
    info, items = read_image_info(image)
    return jsonify({"info": info, "items": items, "parameters": parse_infotext(info)})


@bp.get("/sd-models", responses={200: {"content": {"application/json": {"schema": {
    "type": "array", "items": SDModelItem.model_json_schema()}}}, "description": "Checkpoints"}})
def sd_models():
    """Checkpoints under models/Stable-diffusion (hashes appear once computed, as in A1111)."""
    return jsonify(service().store.listing())


@bp.get("/sd-vae", responses={200: {"description": "VAEs under models/VAE"}})
def sd_vae():
    """External VAE files."""
    return jsonify([{"model_name": v.name, "filename": str(v.path)} for v in service().store.vaes])


@bp.get("/loras", responses={200: {"description": "LoRA files under models/Lora"}})
def loras():
    """LoRA files under models/Lora, for `<lora:name:weight>` in prompts (A1111's shape)."""
    return jsonify(service().loras.listing())


@bp.get("/samplers", responses={200: {"content": {"application/json": {"schema": {
    "type": "array", "items": SamplerItem.model_json_schema()}}}, "description": "Samplers"}})
def samplers():
    """A1111's samplers, in A1111's order."""
    from pipelines.samplers import sampler_list

    return jsonify(sampler_list())


@bp.get("/schedulers", responses={200: {"content": {"application/json": {"schema": {
    "type": "array", "items": SchedulerItem.model_json_schema()}}}, "description": "Schedule types"}})
def schedulers():
    """A1111's schedule types."""
    from pipelines.samplers import scheduler_list

    return jsonify(scheduler_list())


@bp.get("/upscalers", responses={200: {"content": {"application/json": {"schema": {
    "type": "array", "items": UpscalerItem.model_json_schema()}}}, "description": "Upscalers"}})
def upscalers():
    """None, Lanczos and Nearest, then the upscaler models under models/{ESRGAN,RealESRGAN,SwinIR,DAT,HAT}
    (A1111's built-in names such as `R-ESRGAN 4x+` for the files that provide them; `scale` read from the file)."""
    return jsonify(service().upscaling.listing())


@bp.get("/realesrgan-models", responses={200: {"content": {"application/json": {"schema": {
    "type": "array", "items": RealesrganItem.model_json_schema()}}}, "description": "Real-ESRGAN models"}})
def realesrgan_models():
    """The Real-ESRGAN models found (A1111's built-in names for its published files)."""
    return jsonify(service().upscaling.realesrgan_listing())


@bp.get("/face-restorers", responses={200: {"content": {"application/json": {"schema": {
    "type": "array", "items": FaceRestorerItem.model_json_schema()}}}, "description": "Face restorers"}})
def face_restorers():
    """The face restorers whose weights are on the mount: GFPGAN (models/GFPGAN), CodeFormer (models/Codeformer,
    the user's own: non-commercial licence)."""
    return jsonify(service().upscaling.face_restorers())


def run_extras(body: ExtrasRequest, images: list[tuple[str, str]], *, single: bool):
    from handler.contract.a1111 import eas_values

    name = service().auth.consumer_for(g.caller, eas_values(body.alwayson_scripts).get("uid"))
    g.meter.consumer = name
    return jsonify(service().extras.run(body, images, name, single=single))


@bp.post("/extra-single-image", responses={200: ExtrasSingleImageResponse})
def extra_single_image(body: ExtrasSingleImageRequest):
    """Upscale and restore faces in one image, as A1111's extras tab: upscaler_1 (and upscaler_2 blended in) by
    `upscaling_resize` or to `upscaling_resize_w` x `upscaling_resize_h`, then GFPGAN at `gfpgan_visibility`.
    Charged for device time like a generation (`X-Billed-Duration-Ms`, `X-Charge`); `Server-Timing`. The PNG
    keeps the input's text chunks and adds `postprocessing`."""
    return run_extras(body, [(body.image, "image")], single=True)


@bp.post("/extra-batch-images", responses={200: ExtrasBatchImagesResponse})
def extra_batch_images(body: ExtrasBatchImagesRequest):
    """The extras of extra-single-image for each image of `imageList`, in one charged job."""
    return run_extras(body, [(item.data, f"imageList.{i}.data") for i, item in enumerate(body.imageList)],
                      single=False)


@bp.get("/latent-upscale-modes", responses={200: {"content": {"application/json": {"schema": {
    "type": "array", "items": NameItem.model_json_schema()}}}, "description": "Latent upscale modes"}})
def latent_upscale_modes():
    """Latent upscale modes."""
    return jsonify([{"name": n} for n in LATENT_UPSCALE_MODES])


@bp.get("/scripts", responses={200: ScriptsList})
def scripts():
    """Installed scripts: the always-on ControlNet (alwayson_scripts.controlnet)."""
    return jsonify({"txt2img": ["controlnet"], "img2img": ["controlnet"]})


@bp.get("/prompt-styles", responses={200: {"content": {"application/json": {"schema": {
    "type": "array", "items": PromptStyleItem.model_json_schema()}}}, "description": "Prompt styles"}})
def prompt_styles():
    """The styles of <data>/styles.csv (A1111's format), in file order; [] when there is none."""
    return jsonify([{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                    for s in service().styles.styles()])


@bp.get("/embeddings", responses={200: EmbeddingsList})
def embeddings():
    """Textual-inversion embeddings under <data>/embeddings: `loaded` are those that fit the caller's current
    checkpoint when it is warm (else every SD 1.x or SDXL one), `skipped` the rest."""
    from pipelines.adapters.embeddings import encoder_dims

    svc = service()
    dims = None
    cache = svc.cache_if_loaded
    if cache is not None:
        try:
            model = cache.peek(svc.default_checkpoint(consumer()))
        except (ServiceError, PipelineError):  # no checkpoint at all, or the default is gone
            model = None
        dims = encoder_dims(model.pipe) if model is not None else None
    return jsonify(svc.embeddings.listing(dims))


@bp.get("/options", responses={200: {"description": "Every option with the caller's value"}})
def get_options():
    """The caller's options (A1111 keys; `sd_model_checkpoint` is the current checkpoint's title)."""
    return jsonify(service().get_options(consumer()))


@bp.post("/options", responses={200: _null})
def set_options(body: OptionsUpdate):
    """Set the caller's options. Unknown key -> 422; unknown checkpoint -> 404. Never process-global."""
    service().set_options(consumer(), body.model_extra or {})
    return jsonify(None)


@bp.post("/refresh-checkpoints", responses={200: _null})
def refresh_checkpoints():
    """Rescan models/Stable-diffusion, and the upscaler and face-restoration folders."""
    service().store.refresh()
    service().upscaling.refresh()
    return jsonify(None)


@bp.post("/refresh-vae", responses={200: _null})
def refresh_vae():
    """Rescan models/VAE."""
    service().store.refresh()
    return jsonify(None)


@bp.post("/refresh-loras", responses={200: _null})
def refresh_loras():
    """Rescan models/Lora."""
    service().loras.refresh()
    return jsonify(None)


@bp.post("/refresh-embeddings", responses={200: _null})
def refresh_embeddings():
    """Rescan <data>/embeddings."""
    service().embeddings.refresh()
    return jsonify(None)


@bp.get("/progress", responses={200: ProgressResponse})
def progress(query: ProgressQuery):
    """The worker's current job; idle is progress 0 and job_count 0. A consumer sees only a job that serves it
    (admins: any): another consumer's job reads as idle. A task's own progress: POST /internal/progress."""
    caller = g.caller
    return jsonify(service().progress.snapshot(None if caller.admin else caller.consumer))


@bp.post("/interrupt", responses={200: {"description": "{}"}})
def interrupt():
    """Stop the current job after its current step; the images made so far are returned (and charged for
    the time they took). Only the job's consumer or an admin may interrupt it: another's job is a 403."""
    caller = g.caller
    if not service().progress.interrupt(None if caller.admin else caller.consumer):
        raise Forbidden("the running job belongs to another consumer")
    return jsonify({})


@bp.post("/skip", responses={200: _null})
def skip():
    """Accepted for compatibility; skipping is not offered."""
    return jsonify(None)
