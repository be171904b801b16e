"""The sd-webui-controlnet extension's own API (`/controlnet/...`), as clients of that extension call it.

Units themselves travel in txt2img / img2img `alwayson_scripts.controlnet.args` (pipelines.controlnet.units); these
routes list what can be used and run a preprocessor alone."""

from __future__ import annotations

from typing import Any

from flask import current_app, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, ConfigDict, Field

from handler.contract.images import b64, read_image
from handler.contract.schemas import Float
from handler.errors import ErrorModel

_tag = Tag(name="controlnet", description="sd-webui-controlnet's API: models, preprocessors, detection")
_errors: dict[Any, Any] = {401: ErrorModel, 403: ErrorModel, 413: ErrorModel, 422: ErrorModel, 429: ErrorModel,
                           500: ErrorModel, 503: ErrorModel}
bp = APIBlueprint("controlnet", __name__, url_prefix="/controlnet", abp_tags=[_tag], abp_responses=_errors)

MAX_DETECT_IMAGES = 4


class ModelListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown query parameter is a 422, as the document says

    update: bool = Field(True, description="Rescan <data>/models/ControlNet first.")


class ModuleListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias_names: bool = Field(False, description="UI labels instead of API names.")


class ModelList(BaseModel):
    model_list: list[str]


class ModuleList(BaseModel):
    module_list: list[str]
    module_detail: dict[str, Any]


class Version(BaseModel):
    version: int


class ControlNetSettings(BaseModel):
    control_net_unit_count: int


class DetectRequest(BaseModel):
    controlnet_module: str = Field("none", max_length=200, description="A preprocessor of /controlnet/module_list.")
    controlnet_input_images: list[str] = Field(default_factory=list, max_length=MAX_DETECT_IMAGES,
                                               description="Base64 images or data URLs.")
    controlnet_processor_res: Float = Field(512, description="Outside the preprocessor's range: its default.")
    controlnet_threshold_a: Float = Field(64)
    controlnet_threshold_b: Float = Field(64)


class DetectResponse(BaseModel):
    images: list[str]
    info: str


def _store() -> Any:
    return current_app.extensions["sdfunc"].controlnets


@bp.get("/version", responses={200: Version})
def version():
    """The extension API's version."""
    from pipelines.controlnet.units import API_VERSION

    return jsonify({"version": API_VERSION})


@bp.get("/model_list", responses={200: ModelList})
def model_list(query: ModelListQuery):
    """ControlNet models under <data>/models/ControlNet, titled `<stem> [<hash>]` as the extension titles them."""
    store = _store()
    if query.update:
        store.refresh()
    return jsonify({"model_list": store.model_list()})


@bp.get("/module_list", responses={200: ModuleList})
def module_list(query: ModuleListQuery):
    """The preprocessors offered (those that need no downloaded weights), with their sliders."""
    from pipelines.controlnet.preprocessors import module_list as modules

    return jsonify(modules(query.alias_names))


@bp.get("/settings", responses={200: ControlNetSettings})
def settings():
    """How many units a request may carry."""
    from pipelines.controlnet.units import MAX_UNITS

    return jsonify({"control_net_unit_count": MAX_UNITS})


@bp.post("/detect", responses={200: DetectResponse})
def detect(body: DetectRequest):
    """Run one preprocessor on each image at its own size; the detected maps as base64 PNGs."""
    from pipelines.controlnet.detectmap import detect_map
    from pipelines.controlnet.preprocessors import find_preprocessor
    from pipelines.infotext import png_bytes

    find_preprocessor(body.controlnet_module, "controlnet_module")  # refused with no images too
    limit = current_app.extensions["sdfunc"].settings.max_input_pixels
    images = [read_image(data, field=f"controlnet_input_images.{i}", max_pixels=limit)
              for i, data in enumerate(body.controlnet_input_images)]
    maps = [detect_map(body.controlnet_module, image, processor_res=body.controlnet_processor_res,
                       threshold_a=body.controlnet_threshold_a, threshold_b=body.controlnet_threshold_b)
            for image in images]
    return jsonify({"images": [b64(png_bytes(m, "")) for m in maps], "info": "Success"})
