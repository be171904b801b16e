"""Detect a checkpoint's architecture and load it offline into a diffusers pipeline.

Single-file checkpoints (`.safetensors`, public LDM / A1111 key layout) load through diffusers'
`from_single_file` with `config=` a config folder shipped in `pipelines/configs/`, never a repo id and never
`original_config` (both reach for the hub). With `config=` diffusers does no detection of its own, so the
pipeline class and folder are chosen here from the file's keys (and an optional `sdfunc_config` metadata
entry naming a shipped folder, used by the demo models). Diffusers folders (with `model_index.json`) load
with `from_pretrained`.

The process must run with `HF_HUB_OFFLINE=1` set before diffusers / huggingface_hub are first imported.

Refused: pickle files (`.ckpt`, `.pt`, `.bin`, `.pth`), architectures other than SD 1.x and SDXL, and files
whose loading leaves any parameter on the `meta` device (a missing tensor loads silently and makes NaN
images). Loading errors from diffusers (shape mismatches, missing keys) surface as `CheckpointError`.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.store import PICKLE_SUFFIXES
from pipelines.errors import (
    CheckpointError,
    IncompleteCheckpoint,
    ModelNotFound,
    PickleCheckpointRefused,
    UnsupportedArchitecture,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline

logger = logging.getLogger(__name__)

CONFIG_ROOT: Path = Path(__file__).parent / "configs"
METADATA_CONFIG_KEY = "sdfunc_config"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference implementation's own limit


class Arch(str, enum.Enum):
    """Architectures this service loads."""

    SD1 = "sd1"
    SDXL = "sdxl"


REAL_CONFIG: dict[Arch, str] = {Arch.SD1: "sd15", Arch.SDXL: "sdxl"}
_PIPELINE_CLASS: dict[Arch, str] = {Arch.SD1: "StableDiffusionPipeline", Arch.SDXL: "StableDiffusionXLPipeline"}
_CLASS_TO_ARCH: dict[str, Arch] = {v: k for k, v in _PIPELINE_CLASS.items()}


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleCheckpointRefused(f"{path.name}: pickle checkpoints are refused; convert it to .safetensors")


def read_header(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """Tensor name -> (dtype, shape) and the `__metadata__` dict, read from the safetensors header only."""
    path = Path(path)
    _refuse_pickle(path)
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > _MAX_HEADER_BYTES or n + 8 > size:
                raise CheckpointError(f"{path.name}: not a safetensors file (bad header length)")
            raw = f.read(n)
    except FileNotFoundError as e:
        raise ModelNotFound(f"{path.name}: no such checkpoint") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name}: not a safetensors file (header is not JSON)") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, list[int]]] = {}
    try:
        for name, info in header.items():
            tensors[name] = (str(info["dtype"]), [int(s) for s in info["shape"]])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: malformed safetensors header") from e
    if not isinstance(metadata, dict):
        metadata = {}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def detect_arch(keys: Iterable[str]) -> Arch:
    """`conditioner.embedders.1.` => SDXL, `cond_stage_model.transformer.` => SD1; else UnsupportedArchitecture."""
    sd1 = False
    for key in keys:
        if key.startswith("conditioner.embedders.1."):
            return Arch.SDXL
        if key.startswith("cond_stage_model.transformer."):
            sd1 = True
    if sd1:
        return Arch.SD1
    raise UnsupportedArchitecture("checkpoint matches neither SD 1.x nor SDXL (SD 2.x, refiner, Flux... unsupported)")


@functools.lru_cache(maxsize=None)
def shipped_configs() -> dict[str, Arch]:
    """Names of the config folders under CONFIG_ROOT -> the architecture their model_index.json declares."""
    out: dict[str, Arch] = {}
    for d in sorted(CONFIG_ROOT.iterdir()):
        index = d / "model_index.json"
        if index.is_file():
            cls = json.loads(index.read_text()).get("_class_name")
            if cls in _CLASS_TO_ARCH:
                out[d.name] = _CLASS_TO_ARCH[cls]
    return out


def _config_name(arch: Arch, metadata: dict[str, str], path: Path) -> str:
    name = metadata.get(METADATA_CONFIG_KEY)
    if name is not None:
        shipped = shipped_configs()
        if name not in shipped:
            logger.warning("%s: metadata %s=%r names no shipped config; using %s", path.name,
                           METADATA_CONFIG_KEY, name, REAL_CONFIG[arch])
        elif shipped[name] != arch:
            raise CheckpointError(f"{path.name}: metadata config {name!r} is {shipped[name].value}, keys say {arch.value}")
        else:
            return name
    return REAL_CONFIG[arch]


def config_dir_for(path: Path) -> tuple[Arch, Path]:
    """Which shipped config folder loads this single file (metadata `sdfunc_config` wins if shipped)."""
    path = Path(path)
    tensors, metadata = read_header(path)
    try:
        arch = detect_arch(tensors)
    except UnsupportedArchitecture as e:
        raise UnsupportedArchitecture(f"{path.name}: {e.message}") from None
    return arch, CONFIG_ROOT / _config_name(arch, metadata, path)


def is_diffusers_dir(path: Path) -> bool:
    """True for a diffusers pipeline folder (has model_index.json)."""
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


@functools.lru_cache(maxsize=None)
def _tokenizer(arch: Arch, subfolder: str) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(CONFIG_ROOT / REAL_CONFIG[arch] / subfolder))


def tokenizers_for(arch: Arch) -> dict[str, Any]:
    """The real CLIP tokenizer(s) of `arch` as pipeline kwargs (loaded once per process; read-only in use)."""
    if arch is Arch.SDXL:
        return {"tokenizer": _tokenizer(arch, "tokenizer"), "tokenizer_2": _tokenizer(arch, "tokenizer_2")}
    return {"tokenizer": _tokenizer(arch, "tokenizer")}


def _pipeline_kwargs(arch: Arch) -> dict[str, Any]:
    if arch is Arch.SDXL:
        return {"add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _pipeline_class(arch: Arch) -> Any:
    import diffusers

    return getattr(diffusers, _PIPELINE_CLASS[arch])


def _check_no_meta(components: dict[str, Any], path: Path) -> None:
    """Refuse a model with any parameter or buffer still on `meta` (its tensor was missing in the file)."""
    for comp_name, module in components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.device.type == "meta":
                raise IncompleteCheckpoint(f"{path.name}: {comp_name}.{name} is missing from the checkpoint")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError))


_LOAD_ERRORS = (KeyError, ValueError, RuntimeError, OSError, NotImplementedError)


def _load_error(path: Path, what: str, e: BaseException) -> CheckpointError:
    """Map an exception from diffusers' loader to our error tree (the caller re-raises OOM untouched)."""
    if isinstance(e, NotImplementedError) and "meta tensor" in str(e):
        # diffusers casts UNet / VAE to the dtype after loading; a tensor missing from the file is still on
        # `meta` then and the cast fails. (Missing text-encoder tensors load silently: see _check_no_meta.)
        return IncompleteCheckpoint(f"{path.name}: a tensor the {what} needs is missing from the checkpoint")
    return CheckpointError(f"{path.name}: cannot load {what}: {type(e).__name__}: {e}"[:500])


