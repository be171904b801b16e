"""Detect a checkpoint's architecture and load it offline into a diffusers pipeline.

Single-file checkpoints (`.safetensors`, public LDM / A1111 key layout) load through diffusers'
`from_single_file` with `config=` a config folder shipped in `pipelines/configs/`, never a repo id and never
`original_config` (both reach for the hub). With `config=` diffusers does no detection of its own, so the
pipeline class and folder are chosen here from the file's keys (and an optional `sdfunc_config` metadata
entry naming a shipped folder, used by the demo models). Diffusers folders (with `model_index.json`) load
with `from_pretrained`.

Two options for slow storage (a NAS or OSS mount), both off by default in this module and set by the cache:
`local_dir` copies a single file to local disk with large sequential reads first and loads the copy (reused
while the source's size and mtime match; `pipelines.local_copy`), because mapping a file on a network mount faults it
in page by page, one round trip each; `direct_to_device` passes `device=` to diffusers so that the UNet and
VAE weights go from the file straight to the device instead of through a full model in CPU memory first.

Hub access is off for the whole process (`pipelines.offline`, applied when `pipelines` is first imported).

Refused: pickle files (`.ckpt`, `.pt`, `.bin`, `.pth`), architectures other than SD 1.x and SDXL, and files
whose loading leaves any parameter on the `meta` device (a missing tensor loads silently and makes NaN
images). Loading errors from diffusers (shape mismatches, missing keys) surface as `CheckpointError`.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines import safetensors_header
from pipelines.errors import (
    CheckpointError,
    IncompleteCheckpoint,
    ModelNotFound,
    PickleCheckpointRefused,
    PipelineError,
    UnsupportedArchitecture,
)
from pipelines.local_copy import local_copy
from pipelines.store import PICKLE_SUFFIXES

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline

logger = logging.getLogger(__name__)

CONFIG_ROOT: Path = Path(__file__).parent / "configs"
METADATA_CONFIG_KEY = "sdfunc_config"


class Arch(str, enum.Enum):
    """Architectures this service loads."""

    SD1 = "sd1"
    SDXL = "sdxl"


REAL_CONFIG: dict[Arch, str] = {Arch.SD1: "sd15", Arch.SDXL: "sdxl"}
_PIPELINE_CLASS: dict[Arch, str] = {Arch.SD1: "StableDiffusionPipeline", Arch.SDXL: "StableDiffusionXLPipeline"}
_CLASS_TO_ARCH: dict[str, Arch] = {v: k for k, v in _PIPELINE_CLASS.items()}
# The SDXL refiner's own layout: one text encoder (OpenCLIP bigG as `conditioner.embedders.0.model.`), a UNet
# conditioned on an aesthetic score; it is SDXL to every check here, but loads as an img2img pipeline only.
REFINER_CLASS = "StableDiffusionXLImg2ImgPipeline"
REFINER_CONFIG = "sdxl-refiner"
_CLASS_TO_ARCH[REFINER_CLASS] = Arch.SDXL


# diffusers loads under accelerate's `init_empty_weights`, which patches torch.nn.Module's parameter registration
# for the whole process while it runs: a module built on another thread meanwhile gets meta parameters ("Cannot copy
# out of meta tensor"). Loads hold this lock, and so does code that builds modules off the device thread (the demo
# builders). Serving builds its modules on the device thread only, so there it is never contended.
MODULE_BUILD_LOCK = threading.RLock()


def building_modules(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` runs holding MODULE_BUILD_LOCK."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with MODULE_BUILD_LOCK:
            return fn(*args, **kwargs)
    return wrapper


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleCheckpointRefused(f"{path.name}: pickle checkpoints are refused; convert it to .safetensors")


def read_header(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """Tensor name -> (dtype, shape) and the `__metadata__` dict, read from the safetensors header only."""
    path = Path(path)
    _refuse_pickle(path)
    try:
        header = safetensors_header.read_header(path)
    except FileNotFoundError as e:
        raise ModelNotFound(f"{path.name}: no such checkpoint") from e
    except safetensors_header.HeaderError as e:
        raise CheckpointError(f"{path.name}: {e}") from e
    return header.shapes(), header.metadata


def detect_arch(keys: Iterable[str]) -> Arch:
    """`conditioner.embedders.1.` => SDXL, `cond_stage_model.transformer.` => SD1, the SDXL refiner's layout
    (`is_refiner`) => SDXL; else UnsupportedArchitecture."""
    sd1 = refiner = False
    for key in keys:
        if key.startswith("conditioner.embedders.1."):
            return Arch.SDXL
        if key.startswith("cond_stage_model.transformer."):
            sd1 = True
        if key.startswith("conditioner.embedders.0.model."):
            refiner = True
    if sd1:
        return Arch.SD1
    if refiner:
        return Arch.SDXL
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


def is_refiner(keys: Iterable[str]) -> bool:
    """True for the SDXL refiner's layout: OpenCLIP as the first (and only) text embedder."""
    keys = list(keys)
    return (any(k.startswith("conditioner.embedders.0.model.") for k in keys)
            and not any(k.startswith("conditioner.embedders.1.") for k in keys))


