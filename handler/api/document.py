"""The served OpenAPI document, completed with the rules the server applies for this deployment.

The pydantic models give the document its shapes; `complete` adds what depends on the settings in force or on
closed sets the models keep as plain strings (so that the validation messages stay A1111's):

- the deployment's limits: the largest width, height, steps, images and prompt, and the defaults a request
  gets when it leaves a field out (`Planner.deployment_defaults` lowers A1111's 512 x 512 x 50 to them);
- closed sets: sampler names and aliases (with one schedule-type suffix, "DPM++ 2M Karras"), ControlNet
  preprocessors (name or label, any case), the A1111 option keys `POST /sdapi/v1/options` takes (no others),
  the values of fields whose only accepted value is "off" (`restore_faces`, `script_name`, seed resize);
- formats: the URLs the server fetches or calls (`https`, `http` where allowed, `oss`), non-empty images;
- links: an asynchronous generation's task, a download's state, an image of a listing;
- `x-refusals`: on each operation, the 422s JSON Schema cannot state (an image that does not decode, a
  malformed prompt, a limit on two fields together), each with the field it names and why.

Pure: the document is a dict, changed in place; `settings` is only read.
"""

from __future__ import annotations

import re
from typing import Any

from handler.contract.images import b64
from handler.contract.options import DEFAULT_OPTIONS, HIRES_REFINER_PASSES
from handler.contract.schemas import MAX_TEXT
from handler.settings import Settings

