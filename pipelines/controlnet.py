"""ControlNet as sd-webui-controlnet serves it over the A1111 API, on diffusers.

Five parts, no HTTP:

* **Units.** `parse_units` validates `alwayson_scripts.controlnet.args` (the extension's `ControlNetUnit` fields,
  legacy aliases included) into `ControlUnit`s and raises `InvalidParameter` naming the exact field
  (`alwayson_scripts.controlnet.args.1.weight`). As the extension does, `processor_res` / `threshold_a` /
  `threshold_b` outside the chosen preprocessor's slider range fall back to its default (so `-1` means
  "default"), while a wrong type, a weight outside 0..2 or a guidance window outside 0..1 is refused.
* **Preprocessors** that need no weights, computed with OpenCV exactly as the extension computes them (same
  resizing with edge padding to multiples of 64, same control-map resize for the three resize modes, same
  binary-edge thinning); `preprocess` gives the detected map at the generation size. Preprocessors that need
  annotator weights (depth, openpose, hed ...) or UNet hooks (reference, inpaint, recolor ...) are refused by
  name. Names are the extension's `/controlnet/module_list` names; its UI labels are accepted as aliases.
* **Models** under `<data>/models/ControlNet`: `ControlNetStore` lists `.safetensors` files and diffusers
  folders with the extension's titles (`<stem> [<8-hex>]`, A1111's legacy hash: sha256 of the 64 KiB at 1 MiB)
  and resolves names as the extension does. Pickle files are never offered. Links that lead out of the folder
  are skipped.
* **Loading** offline: single files through `ControlNetModel.from_single_file(config=<shipped folder>)`
  (`configs/controlnet-sd15`: lllyasviel/control_v11p_sd15_canny; `configs/controlnet-sdxl`:
  diffusers/controlnet-canny-sdxl-1.0; `controlnet-demo-*` for the tiny demo models, chosen by the
  `sdfunc_config` metadata key), diffusers folders through `from_pretrained`. SD 1.x or SDXL is read from the
  keys, so a model that does not fit the checkpoint is refused before anything runs.
* **Generation glue**: `pipeline_class` picks the diffusers ControlNet pipeline, `call_kwargs` gives the
  component and call arguments. Every unit runs through `controlnet_stack`, a `MultiControlNetModel` that
  applies each unit's control mode as the extension does (see `call_kwargs`, `controlnet_stack`).

The process must run with `HF_HUB_OFFLINE=1` set before diffusers is first imported (see loading.py).
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from pipelines import safetensors_header
from pipelines.errors import (
    CheckpointError,
    IncompleteCheckpoint,
    InvalidParameter,
    ModelNotFound,
    PickleCheckpointRefused,
    UnsupportedArchitecture,
)
from pipelines.hashing import legacy_model_hash
from pipelines.builders.ldm_layout import unet_key_to_ldm
from pipelines.loading import CONFIG_ROOT, METADATA_CONFIG_KEY, Arch, _check_no_meta
from pipelines.store import PICKLE_SUFFIXES, leads_outside

if TYPE_CHECKING:
    from diffusers import ControlNetModel

log = logging.getLogger(__name__)

SCRIPT_NAME = "controlnet"  # alwayson_scripts key, matched case-insensitively as A1111 matches script titles
FIELD_PREFIX = "alwayson_scripts.controlnet"
MAX_UNITS = 4  # enabled units per request
MAX_DETECT_PIXELS = 4096 * 4096  # a preprocessor's input after its resize to processor_res
API_VERSION = 3  # GET /controlnet/version of the extension's API
LDM_PREFIX = "control_model."
REAL_CONFIG: dict[Arch, str] = {Arch.SD1: "controlnet-sd15", Arch.SDXL: "controlnet-sdxl"}
# "My prompt is more important" / "ControlNet is more important": the extension's per-layer soft weights,
# input blocks 0..11 then the middle block (SDXL ControlNets, with 10 outputs, take the first 10).
SOFT_LAYER_FACTORS: tuple[float, ...] = tuple(0.825 ** float(12 - i) for i in range(13))


# ---------------------------------------------------------------------------------------------------------------
# Enums, spelled as the extension spells them (scripts/enums.py)

class ResizeMode(str, enum.Enum):
    """How the control image is fitted to the generation size."""

    JUST_RESIZE = "Just Resize"
    CROP_AND_RESIZE = "Crop and Resize"  # the extension's INNER_FIT, its default
    RESIZE_AND_FILL = "Resize and Fill"  # OUTER_FIT


class ControlMode(str, enum.Enum):
    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"


class HiResFixOption(str, enum.Enum):
    BOTH = "Both"
    LOW_RES_ONLY = "Low res only"
    HIGH_RES_ONLY = "High res only"


_RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": ResizeMode.CROP_AND_RESIZE,
    "Scale to Fit (Inner Fit)": ResizeMode.CROP_AND_RESIZE,
    "Outer Fit (Shrink to Fit)": ResizeMode.RESIZE_AND_FILL,
    "Envelope (Outer Fit)": ResizeMode.RESIZE_AND_FILL,
    "Just Resize (Latent upscale)": ResizeMode.JUST_RESIZE,  # A1111 img2img resize_mode 3
}
_RESIZE_BY_NUMBER = {0: ResizeMode.JUST_RESIZE, 1: ResizeMode.CROP_AND_RESIZE, 2: ResizeMode.RESIZE_AND_FILL,
                     3: ResizeMode.JUST_RESIZE}
_CONTROL_BY_NUMBER = dict(enumerate(ControlMode))
_HR_BY_NUMBER = dict(enumerate(HiResFixOption))


def resize_mode_from_value(value: Any, field: str = "resize_mode") -> ResizeMode:
    """A name (or one of the extension's old aliases) or a number 0..3 (A1111 img2img's 3 = Just Resize)."""
    return _enum(value, field, ResizeMode, _RESIZE_BY_NUMBER, _RESIZE_ALIASES)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessors (scripts/preprocessor/*, annotator/*), the ones that need no weights

@dataclass(frozen=True)
class Slider:
    """One preprocessor parameter as the extension declares it (`PreprocessorParameter`)."""

    label: str = "EMPTY_LABEL"
    minimum: float = 0.0
    maximum: float = 1.0
    value: float = 0.5
    step: float = 0.01
    visible: bool = True

    def bound(self, value: float) -> float:
        """The extension's bound check: outside [minimum, maximum] (so -1 too) means the default."""
        if not math.isfinite(value):  # NaN compares false both ways: it would pass as in range
            return self.value
        return self.value if value < self.minimum or value > self.maximum else value

    def api_json(self) -> dict[str, Any]:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


_HIDDEN = Slider(visible=False)
_RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)

PreprocessFn = Callable[[np.ndarray, float, float, float], np.ndarray]  # (HWC3 image, resolution, a, b) -> map


@dataclass(frozen=True)
class Preprocessor:
    """`name` is the API name (`/controlnet/module_list`); `label` the UI name, accepted as an alias."""

    name: str
    label: str
    run: PreprocessFn
    resolution: Slider = _RESOLUTION
    slider_1: Slider = _HIDDEN
    slider_2: Slider = _HIDDEN
    priority: int = 0

    def detail(self) -> dict[str, Any]:
        """`module_detail` entry of `/controlnet/module_list`."""
        sliders = [s.api_json() for s in (self.resolution, self.slider_1, self.slider_2) if s.visible]
        return {"model_free": False, "sliders": sliders}


def _hwc3(x: np.ndarray) -> np.ndarray:
    """The extension's HWC3: gray -> RGB; RGBA composited over white (truncating, as it does)."""
    if x.dtype != np.uint8:
        raise ValueError("expected a uint8 image")
    if x.ndim == 2:
        x = x[:, :, None]
    channels = x.shape[2]
    if channels == 3:
        return x
    if channels == 1:
        return np.concatenate([x, x, x], axis=2)
    if channels == 4:
        color = x[:, :, 0:3].astype(np.float32)
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    raise ValueError(f"unexpected channel count {channels}")