def refiner_config(config_dir: Path) -> bool:
    """True when a shipped config folder describes a refiner (an img2img-only pipeline)."""
    index = Path(config_dir) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == REFINER_CLASS


def config_dir_for(path: Path) -> tuple[Arch, Path]:
    """Which shipped config folder loads this single file (metadata `sdfunc_config` wins if shipped)."""
    path = Path(path)
    tensors, metadata = read_header(path)
    try:
        arch = detect_arch(tensors)
    except UnsupportedArchitecture as e:
        raise UnsupportedArchitecture(f"{path.name}: {e.message}") from None
    name = _config_name(arch, metadata, path)
    if is_refiner(tensors) and not refiner_config(CONFIG_ROOT / name):
        name = REFINER_CONFIG
    return arch, CONFIG_ROOT / name


def pipeline_arch(path: Path) -> str | None:
    """"sd1" or "sdxl" for a checkpoint (from its safetensors header or model_index.json, never its weights);
    None when that cannot be told (the load then reports why)."""
    path = Path(path)
    try:
        if is_diffusers_dir(path):
            cls_name = json.loads((path / "model_index.json").read_text()).get("_class_name")
            arch = _CLASS_TO_ARCH.get(cls_name)
            return arch.value if arch is not None else None
        return config_dir_for(path)[0].value
    except (PipelineError, OSError, ValueError):
        return None


def is_diffusers_dir(path: Path) -> bool:
    """True for a diffusers pipeline folder (has model_index.json)."""
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


# The one shipped tokenizer: CLIP ViT-L/14's BPE vocabulary (openai/clip-vit-large-patch14), which SD 1.x and
# both SDXL text encoders use. The pipelines' own tokenizer folders differ from it only in these options: SDXL's
# were saved with `clean_up_tokenization_spaces` (it affects decoding only), and SDXL's second tokenizer (for
# OpenCLIP ViT-bigG) pads with "!" (id 0) where the others pad with the end token.
TOKENIZER_CONFIG = "clip-tokenizer"
_TOKENIZER_OPTIONS: dict[tuple[Arch, str], dict[str, Any]] = {
    (Arch.SD1, "tokenizer"): {},
    (Arch.SDXL, "tokenizer"): {"clean_up_tokenization_spaces": True},
    (Arch.SDXL, "tokenizer_2"): {"clean_up_tokenization_spaces": True, "pad_token": "!"},
}


@functools.lru_cache(maxsize=None)
def _tokenizer(arch: Arch, subfolder: str) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(CONFIG_ROOT / TOKENIZER_CONFIG), **_TOKENIZER_OPTIONS[(arch, subfolder)])


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


def check_no_meta(components: dict[str, Any], path: Path) -> None:
    """Raise IncompleteCheckpoint naming `path` when any module in `components` has a parameter or buffer still
    on `meta`: its tensor was missing from the file, which diffusers loads silently and which makes NaN images."""
    for comp_name, module in components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.device.type == "meta":
                raise IncompleteCheckpoint(f"{path.name}: {comp_name}.{name} is missing from the checkpoint")


