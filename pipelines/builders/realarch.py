"""Random-weight checkpoints with the real SD 1.5 / SDXL architectures, in the public single-file layout.

No real weights can be downloaded; these files have the exact tensor names, shapes and dtype of a civitai /
A1111 checkpoint (SD 1.5 fp16 ~2.1 GB, SDXL fp16 ~6.9 GB), built from the shipped config folders
`pipelines/configs/sd15` and `sdxl`. They exercise the real loading path and give real GPU timings; their
images are noise.

Memory: the header is computed first from models built on the `meta` device (no storage), then each
component is built for real directly in the target dtype, converted, streamed to disk and freed before the
next one. Peak memory is about one component (SDXL UNet fp16 ~5 GB), not the whole file.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from pipelines.builders.ldm_layout import component_to_ldm, layout_of, write_safetensors
from pipelines.loading import CONFIG_ROOT, METADATA_CONFIG_KEY, REAL_CONFIG, Arch

logger = logging.getLogger(__name__)

_COMPONENTS: dict[Arch, tuple[str, ...]] = {
    Arch.SD1: ("unet", "vae", "text_encoder"),
    Arch.SDXL: ("unet", "vae", "text_encoder", "text_encoder_2"),
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Process-global: build in the target dtype so a component never exists in float32 (SDXL UNet: 10 GB).
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build(folder: Path, name: str) -> torch.nn.Module:
    """Construct one component from its config (weights initialised by the library's own init)."""
    if name in ("unet", "vae"):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
        return cls.from_config(cls.load_config(str(folder / name)))
    import transformers
    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_pretrained(str(folder / name))
    default = "CLIPTextModel" if name == "text_encoder" else "CLIPTextModelWithProjection"
    return getattr(transformers, (config.architectures or [default])[0])(config)


def write_real_arch_checkpoint(path: Path, arch: Arch, *, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of the real `arch` to `path` (single-file layout, `dtype`), atomically.

    Deterministic for a given (arch, dtype, seed): `torch.manual_seed(seed + i)` before the i-th component.
    Metadata: {"sdfunc_config": "sd15" | "sdxl", "sdfunc_random_weights": "true"}.
    """
    path = Path(path)
    arch = Arch(arch)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    folder = CONFIG_ROOT / REAL_CONFIG[arch]
    names = _COMPONENTS[arch]
    sdxl = arch is Arch.SDXL

    groups = []
    for name in names:
        with torch.device("meta"):
            module = _build(folder, name)
        groups.append(layout_of(component_to_ldm(name, module, sdxl=sdxl), dtype))
        del module

    def parts() -> Iterator[dict[str, torch.Tensor]]:
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            torch.manual_seed(seed + i)
            with _default_dtype(dtype), torch.no_grad():
                module = _build(folder, name)
            tensors = component_to_ldm(name, module, sdxl=sdxl)
            del module
            logger.info("built %s %s (%d tensors) in %.1f s", arch.value, name, len(tensors), time.perf_counter() - t0)
            yield tensors
            del tensors
            gc.collect()

    t0 = time.perf_counter()
    metadata = {METADATA_CONFIG_KEY: REAL_CONFIG[arch], "sdfunc_random_weights": "true"}
    write_safetensors(path, groups, parts(), metadata)
    logger.info("wrote %s (%d bytes) in %.1f s", path.name, path.stat().st_size, time.perf_counter() - t0)
    return path