A1111_DEFAULTS = {"width": 512, "height": 512, "steps": 50}
GENERATIONS = ("Txt2ImgRequest", "Img2ImgRequest")
# What the server refuses with a 422 that JSON Schema cannot state, per operation: the field the error names
# (handler.errors.ErrorBody.field, a prefix before `.<index>`) and why. Both generation routes share theirs.
_GENERATION_REFUSALS = {
    "prompt": "a malformed prompt: attention, schedule or alternation syntax that does not parse, or more "
              "schedule steps than the request has",
    "negative_prompt": "as prompt",
    "batch_size": "batch_size x n_iter over the deployment's most images",
    "n_iter": "batch_size x n_iter over the deployment's most images",
    "sampler_name": "an unknown sampler_index when sampler_name is empty (sampler_index is only read then)",
    "styles": "a style name <data>/styles.csv does not have",
    "refiner_checkpoint": "a refiner that is not SDXL, with enable_hr, or on img2img",
    "refiner_switch_at": "outside 0 < x <= 1 when a refiner is named",
    "override_settings": "an override the checkpoint cannot take (clip skip deeper than its text encoder), of "
                         "the wrong type, or an upscaler_for_img2img / face_restoration_model that is refused",
    "restore_faces": "true (or the face_restoration option) while the restorer the face_restoration_model option "
                     "names has no weights on the mount",
    "alwayson_scripts": "a ControlNet unit, PAI-EAS key or save_dir the server cannot use (each named)",
    "width": "a size too small for the checkpoint's deepest layers (one latent value per group: 8-16 pixels "
             "without CFG on a small model)",
    "height": "as width",
    "infotext": "an infotext whose fields are out of range",
    "steps": "steps taken from the infotext over the deployment's most steps",
    "callback_url": "a host that does not resolve or is not public",
    "body": "JSON nested deeper than 64",
}
_TXT2IMG_REFUSALS = {
    **_GENERATION_REFUSALS,
    "hr_upscaler": "with enable_hr: an upscaler whose file is refused, or whose passes make an image over the pixel "
                   "limit (404 for a name no upscaler has)",
    "hr_scale": "with enable_hr and no hr_resize_x/y: outside 1..8, or a hires size over the limits",
    "hr_resize_x": "with enable_hr: a hires size over the deployment's limits",
    "hr_second_pass_steps": "with enable_hr: more than the deployment's most steps",
    "hr_prompt": "with enable_hr: as prompt",
    "hr_negative_prompt": "with enable_hr: as prompt",
    "firstphase_width": "with enable_hr: a first pass under 8 or over the limits",
    "firstphase_height": "with enable_hr: a first pass under 8 or over the limits",
    "hr_sampler_name": "with enable_hr: a sampler that is not offered (without it, anything is ignored)",
    "hr_checkpoint_name": "with enable_hr: a checkpoint that does not load for the second pass",
}
_IMG2IMG_REFUSALS = {
    **_GENERATION_REFUSALS,
    "init_images": "an image that does not decode, is over the pixel limit (or would be, upscaled by "
                   "upscaler_for_img2img), more images than batch_size, or none while alwayson_scripts.image_link "
                   "is not given either",
    "mask": "a mask that does not decode or is over the pixel limit",
    "latent_mask": "as mask",
}
_EXTRAS_REFUSALS = {
    "upscaler_1": "an upscaler whose file is on the mount but refused: a pickle that names code, a corrupt file, "
                  "an architecture not built here (404 for a name no upscaler has)",
    "upscaler_2": "as upscaler_1",
    "upscaling_resize": "a factor whose result, or an upscaler pass on the way to it, is over the pixel limit",
    "upscaling_resize_w": "resize_mode 1: a target whose result, or a pass on the way, is over the pixel limit",
    "gfpgan_visibility": "above 0 while no GFPGAN weights are in models/GFPGAN",
    "codeformer_visibility": "above 0 while no CodeFormer weights are in models/Codeformer (they are the user's "
                             "own: non-commercial licence)",
    "alwayson_scripts": "a PAI-EAS save_dir or uid the server cannot use",
    "body": "JSON nested deeper than 64",
}
REFUSALS: dict[str, dict[str, str]] = {
    "POST /sdapi/v1/extra-single-image": {**_EXTRAS_REFUSALS, "image": "an image that does not decode (an "
                                          "empty one included) or is over the pixel limit"},
    "POST /sdapi/v1/extra-batch-images": {**_EXTRAS_REFUSALS, "imageList": "no image, more than 64, or one that "
                                          "does not decode or is over the pixel limit (imageList.<i>.data)"},
    "POST /sdapi/v1/txt2img": _TXT2IMG_REFUSALS,
    "POST /sdapi/v1/img2img": _IMG2IMG_REFUSALS,
    "POST /sdapi/v1/png-info": {"image": "an image that does not decode or is over the pixel limit"},
    "POST /controlnet/detect": {"controlnet_input_images": "an image that does not decode or is over the pixel "
                                                           "limit",
                                "controlnet_module": "a preprocessor that is known but not offered here"},
    "POST /sdapi/v1/options": {"img2img_background_color": "not a colour PIL knows",
                               "sd_model_checkpoint": "a name no checkpoint has (404 when it is well formed)"},
    "POST /models/download": {"source": "a host that does not resolve or is not public",
                              "file_name": "not a plain file name (a /, \\, .., control character, leading dot or "
                                           "surrounding space), or not .safetensors for CHECKPOINT, LORA, VAE and "
                                           "EMBEDDING",
                              "folder": "given for a type other than OTHER, missing for OTHER, or not a relative "
                                        "folder inside <data>/models"},
}


def complete(doc: dict[str, Any], settings: Settings) -> None:
    """Add this deployment's limits, the closed sets, formats, links and the unstated refusals to `doc`."""
    schemas = doc["components"]["schemas"]
    _limits(schemas, settings)
    _closed_sets(schemas)
    _options(schemas)
    _formats(schemas, settings)
    _links(doc)
    _examples(doc, settings)
    for label, refusals in REFUSALS.items():
        method, path = label.split(" ", 1)
        operation = doc["paths"].get(path, {}).get(method.lower())
        if operation is not None:
            operation["x-refusals"] = dict(refusals)
            response = operation["responses"].setdefault("422", {"description": "Invalid request"})
            response["description"] = ("Invalid request: a field outside the schema, or one of `x-refusals` (rules "
                                       "JSON Schema cannot state); `error.field` names it")