def _pad64(x: int) -> int:
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_image_with_pad(img: np.ndarray, resolution: float) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The extension's input resize: shortest side to `resolution` (cubic up, area down), then edge padding to
    multiples of 64; returns the padded image and the function that crops a result back."""
    import cv2

    img = _hwc3(img)
    h_raw, w_raw, _ = img.shape
    k = float(resolution) / float(min(h_raw, w_raw))
    if h_raw * w_raw * k * k > MAX_DETECT_PIXELS:  # a 1 x 16384 strip at 512 would be 512 x 8M pixels
        raise InvalidParameter(f"a {w_raw}x{h_raw} image scaled to a shortest side of {int(resolution)} exceeds "
                               f"{MAX_DETECT_PIXELS} pixels; crop it or lower processor_res")
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h_target, w_target = int(np.round(float(h_raw) * k)), int(np.round(float(w_raw) * k))
    img = cv2.resize(img, (w_target, h_target), interpolation=interpolation)
    padded = np.pad(img, [[0, _pad64(h_target)], [0, _pad64(w_target)], [0, 0]], mode="edge")

    def remove_pad(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:h_target, :w_target]).copy()

    return np.ascontiguousarray(padded), remove_pad


def _pre_none(img: np.ndarray, res: float, a: float, b: float) -> np.ndarray:
    return img


def _pre_canny(img: np.ndarray, res: float, a: float, b: float) -> np.ndarray:
    import cv2

    img, remove_pad = resize_image_with_pad(img, res)
    return remove_pad(cv2.cvtColor(cv2.Canny(img, int(a), int(b)), cv2.COLOR_GRAY2RGB))


def _pre_invert(img: np.ndarray, res: float, a: float, b: float) -> np.ndarray:
    return 255 - _hwc3(img)


def _pre_blur_gaussian(img: np.ndarray, res: float, a: float, b: float) -> np.ndarray:
    import cv2

    img, remove_pad = resize_image_with_pad(img, res)
    return cv2.GaussianBlur(remove_pad(img), (0, 0), float(a))


def _pre_scribble_xdog(img: np.ndarray, res: float, a: float, b: float) -> np.ndarray:
    import cv2

    img, remove_pad = resize_image_with_pad(img, res)
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(img, dtype=np.uint8)
    result[2 * (255 - dog) > a] = 255
    return remove_pad(result)


def _pre_threshold(img: np.ndarray, res: float, a: float, b: float) -> np.ndarray:
    img, remove_pad = resize_image_with_pad(img, res)
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) > a] = 255
    return remove_pad(result)


def _pre_tile_resample(img: np.ndarray, res: float, a: float, b: float) -> np.ndarray:
    import cv2

    img = _hwc3(img)
    if a < 1.1:
        return img
    h, w, _ = img.shape
    size = (max(1, int(float(w) / float(a))), max(1, int(float(h) / float(a))))  # at least a pixel per side
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def _pre_lineart_standard(img: np.ndarray, res: float, a: float, b: float) -> np.ndarray:
    import cv2

    img, remove_pad = resize_image_with_pad(img, res)
    x = img.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    intensity *= 127
    return _hwc3(remove_pad(intensity.clip(0, 255).astype(np.uint8)))


_ALL_PREPROCESSORS = (
    Preprocessor("none", "none", _pre_none, priority=10),
    Preprocessor("canny", "canny", _pre_canny, slider_1=Slider("Low Threshold", 1, 255, 100, 1),
                 slider_2=Slider("High Threshold", 1, 255, 200, 1), priority=100),
    Preprocessor("invert", "invert (from white bg & black line)", _pre_invert, resolution=_HIDDEN, priority=20),
    Preprocessor("blur_gaussian", "blur_gaussian", _pre_blur_gaussian, slider_1=Slider("Sigma", 0.01, 64.0, 9.0)),
    Preprocessor("scribble_xdog", "scribble_xdog", _pre_scribble_xdog, slider_1=Slider("XDoG Threshold", 1, 64, 32)),
    Preprocessor("threshold", "threshold", _pre_threshold, slider_1=Slider("Binarization Threshold", 0, 255, 127)),
    Preprocessor("tile_resample", "tile_resample", _pre_tile_resample,
                 slider_1=Slider("Down Sampling Rate", 1.0, 8.0, 1.0), priority=100),
    Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)", _pre_lineart_standard,
                 priority=100),
)


def _sorted(preprocessors: Sequence[Preprocessor]) -> tuple[Preprocessor, ...]:
    """The extension's order: `none` first, then by priority and label, descending."""
    rest = sorted((p for p in preprocessors if p.name != "none"),
                  key=lambda p: str(p.priority).zfill(8) + p.label, reverse=True)
    return (next(p for p in preprocessors if p.name == "none"), *rest)


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in _sorted(_ALL_PREPROCESSORS)}
_BY_LABEL: dict[str, Preprocessor] = {p.label: p for p in PREPROCESSORS.values()}

_NEEDS_WEIGHTS = "needs annotator weights that are not installed"
_NEEDS_HOOKS = "needs UNet hooks or a control model type this service does not run"
# Every other preprocessor the extension registers (name and UI label), refused with the reason.
NOT_OFFERED: dict[str, str] = {
    **{n: _NEEDS_WEIGHTS for n in (
        "animal_openpose", "densepose", "densepose (pruple bg & purple torso)", "densepose_parula",
        "densepose_parula (black bg & blue torso)", "depth_anything", "depth_anything_v2", "depth_hand_refiner",
        "depth_leres", "depth_leres++", "depth", "depth_midas", "depth_zoe", "dw_openpose_full",
        "lineart_anime", "lineart_anime_denoise", "lineart_coarse", "lineart", "lineart_realistic",
        "mediapipe_face", "mlsd", "normal_bae", "normal_map", "normal_midas", "normal_dsine", "openpose",
        "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand", "scribble_hed",
        "pidinet_scribble", "scribble_pidinet", "anime_face_segment", "seg_anime_face", "oneformer_ade20k",
        "seg_ofade20k", "oneformer_coco", "seg_ofcoco", "segmentation", "seg_ufade20k", "hed", "softedge_hed",
        "hed_safe", "softedge_hedsafe", "pidinet", "softedge_pidinet", "pidinet_safe", "softedge_pidisafe",
        "softedge_teed", "softedge_anyline", "mobile_sam", "inpaint_only+lama", "pidinet_sketch",
        "t2ia_sketch_pidi")},
    **{n: _NEEDS_HOOKS for n in (
        "reference_only", "reference_adain", "reference_adain+attn", "revision_clipvision",
        "revision_ignore_prompt", "clip_vision", "t2ia_style_clipvision", "ip-adapter-auto",
        "ip-adapter_clip_sd15", "ip-adapter_clip_h", "ip-adapter_clip_sdxl", "ip-adapter_clip_g",
        "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_face_id", "ip-adapter_face_id_plus", "ip-adapter_pulid",
        "facexlib", "instant_id_face_embedding", "instant_id_face_keypoints", "inpaint",
        "inpaint_global_harmonious", "inpaint_only", "recolor_luminance", "recolor_intensity", "tile_colorfix",
        "tile_colorfix+sharp", "shuffle", "color", "t2ia_color_grid")},
    "binary": "was removed from sd-webui-controlnet; use threshold",
}


def module_list(alias_names: bool = False) -> dict[str, Any]:
    """The body of the extension's `GET /controlnet/module_list` for the offered preprocessors."""
    names = [p.label if alias_names else p.name for p in PREPROCESSORS.values()]
    detail = {(p.label if alias_names else p.name): p.detail() for p in PREPROCESSORS.values()}
    return {"module_list": names, "module_detail": detail}


