"""ControlNet units as sd-webui-controlnet takes them in `alwayson_scripts.controlnet.args`.

`parse_units` validates the extension's `ControlNetUnit` fields (legacy aliases included) into `ControlUnit`s and
raises `InvalidParameter` naming the exact field (`alwayson_scripts.controlnet.args.1.weight`). As the extension
does, `processor_res` / `threshold_a` / `threshold_b` outside the chosen preprocessor's slider range fall back to
its default (so `-1` means "default"), while a wrong type, a weight outside 0..2 or a guidance window outside
0..1 is refused. `infotext_params` gives the units' infotext entries.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.controlnet.preprocessors import (
    PREPROCESSORS,
    Preprocessor,
    find_preprocessor,
)
from pipelines.errors import InvalidParameter

log = logging.getLogger(__name__)

SCRIPT_NAME = "controlnet"  # alwayson_scripts key, matched case-insensitively as A1111 matches script titles
FIELD_PREFIX = "alwayson_scripts.controlnet"
MAX_UNITS = 4  # enabled units per request
API_VERSION = 3  # GET /controlnet/version of the extension's API


# Enums, spelled as the extension spells them (scripts/enums.py)

class ResizeMode(str, enum.Enum):
    """How the control image is fitted to the generation size."""

    JUST_RESIZE = "Just Resize"
    CROP_AND_RESIZE = "Crop and Resize"  # the extension's INNER_FIT, its default
    RESIZE_AND_FILL = "Resize and Fill"  # OUTER_FIT


class ControlMode(str, enum.Enum):
    """How a unit's control is weighed against the prompt (`control_mode`; see `stack.call_kwargs`)."""

    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"


class HiResFixOption(str, enum.Enum):
    """Which passes of a hires-fix generation a unit runs in (`hr_option`)."""

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