def _inner(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """The non-null alternative of property `name` (the property itself when it is not nullable)."""
    prop = schema["properties"][name]
    for alternative in prop.get("anyOf", ()):
        if alternative.get("type") != "null":
            return alternative
    return prop


def _replace(schema: dict[str, Any], name: str, inner: dict[str, Any]) -> None:
    """Put `inner` in place of property `name`'s non-null alternative, keeping its title, description, default."""
    prop = schema["properties"][name]
    meta = {key: prop[key] for key in ("title", "description", "default") if key in prop}
    nullable = any(alternative.get("type") == "null" for alternative in prop.get("anyOf", ()))
    schema["properties"][name] = {**meta, "anyOf": [inner, {"type": "null"}]} if nullable else {**meta, **inner}


def _limits(schemas: dict[str, Any], s: Settings) -> None:
    # sizes are floored to a multiple of 8 before the limit applies: 263 is 256
    limits = {"width": (s.max_width, s.max_width // 8 * 8 + 7), "height": (s.max_height, s.max_height // 8 * 8 + 7),
              "steps": (min(150, s.max_steps),) * 2}
    for name in GENERATIONS:
        schema = schemas[name]
        for field, (limit, maximum) in limits.items():
            _inner(schema, field)["maximum"] = maximum
            schema["properties"][field]["default"] = min(A1111_DEFAULTS[field], limit)
        for field in ("batch_size", "n_iter"):
            _inner(schema, field)["maximum"] = min(64, s.max_images)
        for field in ("prompt", "negative_prompt"):  # the hires prompts: only with enable_hr (x-refusals)
            _inner(schema, field)["maxLength"] = min(MAX_TEXT, s.max_prompt_chars)


def _sampler_names() -> list[str]:
    """Every name and alias, alone and with one schedule-type suffix, that `resolve_sampler` takes (A1111 cuts
    suffixes in its schedulers' order, so "DPM++ 2M SGM Uniform" loses " Uniform" first and is refused)."""
    from pipelines.samplers import SAMPLERS, SCHEDULERS, split_sampler_name

    names = [n for sampler in SAMPLERS for n in (sampler.name, *sampler.aliases)]
    suffixes = dict.fromkeys(o for sched in SCHEDULERS for o in (sched.label, sched.name, *(sched.aliases or ())))
    taken = ["", *names]
    taken += [candidate for candidate in (f"{name} {suffix}" for name in names for suffix in suffixes)
              if split_sampler_name(candidate)[0] is not None]
    return taken


def _any_case(text: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.lower() != c.upper() else re.escape(c) for c in text)


def _closed_sets(schemas: dict[str, Any]) -> None:
    from pipelines.controlnet.preprocessors import PREPROCESSORS

    schemas["SamplerName"] = {"type": "string", "enum": _sampler_names(), "description": (
        "A sampler's name or alias (GET /sdapi/v1/samplers), optionally followed by a space and a schedule "
        "type's label, name or alias (GET /sdapi/v1/schedulers); empty: sampler_index. As A1111, the server also "
        "takes several suffixes, cut one schedule type at a time in its list's order (not listed here).")}
    for name in GENERATIONS:
        schema = schemas[name]
        _replace(schema, "sampler_name", {"$ref": "#/components/schemas/SamplerName"})
        _replace(schema, "restore_faces", {"enum": [False, 0]})
        _replace(schema, "script_name", {"const": ""})
        for field in ("seed_resize_from_w", "seed_resize_from_h"):
            _replace(schema, field, {"type": "integer", "enum": [-1, 0]})
    labels = sorted({n for p in PREPROCESSORS.values() for n in (p.name, p.label)})
    module = schemas["DetectRequest"]["properties"]["controlnet_module"]
    space = "[" + "".join(f"\\u{ord(c):04x}" for c in map(chr, range(0x3001)) if c.isspace()) + "]*"  # str.strip()'s
    module["pattern"] = f"^{space}(?:" + "|".join(_any_case(n) for n in labels) + f")?{space}$"


def _options(schemas: dict[str, Any]) -> None:
    """`POST /sdapi/v1/options` takes the known keys only, each of its type (handler.contract.options)."""
    properties: dict[str, Any] = {}
    for key, default in DEFAULT_OPTIONS.items():
        kind = ("boolean" if isinstance(default, bool) else "integer" if isinstance(default, int)
                else "number" if isinstance(default, float) else "string")
        properties[key] = {"type": kind}
    properties["CLIP_stop_at_last_layers"].update(minimum=1, maximum=12)
    properties["n_rows"].update(minimum=-1, maximum=16)
    for key in ("ESRGAN_tile", "SWIN_tile"):  # 0 (no tiling) or 16..2048
        properties[key] = {"anyOf": [{"type": "integer", "enum": [0]}, {"type": "integer", "minimum": 16,
                                                                       "maximum": 2048}]}
    for key in ("ESRGAN_tile_overlap", "SWIN_tile_overlap"):
        properties[key].update(minimum=0, maximum=256)
    properties["code_former_weight"].update(minimum=0, maximum=1)
    properties["hires_fix_refiner_pass"]["enum"] = list(HIRES_REFINER_PASSES)
    schemas["OptionsUpdate"].update(type="object", properties=properties, additionalProperties=False)


def _formats(schemas: dict[str, Any], s: Settings) -> None:
    source = schemas["DownloadRequest"]["properties"]["source"]
    if not s.downloads.allow_http:  # http:// sources are refused (downloads.allow_http)
        source["pattern"] = source["pattern"].replace("[Hh][Tt][Tt][Pp][Ss]?://", "[Hh][Tt][Tt][Pp][Ss]://")
    if not (s.downloads.oss_endpoint or s.storage.oss.endpoint):  # oss:// sources need an endpoint
        source["pattern"] = source["pattern"].split("|[Oo][Ss][Ss]://", 1)[0] + ")$"
    schemas["PngInfoRequest"]["properties"]["image"]["minLength"] = 1
    for name in GENERATIONS:
        if "init_images" in schemas[name]["properties"]:
            _inner(schemas[name], "init_images")["items"]["minLength"] = 1
    schemas["DetectRequest"]["properties"]["controlnet_input_images"]["items"]["minLength"] = 1


def _tiny_png() -> str:
    """A 16x16 grey PNG, base64: an input image every image field of the examples can take."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buffer, format="PNG")
    return b64(buffer.getvalue())


def _examples(doc: dict[str, Any], s: Settings) -> None:
    """A request body per operation that this deployment serves as it stands (sizes and steps within its
    limits): what the docs page's "try it out" sends, and what a fuzzer's examples phase starts from."""
    size = {"width": min(512, s.max_width) // 8 * 8, "height": min(512, s.max_height) // 8 * 8}
    txt2img = {"prompt": "a red house, (masterpiece:1.2)", "negative_prompt": "blurry", "seed": 42,
               "steps": min(20, s.max_steps), "cfg_scale": 7, "sampler_name": "DPM++ 2M Karras", **size}
    png = _tiny_png()
    examples = {
        "/sdapi/v1/txt2img": txt2img,
        "/sdapi/v1/img2img": {**txt2img, "init_images": [png], "denoising_strength": 0.6},
        "/sdapi/v1/png-info": {"image": png},
        "/controlnet/detect": {"controlnet_module": "canny", "controlnet_input_images": [png]},
        "/sdapi/v1/extra-single-image": {"image": png, "upscaler_1": "Lanczos", "upscaling_resize": 2},
        "/sdapi/v1/extra-batch-images": {"imageList": [{"data": png, "name": "a.png"}], "upscaler_1": "Lanczos",
                                         "upscaling_resize": 2},
    }
    for path, example in examples.items():
        content = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        content["example"] = example


def _links(doc: dict[str, Any]) -> None:
    """OpenAPI links, so that a client (and a stateful fuzzer) can follow one operation's answer to the next."""
    paths = doc["paths"]

    def operation_id(path: str, method: str) -> str:
        return paths[path][method]["operationId"]

    task = {"GetTask": {"operationId": operation_id("/tasks/{task_id}", "get"),
                        "parameters": {"task_id": "$response.body#/task_id"},
                        "description": "The task an asynchronous generation (?async=true) was given."}}
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
        paths[route]["post"]["responses"]["202"]["links"] = task
    paths["/models/download"]["post"]["responses"]["202"]["links"] = {"GetDownload": {
        "operationId": operation_id("/models/download/{download_id}", "get"),
        "parameters": {"download_id": "$response.body#/id"}, "description": "The download's state."}}
    paths["/images"]["get"]["responses"]["200"]["links"] = {"GetImage": {
        "operationId": operation_id("/images/{image_id}", "get"),
        "parameters": {"image_id": "$response.body#/images/0/id"}, "description": "The listing's first image."}}