def find_preprocessor(name: Any, field: str) -> Preprocessor:
    """By API name or UI label (exactly, then ignoring case); `None`/empty means `none`. Refused: unknown names
    (the message lists the offered ones) and preprocessors not offered here (with the reason)."""
    if name is None or (isinstance(name, str) and not name.strip()):
        return PREPROCESSORS["none"]
    if not isinstance(name, str):
        raise InvalidParameter(f"{field}: expected a preprocessor name", field=field)
    wanted = name.strip()
    found = PREPROCESSORS.get(wanted) or _BY_LABEL.get(wanted)
    if found is None:
        low = wanted.lower()
        found = next((p for p in PREPROCESSORS.values() if low in (p.name.lower(), p.label.lower())), None)
    if found is not None:
        return found
    reason = NOT_OFFERED.get(wanted) or NOT_OFFERED.get(wanted.lower())
    if reason is not None:
        raise InvalidParameter(f"{field}: preprocessor '{wanted}' is not offered ({reason}); offered: "
                               f"{', '.join(PREPROCESSORS)}", field=field)
    raise InvalidParameter(f"{field}: unknown preprocessor '{wanted}'; offered: {', '.join(PREPROCESSORS)}",
                           field=field)


# ---------------------------------------------------------------------------------------------------------------
# Units

@dataclass(frozen=True)
class ControlUnit:
    """One enabled unit, validated. Exactly one image source is set: `image` (base64 / data URL, to decode
    with the request's image limits), `image_link` (an http(s) URL the caller fetches) or `use_init_image`
    (img2img: the request's init image, with the request's resize mode, as the extension does)."""

    index: int  # position in `args` (field names use it)
    field_prefix: str
    module: str  # canonical preprocessor name
    module_as_sent: str  # what the client sent (the extension's infotext shows it)
    model: str
    weight: float = 1.0
    image: str | None = None
    mask: str | None = None
    image_link: str | None = None
    use_init_image: bool = False
    image_field: str = ""  # the request field the image (or link) came from
    mask_field: str = ""
    resize_mode: ResizeMode = ResizeMode.CROP_AND_RESIZE
    low_vram: bool = False
    processor_res: float = 512
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: ControlMode = ControlMode.BALANCED
    pixel_perfect: bool = False
    hr_option: HiResFixOption = HiResFixOption.BOTH
    save_detected_map: bool = True  # the extension appends the detected map to the response images

    def field(self, name: str) -> str:
        """The request field path of one of this unit's fields, e.g. `alwayson_scripts.controlnet.args.0.model`."""
        return f"{self.field_prefix}.args.{self.index}.{name}"

    @property
    def preprocessor(self) -> Preprocessor:
        return PREPROCESSORS[self.module]


def controlnet_script_args(alwayson_scripts: Mapping[str, Any] | None) -> tuple[str, Any] | None:
    """(field prefix, value) of the ControlNet entry of `alwayson_scripts` (key matched ignoring case, as A1111
    matches script titles), or None when there is none."""
    if not isinstance(alwayson_scripts, Mapping):
        return None
    for key, value in alwayson_scripts.items():
        if isinstance(key, str) and key.strip().lower() == SCRIPT_NAME:
            return f"alwayson_scripts.{key}", value
    return None


_LEGACY_ALIASES = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image", "mask_image": "mask"}


def parse_units(value: Any, field_prefix: str = FIELD_PREFIX, *, img2img: bool = False) -> list[ControlUnit]:
    """`{"args": [unit, ...]}` (or the bare list) -> the enabled units, in order.

    Items that are not objects are skipped, as the extension skips them; `enabled` defaults to true (units
    without it are used, as in sd-webui-controlnet up to v1.1.447; later versions skip them). A unit with
    no image and no `image_link` uses the init image for img2img and is refused for txt2img. At most
    MAX_UNITS enabled units. Raises InvalidParameter naming the field.
    """
    if value is None:
        return []
    args_field = f"{field_prefix}.args"
    if isinstance(value, Mapping):
        args = value.get("args", [])
    else:
        args, args_field = value, field_prefix
    if args is None:
        return []
    if not isinstance(args, (list, tuple)):
        raise InvalidParameter(f"{args_field}: expected a list of ControlNet units", field=args_field)
    units: list[ControlUnit] = []
    for index, raw in enumerate(args):
        if not isinstance(raw, Mapping):
            if raw is not None:
                log.info("%s.%d: not a ControlNet unit (%s); skipped", args_field, index, type(raw).__name__)
            continue
        unit = _parse_unit(dict(raw), index, field_prefix, img2img=img2img)
        if unit is None:
            continue
        units.append(unit)
        if len(units) > MAX_UNITS:
            raise InvalidParameter(f"{args_field}: at most {MAX_UNITS} enabled ControlNet units per request",
                                   field=args_field)
    return units


def _parse_unit(raw: dict[str, Any], index: int, prefix: str, *, img2img: bool) -> ControlUnit | None:
    def f(name: str) -> str:
        return f"{prefix}.args.{index}.{name}"

    for alias, key in _LEGACY_ALIASES.items():
        if alias in raw:
            if key in raw and raw[key] is not None and raw[alias] is not None:
                raise InvalidParameter(f"{f(alias)}: give either '{alias}' (deprecated) or '{key}', not both",
                                       field=f(alias))
            if raw.get(key) is None:
                raw[key] = raw[alias]
                raw.setdefault(f"__field_{key}", alias)

    def name_of(key: str) -> str:  # the field the client actually used
        return f(raw.get(f"__field_{key}", key))

    enabled = _bool(raw.get("enabled", True), name_of("enabled"), default=True)
    if not enabled:
        return None
    pre = find_preprocessor(raw.get("module"), f("module"))
    module_as_sent = raw.get("module") if isinstance(raw.get("module"), str) and raw.get("module") else "none"

    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidParameter(f"{f('model')}: expected a model name", field=f("model"))
    model = (model or "").strip()
    if model in ("", "None", "none"):
        raise InvalidParameter(f"{f('model')}: no ControlNet model selected; choose one from /controlnet/model_list",
                               field=f("model"))

    weight = float(_number(raw.get("weight"), name_of("weight"), 1.0))  # float fields, as the extension's
    if not 0.0 <= weight <= 2.0:
        raise InvalidParameter(f"{name_of('weight')}: must be between 0 and 2", field=name_of("weight"))
    start = float(_number(raw.get("guidance_start"), f("guidance_start"), 0.0))
    end = float(_number(raw.get("guidance_end"), name_of("guidance_end"), 1.0))
    for name, v in (("guidance_start", start), ("guidance_end", end)):
        if not 0.0 <= v <= 1.0:
            raise InvalidParameter(f"{name_of(name)}: must be between 0 and 1", field=name_of(name))
    if start > end:
        raise InvalidParameter(f"{f('guidance_start')}: {start} is after guidance_end {end}", field=f("guidance_start"))

    resize = raw.get("resize_mode")
    resize_mode = ResizeMode.CROP_AND_RESIZE if resize is None else resize_mode_from_value(resize, f("resize_mode"))
    control = raw.get("control_mode")
    control_mode = ControlMode.BALANCED if control is None else _enum(control, f("control_mode"), ControlMode,
                                                                      _CONTROL_BY_NUMBER)
    hr = raw.get("hr_option")
    hr_option = HiResFixOption.BOTH if hr is None else _enum(hr, f("hr_option"), HiResFixOption, _HR_BY_NUMBER)

    processor_res = pre.resolution.bound(_number(raw.get("processor_res"), f("processor_res"), -1))
    if processor_res == int(processor_res):
        processor_res = int(processor_res)  # the extension's field is an int
    threshold_a = pre.slider_1.bound(float(_number(raw.get("threshold_a"), f("threshold_a"), -1)))
    threshold_b = pre.slider_2.bound(float(_number(raw.get("threshold_b"), f("threshold_b"), -1)))

    image, mask, image_field, mask_field = _unit_images(raw, f, name_of)
    link = raw.get("image_link")
    if link is not None and not isinstance(link, str):
        raise InvalidParameter(f"{f('image_link')}: expected an http(s) URL", field=f("image_link"))
    link = (link or "").strip() or None
    if link is not None and not link.lower().startswith(("http://", "https://")):
        raise InvalidParameter(f"{f('image_link')}: expected an http(s) URL", field=f("image_link"))
    use_init = False
    if image is not None:
        link = None
    elif link is not None:
        image_field = f("image_link")
    elif img2img:
        use_init, image_field = True, "init_images"
    else:
        raise InvalidParameter(f"{f('image')}: the unit has no image (give image or image_link)", field=f("image"))
    if mask is not None and image is None:
        raise InvalidParameter(f"{mask_field}: a mask needs an image", field=mask_field)

    return ControlUnit(
        index=index, field_prefix=prefix, module=pre.name, module_as_sent=module_as_sent, model=model,
        weight=weight, image=image, mask=mask, image_link=link, use_init_image=use_init, image_field=image_field,
        mask_field=mask_field, resize_mode=resize_mode,
        low_vram=_bool(raw.get("low_vram"), name_of("low_vram"), default=False),
        processor_res=processor_res, threshold_a=threshold_a, threshold_b=threshold_b,
        guidance_start=start, guidance_end=end, control_mode=control_mode,
        pixel_perfect=_bool(raw.get("pixel_perfect"), f("pixel_perfect"), default=False),
        hr_option=hr_option,
        save_detected_map=_bool(raw.get("save_detected_map"), f("save_detected_map"), default=True),
    )


