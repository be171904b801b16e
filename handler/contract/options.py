"""A1111 options, per caller.

Options are never process-global and never written to a file (A1111 keeps them for the whole process and
saves them): `POST /options` sets the caller's own defaults. They live behind `OptionsStore` so that the
records database can hold them per consumer and every instance of a scaled-out deployment sees the same
values; `MemoryOptionsStore` is the embedded default (one worker's memory).
"""

from __future__ import annotations

import copy
import math
import threading
from typing import Any, Protocol

from PIL import ImageColor

# The A1111 v1.10.1 options a client is likely to read or set, with A1111's defaults.
DEFAULT_OPTIONS: dict[str, Any] = {
    "sd_model_checkpoint": None,  # filled with the current checkpoint's title when read
    "sd_checkpoint_hash": None,
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "samples_save": True,
    "samples_format": "png",
    "samples_filename_pattern": "",
    "save_images_add_number": True,
    "grid_save": True,
    "grid_format": "png",
    "grid_only_if_multiple": True,
    "grid_prevent_empty_spots": False,
    "n_rows": -1,  # grid rows: -1 autodetect, 0 the batch size
    "enable_pnginfo": True,
    "save_txt": False,
    "jpeg_quality": 80,
    "outdir_samples": "",
    "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images",
    "outdir_grids": "",
    "save_to_dirs": True,
    "directories_filename_pattern": "[date]",
    "sd_checkpoints_limit": 1,
    "sd_checkpoint_cache": 0,
    "sd_vae_overrides_per_model_preferences": True,
    "enable_emphasis": True,
    "comma_padding_backtrack": 20,
    "upcast_attn": False,
    "randn_source": "CPU",
    "eta_ddim": 0.0,
    "eta_ancestral": 1.0,
    "ddim_discretize": "uniform",
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "eta_noise_seed_delta": 0,
    "send_seed": True,
    "send_size": True,
    "return_grid": True,
    "return_mask": False,
    "return_mask_composite": False,
    "do_not_show_images": False,
    "face_restoration": False,
    "face_restoration_model": "GFPGAN",  # A1111's default is CodeFormer, which is not offered (licence)
    "code_former_weight": 0.5,
    "upscaler_for_img2img": "None",  # A1111's default is null: no upscaler
    "ESRGAN_tile": 192,
    "ESRGAN_tile_overlap": 8,
    "SWIN_tile": 192,
    "SWIN_tile_overlap": 8,
    "tiling": False,
    "img2img_background_color": "#ffffff",
    "initial_noise_multiplier": 1.0,
    "inpainting_mask_weight": 1.0,
    "img2img_color_correction": False,
    "img2img_fix_steps": False,
    "latent_upscale_default_mode": "Latent",
    "hires_fix_refiner_pass": "second pass",  # which pass of a hires-fix txt2img the refiner finishes
    "sd_lora": "None",
    "lora_preferred_name": "Alias from file",
    "show_progress_every_n_steps": 10,
    "live_previews_enable": False,
    "token_merging_ratio": 0.0,
    "api_enable_requests": False,
    "api_forbid_local_requests": True,
    "samples_log_stdout": False,
}

# A1111's choices of `hires_fix_refiner_pass` (pipelines.hires.RefinerPlan.hires_pass), the default first.
HIRES_REFINER_PASSES = ("second pass", "first pass", "both passes")

# Types a client may set each option to (bool is checked before int: bool is an int in Python).
_TYPES: dict[str, tuple[type, ...]] = {
    key: ((bool,) if isinstance(v, bool) else (int,) if isinstance(v, int) else (int, float) if isinstance(v, float)
          else (str,)) for key, v in DEFAULT_OPTIONS.items() if v is not None
}
_TYPES["sd_model_checkpoint"] = (str,)
_TYPES["sd_checkpoint_hash"] = (str,)


def option_value(key: str, value: Any) -> Any:
    """`value` as the option keeps it: an integral float for an integer option becomes that integer."""
    if _TYPES.get(key) == (int,) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_option_value(key: str, value: Any) -> str | None:
    """None when `value` is acceptable for `key`, else the reason (for a 422)."""
    if key not in DEFAULT_OPTIONS:
        return "unknown option"
    kinds = _TYPES[key]
    value = option_value(key, value)  # 2.0 is a JSON integer too (the document says "integer")
    if isinstance(value, bool) and bool not in kinds:
        return f"must be of type {kinds[0].__name__}"
    if not isinstance(value, kinds):
        return f"must be of type {kinds[0].__name__}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if key == "CLIP_stop_at_last_layers" and not 1 <= value <= 12:
        return "must be between 1 and 12"
    if key == "n_rows" and not -1 <= value <= 16:
        return "must be between -1 and 16"
    if key == "hires_fix_refiner_pass" and value not in HIRES_REFINER_PASSES:
        return "must be one of " + ", ".join(f"'{choice}'" for choice in HIRES_REFINER_PASSES)
    if key in ("ESRGAN_tile", "SWIN_tile") and not (value == 0 or 16 <= value <= 2048):
        return "must be 0 (no tiling) or between 16 and 2048"
    if key in ("ESRGAN_tile_overlap", "SWIN_tile_overlap") and not 0 <= value <= 256:
        return "must be between 0 and 256"
    if key == "code_former_weight" and not 0 <= value <= 1:
        return "must be between 0 and 1"
    if key == "img2img_background_color":
        try:
            ImageColor.getrgb(value)
        except ValueError:
            return "must be a colour such as #ffffff"
    return None


class OptionsStore(Protocol):
    """Per-consumer option overrides (only what the consumer set; defaults are applied on read)."""

    def get(self, consumer: str) -> dict[str, Any]: ...

    def update(self, consumer: str, values: dict[str, Any]) -> None: ...


class MemoryOptionsStore:
    """In-process store: per consumer, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[str, Any]] = {}

    def get(self, consumer: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._values.get(consumer, {}))

    def update(self, consumer: str, values: dict[str, Any]) -> None:
        with self._lock:
            self._values.setdefault(consumer, {}).update(copy.deepcopy(values))
