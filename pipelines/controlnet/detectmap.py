"""A unit's input image -> its detected map at the generation size, as sd-webui-controlnet computes it
(scripts/controlnet.py `get_control` and `detectmap_proc`, scripts/lvminthin.py).

`detect` runs the unit's preprocessor at its resolution (pixel perfect or `processor_res`); `fit_map` brings the
map to a generation size with the three resize modes (the same control-map resize, with binary edges
re-binarised and thinned so an edge stays one pixel wide); `preprocess` is both. `detect_map` runs one
preprocessor on one image for `POST /controlnet/detect`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipelines.controlnet.preprocessors import find_preprocessor, hwc3
from pipelines.controlnet.units import ControlUnit, ResizeMode
from pipelines.errors import InvalidParameter


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
    arr = hwc3(_to_array(image))
    if mask is not None:
        alpha = hwc3(_to_array(mask))[:, :, 0]
        if alpha.shape != arr.shape[:2]:
            raise InvalidParameter(f"{unit.mask_field}: the mask is {mask.width}x{mask.height}, the image "
                                   f"{image.width}x{image.height}", field=unit.mask_field)
        if not ((alpha <= 5).all() or (alpha >= 250).all()):
            arr = hwc3(np.ascontiguousarray(alpha))
    resolution = effective_resolution(unit, arr.shape[:2], width, height, resize_mode or unit.resize_mode)
    try:
        detected = unit.preprocessor.run(np.ascontiguousarray(arr), resolution, unit.threshold_a, unit.threshold_b)
    except InvalidParameter as exc:
        field = unit.image_field or unit.field("image")
        raise InvalidParameter(f"{field}: {exc.message}", field=field) from None
    return hwc3(np.ascontiguousarray(detected))


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
    arr = hwc3(_to_array(image))
    try:
        out = pre.run(arr, pre.resolution.bound(processor_res), pre.slider_1.bound(threshold_a),
                      pre.slider_2.bound(threshold_b))
    except InvalidParameter as exc:
        raise InvalidParameter(f"controlnet_input_images: {exc.message}", field="controlnet_input_images") from None
    return Image.fromarray(hwc3(np.ascontiguousarray(out)), "RGB")


def fit_map(detected: np.ndarray, resize_mode: ResizeMode, width: int, height: int) -> np.ndarray:
    """The extension's `detectmap_proc`: resize (Just Resize), cover and centre-crop (Crop and Resize) or fit
    and pad with the border's median colour (Resize and Fill). Returns HxWx3 uint8."""
    m = hwc3(np.ascontiguousarray(detected))
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