def _unit_images(raw: dict[str, Any], f: Callable[[str], str], name_of: Callable[[str], str]
                 ) -> tuple[str | None, str | None, str, str]:
    """(image, mask, image field, mask field) from the forms the extension accepts: a string, {"image", "mask"},
    [image, mask], or a one-element list of {"image", "mask"}; `mask` may also be a field of its own."""
    image, image_field = raw.get("image"), name_of("image")
    mask, mask_field = raw.get("mask"), name_of("mask")
    if isinstance(image, (list, tuple)):
        if len(image) == 1 and isinstance(image[0], Mapping):
            image, image_field = image[0], f"{image_field}.0"
        elif len(image) == 2 and not any(isinstance(i, Mapping) for i in image):
            image, mask, mask_field, image_field = image[0], image[1], f"{image_field}.1", f"{image_field}.0"
        else:
            raise InvalidParameter(f"{image_field}: one image per ControlNet unit (several are for IP-Adapter, "
                                   "which is not offered)", field=image_field)
    if isinstance(image, Mapping):
        if image.get("mask") is not None:
            mask, mask_field = image.get("mask"), f"{image_field}.mask"
        image, image_field = image.get("image"), f"{image_field}.image"
    for value, name in ((image, image_field), (mask, mask_field)):
        if value is not None and not isinstance(value, str):
            raise InvalidParameter(f"{name}: expected a base64 image or data URL", field=name)
    image = image if image and image.strip() else None
    mask = mask if mask and mask.strip() else None
    return image, mask, image_field, mask_field


