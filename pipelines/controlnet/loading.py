"""What a ControlNet file is and how it loads, offline.

`inspect_controlnet` reads a single file's safetensors header (or a diffusers folder's config): SD 1.x or SDXL
is read from the keys, so a model that does not fit the checkpoint is refused before anything runs
(`check_compatible`), and so are the kinds this service does not run (T2I-Adapters, control-LoRAs, SD 2.x,
SDXL mid/small, pickle files). `load_controlnet` loads single files through
`ControlNetModel.from_single_file(config=<shipped folder>)` (`configs/controlnet-sd15`:
lllyasviel/control_v11p_sd15_canny; `configs/controlnet-sdxl`: diffusers/controlnet-canny-sdxl-1.0;
`controlnet-demo-*` for the tiny demo models, chosen by the `sdfunc_config` metadata key) and diffusers folders
through `from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines import safetensors_header
from pipelines.errors import (
    CheckpointError,
    IncompleteCheckpoint,
    InvalidParameter,
    ModelNotFound,
    PickleCheckpointRefused,
    UnsupportedArchitecture,
)
from pipelines.loading import (
    CONFIG_ROOT,
    LOAD_ERRORS,
    METADATA_CONFIG_KEY,
    Arch,
    building_modules,
    check_no_meta,
    is_oom,
    load_error,
)
from pipelines.store import PICKLE_SUFFIXES

if TYPE_CHECKING:
    from diffusers import ControlNetModel

    from pipelines.controlnet.store import ControlNetEntry

log = logging.getLogger(__name__)

LDM_PREFIX = "control_model."  # the A1111 single-file layout's key prefix
REAL_CONFIG: dict[Arch, str] = {Arch.SD1: "controlnet-sd15", Arch.SDXL: "controlnet-sdxl"}
# A diffusers ControlNet folder's weights, first found wins (pickle .bin files are never loaded)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


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
        if not is_controlnet_dir(path):
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


@building_modules
def load_controlnet(entry: ControlNetEntry | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    disable_mmap: bool = False, spec: ControlNetSpec | None = None,
                    field: str | None = None) -> ControlNetModel:
    """A ControlNet file or diffusers folder -> `ControlNetModel` on `device` in `dtype`, offline.

    Raises what `inspect_controlnet` raises, IncompleteCheckpoint when a tensor is missing (a parameter left on
    `meta`), and CheckpointError for anything else diffusers rejects (shape mismatches)."""
    from diffusers import ControlNetModel

    path = Path(entry) if isinstance(entry, (str, os.PathLike)) else entry.path
    spec = spec or inspect_controlnet(path, field=field)
    try:
        if spec.layout == "folder":
            present = [n for n in WEIGHT_FILES if (path / n).is_file()]
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
    except LOAD_ERRORS as e:
        if is_oom(e):
            raise
        err = load_error(path, "ControlNet", e)
        err.field = field
        raise err from e
    try:
        check_no_meta({"controlnet": model}, path)
    except CheckpointError as e:
        e.field = field
        raise
    return model.to(device).eval()


def arch_of(model: ControlNetModel) -> Arch:
    """SDXL for a ControlNet with SDXL's added time/text embedding, else SD 1.x."""
    return Arch.SDXL if model.config.get("addition_embed_type") == "text_time" else Arch.SD1


def is_controlnet_dir(path: Path) -> bool:
    """True for a diffusers ControlNet folder: a `config.json` whose `_class_name` is `ControlNetModel`."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == "ControlNetModel"