def load_pipeline(
    path: Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    disable_mmap: bool = False,
    timings: dict[str, float] | None = None,
) -> DiffusionPipeline:
    """Single-file .safetensors or diffusers folder -> StableDiffusion(XL)Pipeline on `device` in `dtype`.

    No safety checker, progress bar off. Raises PickleCheckpointRefused, UnsupportedArchitecture,
    IncompleteCheckpoint, CheckpointError (anything else diffusers rejects), ModelNotFound (no such path).
    `disable_mmap=True` reads the file into memory instead of mapping it (for network mounts, and so a
    same-dtype load never holds views of a file that might later change).
    `timings`, when given, receives `read_weights` and `to_device` (seconds).
    """
    path = Path(path)
    started = time.perf_counter()
    if is_diffusers_dir(path):
        pipe, arch = _load_diffusers_dir(path, dtype)
    elif path.is_dir():
        raise CheckpointError(f"{path.name}: folder without model_index.json")
    elif not path.exists():
        _refuse_pickle(path)
        raise ModelNotFound(f"{path.name}: no such checkpoint")
    else:
        arch, config_dir = config_dir_for(path)
        cls = _pipeline_class(arch)
        logger.info("loading %s as %s with config %s", path.name, cls.__name__, config_dir.name)
        try:
            pipe = cls.from_single_file(
                str(path),
                config=str(config_dir),
                dtype=dtype,
                local_files_only=True,
                disable_mmap=disable_mmap,
                **tokenizers_for(arch),
                **_pipeline_kwargs(arch),
            )
        except _LOAD_ERRORS as e:
            if _is_oom(e):
                raise
            raise _load_error(path, f"{arch.value} pipeline", e) from e
    _check_no_meta(pipe.components, path)
    pipe.set_progress_bar_config(disable=True)
    read = time.perf_counter()
    pipe = pipe.to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # the copy is asynchronous; the phase ends when the weights are there
    if timings is not None:
        timings["read_weights"] = read - started
        timings["to_device"] = time.perf_counter() - read
    return pipe