def is_oom(e: BaseException) -> bool:
    """Whether `e` is running out of host or device memory, which is no fault of the file: loaders re-raise it
    untouched instead of mapping it with `load_error`."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError))


# What diffusers' loaders raise for a file they reject (catch these, re-raise OOM, map the rest with load_error)
LOAD_ERRORS = (KeyError, ValueError, RuntimeError, OSError, NotImplementedError)


def load_error(path: Path, what: str, e: BaseException) -> CheckpointError:
    """Map an exception from diffusers' loader for `what` ("VAE", "ControlNet" ...) to our error tree, with no
    server paths in the message (the caller re-raises OOM untouched)."""
    if isinstance(e, NotImplementedError) and "meta tensor" in str(e):
        # diffusers casts UNet / VAE to the dtype after loading; a tensor missing from the file is still on
        # `meta` then and the cast fails. (Missing text-encoder tensors load silently: see check_no_meta.)
        return IncompleteCheckpoint(f"{path.name}: a tensor the {what} needs is missing from the checkpoint")
    detail = str(e).replace(str(path), path.name).replace(str(path.parent), "<models>")  # no server paths
    return CheckpointError(f"{path.name}: cannot load {what}: {type(e).__name__}: {detail}"[:500])


@building_modules
def load_pipeline(
    path: Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    disable_mmap: bool = False,
    local_dir: Path | None = None,
    local_max_bytes: int | None = None,
    direct_to_device: bool = False,
    timings: dict[str, float] | None = None,
) -> DiffusionPipeline:
    """Single-file .safetensors or diffusers folder -> StableDiffusion(XL)Pipeline on `device` in `dtype`.

    No safety checker, progress bar off. Raises PickleCheckpointRefused, UnsupportedArchitecture,
    IncompleteCheckpoint, CheckpointError (anything else diffusers rejects), ModelNotFound (no such path).
    `disable_mmap=True` reads the file into memory instead of mapping it (for network mounts, and so a
    same-dtype load never holds views of a file that might later change).
    `local_dir`: load a single file from its copy there (`local_copy`, at most `local_max_bytes` of copies).
    `direct_to_device`: UNet and VAE weights go from the file to `device` without a CPU model first (text
    encoders still load on the CPU and move with the rest).
    `timings`, when given, receives `copy` (with `local_dir`), `read_weights` and `to_device` (seconds).
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
        source = path
        if local_dir is not None:
            source, _ = local_copy(path, Path(local_dir), max_bytes=local_max_bytes)
            if timings is not None:
                timings["copy"] = time.perf_counter() - started
            started = time.perf_counter()
        cls = _pipeline_class(arch)
        tokenizers = tokenizers_for(arch)
        if refiner_config(config_dir):  # no first text encoder: its tokenizer must not be there either
            import diffusers

            cls = getattr(diffusers, REFINER_CLASS)
            tokenizers = {"tokenizer": None, "text_encoder": None, "tokenizer_2": tokenizers["tokenizer_2"]}
        logger.info("loading %s as %s with config %s", path.name, cls.__name__, config_dir.name)
        try:
            pipe = cls.from_single_file(
                str(source),
                config=str(config_dir),
                dtype=dtype,
                local_files_only=True,
                disable_mmap=disable_mmap,
                **({"device": device} if direct_to_device else {}),
                **tokenizers,
                **_pipeline_kwargs(arch),
            )
        except LOAD_ERRORS as e:
            if is_oom(e):
                raise
            raise load_error(path, f"{arch.value} pipeline", e) from e
    check_no_meta(pipe.components, path)
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
    except LOAD_ERRORS as e:
        if is_oom(e):
            raise
        raise load_error(path, "diffusers folder", e) from e
    return pipe, arch


def _vae_prefix(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    for prefix in ("", "first_stage_model.", "vae."):
        if f"{prefix}encoder.conv_in.weight" in keys and f"{prefix}decoder.conv_out.weight" in keys:
            return prefix
    return None


@building_modules
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
    except LOAD_ERRORS as e:
        if is_oom(e):
            raise
        raise load_error(path, "VAE", e) from e
    check_no_meta({"vae": vae}, path)
    return vae.to(device)
