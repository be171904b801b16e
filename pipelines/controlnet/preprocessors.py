"""The sd-webui-controlnet preprocessors that need no weights (scripts/preprocessor/*, annotator/*).

Each is computed with OpenCV exactly as the extension computes it: the same input resize (shortest side to the
resolution, cubic up, area down) with edge padding to multiples of 64 (`resize_image_with_pad`), the same
thresholds and blurs. A preprocessor maps an HWC3 uint8 image, its resolution and its two slider values to the
detected map (`PreprocessFn`).

`PREPROCESSORS` holds them under the extension's `/controlnet/module_list` names, in the extension's order; its
UI labels are accepted as aliases (`find_preprocessor`). Every other preprocessor the extension registers needs
annotator weights (depth, openpose, hed ...) or UNet hooks (reference, inpaint, recolor ...): those are in
`NOT_OFFERED` and refused by name with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.errors import InvalidParameter

MAX_DETECT_PIXELS = 4096 * 4096  # a preprocessor's input after its resize to processor_res


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


def hwc3(x: np.ndarray) -> np.ndarray:
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

    img = hwc3(img)
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
    return 255 - hwc3(img)


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

    img = hwc3(img)
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
    return hwc3(remove_pad(intensity.clip(0, 255).astype(np.uint8)))


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