def _bool(value: Any, field: str, *, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise InvalidParameter(f"{field}: expected true or false", field=field)


def _number(value: Any, field: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidParameter(f"{field}: expected a number", field=field)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidParameter(f"{field}: expected a number", field=field) from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameter(f"{field}: expected a finite number", field=field)
    return value


def _enum(value: Any, field: str, cls: type[enum.Enum], by_number: Mapping[int, Any],
          aliases: Mapping[str, Any] | None = None) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value in by_number:
            return by_number[value]
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit() and int(text) in by_number:
            return by_number[int(text)]
        for member in cls:
            if text.lower() in (member.value.lower(), member.name.lower()):
                return member
        for alias, member in (aliases or {}).items():
            if text.lower() == alias.lower():
                return member
    choices = ", ".join(f'"{m.value}" ({n})' for n, m in sorted(by_number.items()) if n < len(cls))
    raise InvalidParameter(f"{field}: expected one of {choices}", field=field)


def infotext_params(units: Sequence[ControlUnit]) -> dict[str, str]:
    """The extension's infotext entries, `{"ControlNet 0": "Module: canny, Model: ..., Weight: 1.0, ..."}`
    (the caller quotes them as A1111 quotes values with commas). A unit whose values hold ',' or ':' is left
    out, as the extension leaves it out."""
    out: dict[str, str] = {}
    for i, unit in enumerate(units):
        values = {
            "Module": unit.module_as_sent, "Model": unit.model, "Weight": unit.weight,
            "Resize Mode": unit.resize_mode.value, "Processor Res": unit.processor_res,
            "Threshold A": unit.threshold_a, "Threshold B": unit.threshold_b,
            "Guidance Start": unit.guidance_start, "Guidance End": unit.guidance_end,
            "Pixel Perfect": unit.pixel_perfect, "Control Mode": unit.control_mode.value,
        }
        text = {k: str(v) for k, v in values.items()}
        if any("," in v or ":" in v for v in text.values()):
            log.warning("ControlNet %d: a value holds ',' or ':'; left out of the infotext", i)
            continue
        out[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in text.items())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing: input image -> detected map at the generation size (scripts/controlnet.py get_control,
# detectmap_proc; scripts/lvminthin.py)

def _align8(x: int) -> int:
    return (int(x) // 8) * 8


def _to_array(image: Image.Image) -> np.ndarray:
    """A PIL image as the extension reads it (np.array of the decoded image; RGBA kept for HWC3)."""
    if image.mode in ("RGB", "RGBA", "L"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"), dtype=np.uint8)
    if image.mode in ("1", "I", "I;16", "F"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def pixel_perfect_resolution(image_hw: tuple[int, int], width: int, height: int, resize_mode: ResizeMode) -> int:
    """The preprocessor resolution "Pixel Perfect" picks: the input's shortest side scaled as the resize mode
    scales the image onto width x height (both aligned down to 8)."""
    raw_h, raw_w = image_hw
    k0, k1 = float(_align8(height)) / float(raw_h), float(_align8(width)) / float(raw_w)
    k = min(k0, k1) if resize_mode is ResizeMode.RESIZE_AND_FILL else max(k0, k1)
    return int(np.round(k * float(min(raw_h, raw_w))))


def effective_resolution(unit: ControlUnit, image_hw: tuple[int, int], width: int, height: int,
                         resize_mode: ResizeMode | None = None) -> float:
    """The resolution the unit's preprocessor runs at (pixel perfect or `processor_res`)."""
    if unit.pixel_perfect:
        return pixel_perfect_resolution(image_hw, width, height, resize_mode or unit.resize_mode)
    return unit.processor_res


def detect(unit: ControlUnit, image: Image.Image, width: int, height: int, *, mask: Image.Image | None = None,
           resize_mode: ResizeMode | None = None) -> np.ndarray:
    """The unit's raw detected map (HxWx3 uint8 at the preprocessor's resolution) for a generation of
    width x height (which only pixel perfect uses). `fit_map` brings it to a generation size.

    `image` as decoded (transparency is composited over white, as the extension does). `mask`, the unit's
    mask: when it is neither all black nor all white the extension uses it as the input ("canvas scribble").
    `resize_mode` overrides the unit's (for `use_init_image` units pass the img2img request's resize mode).
    Raises InvalidParameter when the mask's size differs from the image's.
    """
    arr = _hwc3(_to_array(image))
    if mask is not None:
        alpha = _hwc3(_to_array(mask))[:, :, 0]
        if alpha.shape != arr.shape[:2]:
            raise InvalidParameter(f"{unit.mask_field}: the mask is {mask.width}x{mask.height}, the image "
                                   f"{image.width}x{image.height}", field=unit.mask_field)
        if not ((alpha <= 5).all() or (alpha >= 250).all()):
            arr = _hwc3(np.ascontiguousarray(alpha))
    resolution = effective_resolution(unit, arr.shape[:2], width, height, resize_mode or unit.resize_mode)
    try:
        detected = unit.preprocessor.run(np.ascontiguousarray(arr), resolution, unit.threshold_a, unit.threshold_b)
    except InvalidParameter as exc:
        field = unit.image_field or unit.field("image")
        raise InvalidParameter(f"{field}: {exc.message}", field=field) from None
    return _hwc3(np.ascontiguousarray(detected))


def preprocess(unit: ControlUnit, image: Image.Image, width: int, height: int, *,
               mask: Image.Image | None = None, resize_mode: ResizeMode | None = None) -> Image.Image:
    """The unit's detected map (RGB) at width x height aligned down to 8, as the extension aligns them: `detect`
    then `fit_map` with the resize mode. This map is what the extension appends to the response images.
    For a hires-fix second pass the extension fits the same detected map again:
    `fit_map(detect(unit, image, w, h), mode, hr_w // 8 * 8, hr_h // 8 * 8)`."""
    mode = resize_mode or unit.resize_mode
    detected = detect(unit, image, width, height, mask=mask, resize_mode=mode)
    return Image.fromarray(fit_map(detected, mode, _align8(width), _align8(height)), "RGB")


def detect_map(module: str, image: Image.Image, *, processor_res: float = -1, threshold_a: float = -1,
               threshold_b: float = -1, field: str = "controlnet_module") -> Image.Image:
    """One preprocessor on one image at its own resolution (the extension's `POST /controlnet/detect`)."""
    pre = find_preprocessor(module, field)
    arr = _hwc3(_to_array(image))
    try:
        out = pre.run(arr, pre.resolution.bound(processor_res), pre.slider_1.bound(threshold_a),
                      pre.slider_2.bound(threshold_b))
    except InvalidParameter as exc:
        raise InvalidParameter(f"controlnet_input_images: {exc.message}", field="controlnet_input_images") from None
    return Image.fromarray(_hwc3(np.ascontiguousarray(out)), "RGB")


def fit_map(detected: np.ndarray, resize_mode: ResizeMode, width: int, height: int) -> np.ndarray:
    """The extension's `detectmap_proc`: resize (Just Resize), cover and centre-crop (Crop and Resize) or fit
    and pad with the border's median colour (Resize and Fill). Returns HxWx3 uint8."""
    m = _hwc3(np.ascontiguousarray(detected))
    h, w = height, width
    if resize_mode is ResizeMode.JUST_RESIZE:
        return np.ascontiguousarray(_high_quality_resize(m, (w, h)))
    old_h, old_w = float(m.shape[0]), float(m.shape[1])
    k0, k1 = float(h) / old_h, float(w) / old_w
    if resize_mode is ResizeMode.RESIZE_AND_FILL:
        k = min(k0, k1)
        borders = np.concatenate([m[0, :, :], m[-1, :, :], m[:, 0, :], m[:, -1, :]], axis=0)
        color = np.median(borders, axis=0).astype(m.dtype)
        canvas = np.tile(color[None, None], [h, w, 1])
        m = _high_quality_resize(m, (int(np.round(old_w * k)), int(np.round(old_h * k))))
        new_h, new_w, _ = m.shape
        pad_h, pad_w = max(0, (h - new_h) // 2), max(0, (w - new_w) // 2)
        canvas[pad_h:pad_h + new_h, pad_w:pad_w + new_w] = m
        return np.ascontiguousarray(canvas)
    k = max(k0, k1)
    m = _high_quality_resize(m, (int(np.round(old_w * k)), int(np.round(old_h * k))))
    new_h, new_w, _ = m.shape
    pad_h, pad_w = max(0, (new_h - h) // 2), max(0, (new_w - w) // 2)
    return np.ascontiguousarray(m[pad_h:pad_h + h, pad_w:pad_w + w])


def _high_quality_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lvmin's control-map resize: nearest for few-colour maps (segmentation), area down, cubic up, and
    binary maps re-binarised (Otsu), one-pixel edges thinned again so an edge stays one pixel wide."""
    import cv2

    if x.shape[0] == size[1] and x.shape[1] == size[0]:
        return x
    new_area, old_area = size[0] * size[1], x.shape[0] * x.shape[1]
    unique_colors = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
    is_binary = is_one_pixel_edge = False
    if unique_colors == 2:
        is_binary = bool(np.min(x) < 16 and np.max(x) > 240)
        if is_binary:
            kernel = np.ones((3, 3), dtype=np.uint8)
            xc = cv2.dilate(cv2.erode(x, kernel, iterations=1), kernel, iterations=1)
            one_pixel_edge_count = np.where(xc < x)[0].shape[0]
            all_edge_count = np.where(x > 127)[0].shape[0]
            is_one_pixel_edge = one_pixel_edge_count * 2 > all_edge_count
    if 2 < unique_colors < 200:
        interpolation = cv2.INTER_NEAREST
    elif new_area < old_area:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, size, interpolation=interpolation)
    if is_binary:
        y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        if is_one_pixel_edge:
            y = _nake_nms(y)
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = _lvmin_thin(y, prunings=new_area > old_area)
        else:
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([y] * 3, axis=2)
    return y


def _rotations(raw: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.rot90(x, k=k, axes=(0, 1)) for k in range(4) for x in raw]


_THIN_KERNELS = _rotations([np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], dtype=np.int32),
                            np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], dtype=np.int32)])
_PRUNE_KERNELS = _rotations([np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], dtype=np.int32),
                             np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], dtype=np.int32)])


def _thin_once(x: np.ndarray, kernels: Sequence[np.ndarray]) -> tuple[np.ndarray, bool]:
    import cv2

    done = True
    for kernel in kernels:
        hits = np.where(cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127)
        x[hits] = 0
        if hits[0].shape[0] > 0:
            done = False
    return x, done


def _lvmin_thin(x: np.ndarray, prunings: bool = True) -> np.ndarray:
    for _ in range(32):
        x, done = _thin_once(x, _THIN_KERNELS)
        if done:
            break
    if prunings:
        x, _ = _thin_once(x, _PRUNE_KERNELS)
    return x


def _nake_nms(x: np.ndarray) -> np.ndarray:
    import cv2

    y = np.zeros_like(x)
    for f in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
              [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]]):
        np.putmask(y, cv2.dilate(x, kernel=np.array(f, dtype=np.uint8)) == x, x)
    return y


# ---------------------------------------------------------------------------------------------------------------
# The models folder (scripts/global_state.py)

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


@dataclass(frozen=True)
class ControlNetEntry:
    """One ControlNet: `name` is its path relative to the folder; `title` is what the extension lists."""

    name: str
    path: Path
    is_dir: bool
    short_hash: str  # A1111's legacy 8-hex hash (of the weights file for a diffusers folder)

    @property
    def stem(self) -> str:
        return self.path.name if self.is_dir else self.path.stem

    @property
    def title(self) -> str:
        return f"{self.stem} [{self.short_hash}]"

    @property
    def weights(self) -> Path:
        """The safetensors file holding the weights."""
        if not self.is_dir:
            return self.path
        return next((self.path / n for n in _WEIGHT_FILES if (self.path / n).is_file()), self.path / _WEIGHT_FILES[0])


class ControlNetStore:
    """The ControlNets under `root` (sub-folders too), scanned on construction and on `refresh`. Thread-safe.

    Single `.safetensors` files and diffusers folders (`config.json` of a `ControlNetModel` plus a safetensors
    weights file). Pickle files are never offered (naming one is a clear error); hidden files, a file whose stem
    is `None`, and links leading out of `root` are skipped. Titles repeat the extension's: `<stem> [<hash>]`,
    sorted by file name; of two models with one stem the first in path order is kept.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._entries: list[ControlNetEntry] = []
        self._refused: dict[str, Path] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._specs: dict[tuple[str, int, int], ControlNetSpec] = {}
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folder."""
        entries: list[ControlNetEntry] = []
        refused: dict[str, Path] = {}
        root = self.root
        if root.is_dir():
            real_root = root.resolve()
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root)
                if any(part.startswith(".") for part in rel.parts) or _inside_model_dir(path, root):
                    continue
                if path.is_dir():
                    if not _is_controlnet_dir(path) or leads_outside(path, real_root, "ControlNet"):
                        continue
                    weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
                    if weights is None:
                        log.warning("ControlNet folder %s has no safetensors weights and is not offered", rel)
                        continue
                    entries.append(ControlNetEntry(rel.as_posix(), path, True, self._hash(weights)))
                elif path.suffix.lower() in PICKLE_SUFFIXES:
                    refused[rel.as_posix()] = path
                elif (path.suffix == ".safetensors" and path.stem != "None"
                      and not leads_outside(path, real_root, "ControlNet")):
                    entries.append(ControlNetEntry(rel.as_posix(), path, False, self._hash(path)))
        for rel in refused:
            log.warning("ControlNet %s is a pickle file and is not offered; convert it to .safetensors", rel)
        seen: set[str] = set()
        unique: list[ControlNetEntry] = []
        for entry in entries:
            if entry.stem.lower() in seen:
                log.warning("ControlNet %s has the name of another one and is not offered", entry.name)
                continue
            seen.add(entry.stem.lower())
            unique.append(entry)
        unique.sort(key=lambda e: e.path.name)
        with self._lock:
            self._entries, self._refused = unique, refused
        log.info("found %d ControlNet model(s)", len(unique))

    def _hash(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            known = legacy_model_hash(path)
            with self._lock:
                self._hashes[key] = known
        return known

    @property
    def entries(self) -> list[ControlNetEntry]:
        with self._lock:
            return list(self._entries)

    def model_list(self) -> list[str]:
        """The titles, as the extension's `GET /controlnet/model_list` gives them (without "None")."""
        return [e.title for e in self.entries]

    def find(self, name: str, field: str) -> ControlNetEntry:
        """Resolve a unit's `model` as the extension does: the title, then the stem ignoring case, then the
        shortest stem containing the name; a title whose hash differs from the file's resolves by its stem
        (logged). Unknown -> ModelNotFound; "None" -> InvalidParameter; a pickle file -> PickleCheckpointRefused;
        all naming `field`."""
        wanted = (name or "").strip() if isinstance(name, str) else ""
        if wanted in ("", "None", "none"):
            raise InvalidParameter(f"{field}: no ControlNet model selected", field=field)
        entries = self.entries
        low = wanted.lower()
        for entry in entries:
            if wanted == entry.title:
                return entry
        for entry in entries:
            if low in (entry.stem.lower(), entry.name.lower()):
                return entry
        bare, _, bracket = wanted.partition(" [")
        if bracket.endswith("]"):
            for entry in entries:
                if bare.lower() == entry.stem.lower():
                    log.warning("%s: '%s' has hash [%s] here; using it", field, entry.stem, entry.short_hash)
                    return entry
        containing = sorted((e for e in entries if low in e.stem.lower()), key=lambda e: len(e.stem))
        if containing:
            return containing[0]
        stem = Path(bare).stem if Path(bare).suffix.lower() in PICKLE_SUFFIXES else bare
        with self._lock:
            refused = dict(self._refused)
        if any(bare == rel or stem.lower() == Path(rel).stem.lower() for rel in refused):
            raise PickleCheckpointRefused(f"{field}: ControlNet '{wanted}' is a pickle file; only .safetensors "
                                          "models are loaded", field=field)
        raise ModelNotFound(f"{field}: ControlNet model '{wanted}' not found under models/ControlNet", field=field)

    def spec(self, entry: ControlNetEntry, field: str | None = None) -> ControlNetSpec:
        """`inspect_controlnet` of the entry, cached while the file is unchanged."""
        st = entry.weights.stat()
        key = (str(entry.path), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._specs.get(key)
        if known is None:
            known = inspect_controlnet(entry.path, field=field)
            with self._lock:
                self._specs[key] = known
        return known


def _is_controlnet_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == "ControlNetModel"


def _inside_model_dir(path: Path, root: Path) -> bool:
    for parent in path.parents:
        if parent == root:
            return False
        if _is_controlnet_dir(parent):
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# Loading

@dataclass(frozen=True)
class ControlNetSpec:
    """What a ControlNet file is: its architecture, key layout ("ldm", "diffusers" or "folder"), the shipped
    config folder that loads it, and whether it pools its output (the extension's shuffle models)."""

    arch: Arch
    layout: str
    config_dir: Path | None
    global_pool: bool = False


def _config_arch(config_dir: Path) -> Arch:
    config = json.loads((config_dir / "config.json").read_text())
    return Arch.SDXL if config.get("addition_embed_type") == "text_time" else Arch.SD1


def shipped_controlnet_configs() -> dict[str, Arch]:
    """Config folders `controlnet-*` under configs/ -> their architecture."""
    return {d.name: _config_arch(d) for d in sorted(CONFIG_ROOT.glob("controlnet-*")) if (d / "config.json").is_file()}


def inspect_controlnet(path: Path, *, field: str | None = None) -> ControlNetSpec:
    """Read a ControlNet's header (or folder config) and say how to load it. Raises ModelNotFound,
    PickleCheckpointRefused, UnsupportedArchitecture (T2I-Adapter, control-LoRA, SD 2.x, SDXL mid/small ...),
    CheckpointError; each naming `field` when given."""
    path = Path(path)
    name = path.name
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleCheckpointRefused(f"{name}: pickle files are refused; convert it to .safetensors", field=field)
    if path.is_dir():
        if not _is_controlnet_dir(path):
            raise CheckpointError(f"{name}: folder without a ControlNetModel config.json", field=field)
        return ControlNetSpec(_config_arch(path), "folder", None, bool(
            json.loads((path / "config.json").read_text()).get("global_pool_conditions")))
    try:
        header = safetensors_header.read_header(path)
    except FileNotFoundError:
        raise ModelNotFound(f"{name}: no such ControlNet", field=field) from None
    except safetensors_header.HeaderError as e:
        raise CheckpointError(f"{name}: {e}", field=field) from e
    shapes = header.shapes()
    keys = set(shapes)

    def unsupported(what: str) -> UnsupportedArchitecture:
        return UnsupportedArchitecture(f"{name}: {what} is not supported; only ControlNets for SD 1.x and SDXL",
                                       field=field)

    if "lora_controlnet" in keys:
        raise unsupported("a control-LoRA")
    prefix = LDM_PREFIX if f"{LDM_PREFIX}input_hint_block.0.weight" in keys else ""
    if f"{prefix}input_hint_block.0.weight" in keys:
        layout = "ldm"
        if f"{prefix}difference" in keys:
            raise unsupported("a difference ControlNet")
        sdxl = f"{prefix}label_emb.0.0.weight" in keys
        to_k = f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        full = f"{prefix}input_blocks.8.1.transformer_blocks.9.norm3.weight" in keys
    elif "controlnet_cond_embedding.conv_in.weight" in keys:
        layout = "diffusers"
        sdxl = "add_embedding.linear_1.weight" in keys
        to_k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        full = "down_blocks.2.attentions.1.transformer_blocks.9.norm3.weight" in keys
    elif any(k.startswith(("adapter.", "body.")) for k in keys) or "conv_in.weight" in keys:
        raise unsupported("a T2I-Adapter")
    elif any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        raise unsupported("an IP-Adapter")
    else:
        raise UnsupportedArchitecture(f"{name}: not a ControlNet (no hint block)", field=field)
    arch = Arch.SDXL if sdxl else Arch.SD1

    config_name = header.metadata.get(METADATA_CONFIG_KEY)
    shipped = shipped_controlnet_configs()
    if config_name is not None and config_name in shipped:
        if shipped[config_name] is not arch:
            raise CheckpointError(f"{name}: metadata config {config_name!r} is {shipped[config_name].value}, keys "
                                  f"say {arch.value}", field=field)
    else:
        if config_name is not None:
            log.warning("%s: metadata %s=%r names no shipped ControlNet config", name, METADATA_CONFIG_KEY, config_name)
        config_name = REAL_CONFIG[arch]
        if arch is Arch.SD1:
            context = shapes.get(to_k, (None, [0, 0]))[1]
            if len(context) != 2 or context[1] != 768:
                raise unsupported(f"a ControlNet with text context {context[1] if len(context) == 2 else '?'} "
                                  "(SD 2.x?)")
        elif layout == "ldm":
            # diffusers' single-file converter does not carry `label_emb` over: the model would stay incomplete.
            raise unsupported("an SDXL ControlNet in the LDM layout (use the diffusers layout)")
        elif not full:
            raise unsupported("an SDXL ControlNet of the mid or small size")
    global_pool = arch is Arch.SD1 and "shuffle" in path.stem.lower()  # as the extension decides it
    return ControlNetSpec(arch, layout, CONFIG_ROOT / config_name, global_pool)


def check_compatible(spec: ControlNetSpec, checkpoint_arch: Arch | str, field: str, title: str = "") -> None:
    """InvalidParameter naming `field` when the ControlNet is for the other architecture than the checkpoint."""
    want = Arch(checkpoint_arch)
    if spec.arch is not want:
        names = {Arch.SD1: "SD 1.x", Arch.SDXL: "SDXL"}
        what = f"ControlNet '{title}'" if title else "the ControlNet"
        raise InvalidParameter(f"{field}: {what} is for {names[spec.arch]}; the checkpoint is {names[want]}",
                               field=field)


def load_controlnet(entry: ControlNetEntry | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    disable_mmap: bool = False, spec: ControlNetSpec | None = None,
                    field: str | None = None) -> ControlNetModel:
    """A ControlNet file or diffusers folder -> `ControlNetModel` on `device` in `dtype`, offline.

    Raises what `inspect_controlnet` raises, IncompleteCheckpoint when a tensor is missing (a parameter left on
    `meta`), and CheckpointError for anything else diffusers rejects (shape mismatches)."""
    from diffusers import ControlNetModel

    from pipelines.loading import _LOAD_ERRORS, _is_oom, _load_error

    path = entry.path if isinstance(entry, ControlNetEntry) else Path(entry)
    spec = spec or inspect_controlnet(path, field=field)
    try:
        if spec.layout == "folder":
            present = [n for n in _WEIGHT_FILES if (path / n).is_file()]
            if not present:
                raise PickleCheckpointRefused(f"{path.name}: no safetensors weights (pickle .bin files are refused)",
                                              field=field)
            variant = "fp16" if present[0].endswith(".fp16.safetensors") else None
            model = ControlNetModel.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                    use_safetensors=True, variant=variant)
        else:
            model = ControlNetModel.from_single_file(
                str(path), config=str(spec.config_dir), dtype=dtype, local_files_only=True, disable_mmap=disable_mmap,
                **({"global_pool_conditions": True} if spec.global_pool else {}))
    except TypeError as e:
        if "NoneType" not in str(e):
            raise
        # diffusers' ControlNet converter hands on None for a key the file lacks
        raise IncompleteCheckpoint(f"{path.name}: a tensor the ControlNet needs is missing from the file",
                                   field=field) from e
    except _LOAD_ERRORS as e:
        if _is_oom(e):
            raise
        err = _load_error(path, "ControlNet", e)
        err.field = field
        raise err from e
    try:
        _check_no_meta({"controlnet": model}, path)
    except CheckpointError as e:
        e.field = field
        raise
    return model.to(device).eval()


def arch_of(model: ControlNetModel) -> Arch:
    """SDXL for a ControlNet with SDXL's added time/text embedding, else SD 1.x."""
    return Arch.SDXL if model.config.get("addition_embed_type") == "text_time" else Arch.SD1


# ---------------------------------------------------------------------------------------------------------------
# LDM (A1111) layout export, the inverse of diffusers' `convert_controlnet_checkpoint`

_RE_COND_BLOCK = re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)")
_RE_ZERO_CONV = re.compile(r"controlnet_down_blocks\.(\d+)\.(weight|bias)")


def controlnet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers `ControlNetModel` state dict -> the A1111 single-file keys under `control_model.`
    (`input_blocks`, `zero_convs`, `input_hint_block`, `middle_block`, `middle_block_out`). Tensors unchanged.

    The hint block must have the 4 embedding levels every public ControlNet has (its output conv is
    `input_hint_block.14`, where diffusers' importer looks for it); any unknown key raises ValueError."""
    levels = len(config.get("conditioning_embedding_out_channels") or ())
    if levels != 4:
        raise ValueError(f"the LDM layout needs 4 conditioning embedding levels, the config has {levels}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        if module == "controlnet_cond_embedding.conv_in":
            new = f"input_hint_block.0.{param}"
        elif module == "controlnet_cond_embedding.conv_out":
            new = f"input_hint_block.14.{param}"
        elif m := _RE_COND_BLOCK.fullmatch(key):
            new = f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
        elif m := _RE_ZERO_CONV.fullmatch(key):
            new = f"zero_convs.{m[1]}.0.{m[2]}"
        elif module == "controlnet_mid_block":
            new = f"middle_block_out.0.{param}"
        else:
            new = unet_key_to_ldm(key, config)
        new = LDM_PREFIX + new
        if new in out:
            raise ValueError(f"two ControlNet keys map to {new!r}")
        out[new] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generation glue

_PIPELINES: dict[tuple[Arch, str], str] = {
    (Arch.SD1, "txt2img"): "StableDiffusionControlNetPipeline",
    (Arch.SD1, "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    (Arch.SD1, "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    (Arch.SDXL, "txt2img"): "StableDiffusionXLControlNetPipeline",
    (Arch.SDXL, "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    (Arch.SDXL, "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}


def pipeline_class(arch: Arch | str, mode: str, inpaint: bool) -> type:
    """The diffusers ControlNet pipeline for `arch` ("sd1"/"sdxl"), `mode` ("txt2img"/"img2img") and inpainting
    (img2img with a mask). Build it over the cached components with `assemble_pipeline(cls, components,
    controlnet=..., scheduler=...)`."""
    import diffusers

    if mode not in ("txt2img", "img2img") or (inpaint and mode != "img2img"):
        raise ValueError(f"no ControlNet pipeline for mode {mode!r} (inpaint={inpaint})")
    return getattr(diffusers, _PIPELINES[(Arch(arch), "inpaint" if inpaint else mode)])


def _cond_half(value: Any, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[batch // 2:]
    if isinstance(value, Mapping):
        return {k: _cond_half(v, batch) for k, v in value.items()}
    return value


def controlnet_stack(controlnets: Sequence[ControlNetModel], *, layer_factors: Sequence[Sequence[float] | None],
                     cond_only: Sequence[bool], cfg: bool) -> Any:
    """A `MultiControlNetModel` (what the diffusers pipelines take for several ControlNets; used for one too)
    that runs each ControlNet as its unit's control mode asks, the way the extension applies it:

    * every output of net i is multiplied by `layer_factors[i][j]` (output j: the input blocks, then the middle
      block), None = all 1;
    * with `cfg` (the pipeline batches unconditional + conditional), `cond_only[i]` runs net i on the
      conditional half only and adds nothing to the unconditional half (the extension's cfg injection;
      diffusers' guess mode does the same for all nets at once). Pooling ControlNets (`global_pool_conditions`,
      the extension's shuffle) are conditional-only always, as there.

    Call the pipeline with `guess_mode=False` (when a pooling ControlNet comes first the pipeline switches guess
    mode on by itself; the batch is then conditional-only and is taken as it comes). A net whose scale is 0 at
    a step (outside its guidance window) is not run, as the extension does not run it.
    """
    return _stack_class()(controlnets, layer_factors=layer_factors, cond_only=cond_only, cfg=cfg)


@functools.cache
def _stack_class() -> type:
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    class ControlNetStack(MultiControlNetModel):
        __doc__ = controlnet_stack.__doc__

        def __init__(self, controlnets: Sequence[Any], *, layer_factors: Sequence[Sequence[float] | None],
                     cond_only: Sequence[bool], cfg: bool) -> None:
            super().__init__(list(controlnets))
            if not (len(layer_factors) == len(cond_only) == len(self.nets)):
                raise ValueError("one layer_factors and one cond_only entry per ControlNet")
            self.layer_factors = [None if f is None else tuple(float(x) for x in f) for f in layer_factors]
            self.cond_only = [bool(c) for c in cond_only]
            self.cfg = bool(cfg)

        def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                    controlnet_cond: Sequence[torch.Tensor], conditioning_scale: Sequence[float],
                    class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None, added_cond_kwargs: dict[str, Any] | None = None,
                    cross_attention_kwargs: dict[str, Any] | None = None, guess_mode: bool = False,
                    return_dict: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
            doubled = self.cfg and not guess_mode
            batch = sample.shape[0]
            total_down: list[torch.Tensor] | None = None
            total_mid: torch.Tensor | None = None
            runs = [i for i, s in enumerate(conditioning_scale) if float(s) != 0.0] or [0]
            for i in runs:
                net = self.nets[i]
                half = doubled and (self.cond_only[i] or bool(net.config.global_pool_conditions))
                kwargs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                          "controlnet_cond": controlnet_cond[i], "class_labels": class_labels,
                          "timestep_cond": timestep_cond, "attention_mask": attention_mask,
                          "added_cond_kwargs": added_cond_kwargs}
                if half:
                    kwargs = {k: _cond_half(v, batch) for k, v in kwargs.items()}
                down, mid = net(**kwargs, conditioning_scale=conditioning_scale[i],
                                cross_attention_kwargs=cross_attention_kwargs, guess_mode=False, return_dict=False)
                factors = self.layer_factors[i]
                if factors is not None:
                    if len(factors) != len(down) + 1:
                        raise ValueError(f"ControlNet {i}: {len(down) + 1} outputs, {len(factors)} layer factors")
                    down = [d * f for d, f in zip(down, factors)]
                    mid = mid * factors[-1]
                if half:
                    down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                    mid = torch.cat([torch.zeros_like(mid), mid])
                if total_down is None:
                    total_down, total_mid = list(down), mid
                else:
                    total_down = [a + b for a, b in zip(total_down, down)]
                    total_mid = total_mid + mid
            return total_down, total_mid

    ControlNetStack.__module__ = __name__
    return ControlNetStack


def is_stack(module: Any) -> bool:
    """Whether `module` was made by `controlnet_stack`."""
    return type(module).__name__ == "ControlNetStack" and type(module).__module__ == __name__


def layer_factors(model: ControlNetModel, control_mode: ControlMode) -> list[float] | None:
    """Per-output weights of a control mode: None for Balanced; the extension's soft weights
    `0.825 ** (12 - j)` for the other two (first `outputs` of them, as it takes 10 for SDXL)."""
    if control_mode is ControlMode.BALANCED:
        return None
    outputs = len(model.controlnet_down_blocks) + 1
    return list(SOFT_LAYER_FACTORS[:outputs]) + [1.0] * max(0, outputs - len(SOFT_LAYER_FACTORS))


def call_kwargs(models: Sequence[ControlNetModel], maps: Sequence[Image.Image], units: Sequence[ControlUnit],
                mode: str, *, guidance_scale: float, steps: int | None = None,
                hires_pass: bool | None = None) -> dict[str, Any]:
    """Everything the ControlNet pipeline needs for these units (one model and one detected map per unit).

    Returns `{"controlnet": controlnet_stack(...), "image" (txt2img) | "control_image" (img2img, inpaint): maps,
    "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end": one per unit,
    "guess_mode": False}`. Pop "controlnet" into the pipeline's components; pass the rest to the call.
    `guidance_scale` is the request's CFG scale (above 1 the pipeline batches unconditional + conditional).

    How the extension's fields map:
    * `weight` -> `controlnet_conditioning_scale` (every output times the weight, as there).
    * `control_mode` Balanced -> plain ControlNet on both halves of the CFG batch; "My prompt is more important"
      -> outputs times `weight * 0.825 ** (12 - j)`, both halves (the extension's soft injection, exactly);
      "ControlNet is more important" -> the same soft weights on the conditional half only (its cfg injection).
      diffusers' own `guess_mode` is the latter for all nets at once with `logspace(-1, 0)` weights: within 1 %
      of these for SD 1.5's 13 outputs, but 0.1 .. 1 over SDXL's 10 where the extension takes 0.825 ** 12 ..
      0.825 ** 3; it is not used, so units can differ and SDXL matches too.
    * `guidance_start` / `guidance_end` -> `control_guidance_start/end`. The extension runs a unit at step i
      (of N) while start <= i/N <= end, diffusers while start <= i/N and (i+1)/N <= end: with `steps` = N
      (the number of denoising steps the pipeline runs) the end is moved by 1/N so the same steps run; without
      it diffusers stops one step earlier. A window that holds no step makes the unit's scale 0.
    * `hr_option` (only with hires fix: `hires_pass` False for its first pass, True for the second, None
      without hires fix): "Low res only" units get scale 0 in the second pass, "High res only" ones in the first.
      In the second pass canny units take the soft weights even when Balanced, as the extension forces them.
    """
    if not (len(models) == len(maps) == len(units)) or not units:
        raise ValueError("one model and one map per unit, at least one unit")
    if mode not in ("txt2img", "img2img"):
        raise ValueError(f"unknown mode {mode!r}")
    scales: list[float] = []
    starts: list[float] = []
    ends: list[float] = []
    for unit in units:
        start, end, scale = unit.guidance_start, unit.guidance_end, float(unit.weight)
        if hires_pass is not None and unit.hr_option is not HiResFixOption.BOTH and hires_pass == (
                unit.hr_option is HiResFixOption.LOW_RES_ONLY):
            scale = 0.0  # "Low res only" in the second pass, "High res only" in the first
        if steps:
            end = min(1.0, end + 1.0 / steps + 1e-9)
        if start >= end:  # no step inside the window (diffusers refuses an empty one)
            start, end, scale = 0.0, 1.0, 0.0
        scales.append(scale)
        starts.append(float(start))
        ends.append(float(end))
    stack = controlnet_stack(
        list(models),
        layer_factors=[layer_factors(m, ControlMode.PROMPT if hires_pass and u.module == "canny"
                                     and u.control_mode is ControlMode.BALANCED else u.control_mode)
                       for m, u in zip(models, units)],
        cond_only=[u.control_mode is ControlMode.CONTROL for u in units],
        cfg=guidance_scale > 1.0,
    )
    return {
        "controlnet": stack,
        "image" if mode == "txt2img" else "control_image": list(maps),
        "controlnet_conditioning_scale": scales,
        "control_guidance_start": starts,
        "control_guidance_end": ends,
        "guess_mode": False,
    }