def _load_diffusers_dir(path: Path, dtype: torch.dtype) -> tuple[Any, Arch]:
    cls_name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    arch = _CLASS_TO_ARCH.get(cls_name)
    if arch is None:
        raise UnsupportedArchitecture(f"{path.name}: diffusers pipeline {cls_name!r} is not SD 1.x or SDXL")
    cls = _pipeline_class(arch)
    logger.info("loading diffusers folder %s as %s", path.name, cls.__name__)
    try:
        pipe = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True, **_pipeline_kwargs(arch))
    except _LOAD_ERRORS as e:
        if _is_oom(e):
            raise
        raise _load_error(path, "diffusers folder", e) from e
    return pipe, arch


def _vae_prefix(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    for prefix in ("", "first_stage_model.", "vae."):
        if f"{prefix}encoder.conv_in.weight" in keys and f"{prefix}decoder.conv_out.weight" in keys:
            return prefix
    return None


def load_vae(
    path: Path,
    *,
    arch: Arch,
    device: str,
    dtype: torch.dtype,
    disable_mmap: bool = False,
) -> AutoencoderKL:
    """A single-file external VAE (A1111 models/VAE) -> AutoencoderKL for a pipeline of `arch`.

    Keys `encoder.*` / `decoder.*`, optionally under `first_stage_model.` or `vae.`. The shape config comes
    from the folder named by metadata `sdfunc_config` if shipped, else the real one for `arch`; the scaling
    factor and upcast flag always follow `arch` (A1111 applies any VAE file to any model of a family).
    """
    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise ModelNotFound(f"{path.name}: no such VAE")
    tensors, metadata = read_header(path)
    if _vae_prefix(tensors) is None:
        raise CheckpointError(f"{path.name}: not a VAE (no encoder.conv_in / decoder.conv_out weights)")
    arch = Arch(arch)
    name = metadata.get(METADATA_CONFIG_KEY)
    if name not in shipped_configs():
        name = REAL_CONFIG[arch]
    family = json.loads((CONFIG_ROOT / REAL_CONFIG[arch] / "vae" / "config.json").read_text())
    overrides = {"scaling_factor": family.get("scaling_factor", 0.18215), "force_upcast": family.get("force_upcast", True)}

    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_single_file(
            str(path),
            config=str(CONFIG_ROOT / name),
            subfolder="vae",
            dtype=dtype,
            local_files_only=True,
            disable_mmap=disable_mmap,
            **overrides,
        )
    except _LOAD_ERRORS as e:
        if _is_oom(e):
            raise
        raise _load_error(path, "VAE", e) from e
    _check_no_meta({"vae": vae}, path)
    return vae.to(device)
