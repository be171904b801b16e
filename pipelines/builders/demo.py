"""Tiny random-weight demo pipelines, built in code and saved as single-file checkpoints.

No weights can be downloaded, so the demo models (and the test models) are built here from the config
folders `pipelines/configs/demo-sd15` and `demo-sdxl`: SD 1.5- and SDXL-shaped, a 4-level VAE (latent =
image / 8 as in real SD), CLIP text encoders with the real 49,408-token vocabulary (the real tokenizers are
used), everything a few MB. Weights are seeded (`torch.manual_seed(DEMO_SEED)` before each component) and
rounded to float16 precision, so the float16 files hold exactly the built weights: building, writing and
loading back in float32 gives equal tensors, and writing twice gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines.builders.ldm_layout import (
    component_to_ldm,
    controlnet_to_ldm,
    layout_of,
    pipeline_components,
    vae_to_ldm,
    write_safetensors,
)
from pipelines.loading import (
    CONFIG_ROOT,
    METADATA_CONFIG_KEY,
    Arch,
    building_modules,
    shipped_configs,
    tokenizers_for,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline

logger = logging.getLogger(__name__)

DEMO_SEED: int = 20240611
DEMO_VAE_SEED: int = DEMO_SEED + 1
DEMO_MODELS: dict[str, str] = {"demo-sd15": "demo-sd15", "demo-sdxl": "demo-sdxl"}
DEMO_VAE_STEM = "demo-vae"
DEMO_VAE_CONFIG = "demo-sd15"
FILE_DTYPE = torch.float16


def _round_to_file_dtype(module: torch.nn.Module) -> torch.nn.Module:
    """Make every weight exactly representable in FILE_DTYPE (kept float32), so the file is lossless."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(FILE_DTYPE).to(p.dtype))
    return module.eval()


def _build_unet(folder: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))


def _build_vae(folder: Path, seed: int) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _round_to_file_dtype(AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae"))))


def _build_text_encoder(folder: Path, sub: str) -> torch.nn.Module:
    import transformers
    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_pretrained(str(folder / sub))
    cls = getattr(transformers, (config.architectures or ["CLIPTextModel"])[0])
    return cls(config)


@building_modules
def build_demo_pipeline(kind: str) -> DiffusionPipeline:
    """A tiny random-weight StableDiffusionPipeline ("demo-sd15") or StableDiffusionXLPipeline ("demo-sdxl").

    Deterministic: the same weights on every call and every machine (float32, float16-representable).
    """
    if kind not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {kind!r}; expected one of {sorted(DEMO_MODELS)}")
    import diffusers

    folder = CONFIG_ROOT / DEMO_MODELS[kind]
    index = json.loads((folder / "model_index.json").read_text())
    arch = shipped_configs()[DEMO_MODELS[kind]]
    components: dict[str, object] = {}
    torch.manual_seed(DEMO_SEED)
    components["unet"] = _round_to_file_dtype(_build_unet(folder))
    components["vae"] = _build_vae(folder, DEMO_SEED)
    for sub in ("text_encoder", "text_encoder_2"):
        if sub in index:
            torch.manual_seed(DEMO_SEED)
            components[sub] = _round_to_file_dtype(_build_text_encoder(folder, sub))
    sched_cls = getattr(diffusers, index["scheduler"][1])
    components["scheduler"] = sched_cls.from_config(sched_cls.load_config(str(folder / "scheduler")))
    components.update(tokenizers_for(arch))
    cls = getattr(diffusers, index["_class_name"])
    if arch is Arch.SDXL:
        pipe = cls(**components, add_watermarker=False)
    else:
        pipe = cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _write_components(path: Path, parts: dict[str, torch.nn.Module], sdxl: bool, metadata: dict[str, str]) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in parts.items():
        tensors.update(component_to_ldm(name, module, sdxl=sdxl))
    return write_safetensors(path, [layout_of(tensors, FILE_DTYPE)], [tensors], metadata)


def write_demo_models(
    models_dir: Path,
    *,
    kinds: Iterable[str] = ("demo-sd15", "demo-sdxl"),
    force: bool = False,
) -> list[Path]:
    """Write `<stem>.safetensors` for each demo kind into `models_dir` (<data>/models/Stable-diffusion).

    Single-file LDM layout, float16, metadata {"sdfunc_config": <config folder>}; atomic (temp + rename, never
    an in-place overwrite of a file that may be mapped). Existing files are kept unless `force`. Same bytes on
    every run. Returns the paths, existing or written.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for kind in kinds:
        if kind not in DEMO_MODELS:
            raise ValueError(f"unknown demo model {kind!r}; expected one of {sorted(DEMO_MODELS)}")
        path = models_dir / f"{kind}.safetensors"
        paths.append(path)
        if path.exists() and not force:
            logger.info("demo model %s exists; kept", path.name)
            continue
        t0 = time.perf_counter()
        pipe = build_demo_pipeline(kind)
        sdxl, names = pipeline_components(pipe)
        _write_components(path, {n: getattr(pipe, n) for n in names}, sdxl, {METADATA_CONFIG_KEY: DEMO_MODELS[kind]})
        logger.info("wrote demo model %s (%d bytes) in %.2f s", path.name, path.stat().st_size, time.perf_counter() - t0)
    return paths


@building_modules
def build_demo_vae() -> AutoencoderKL:
    """The demo external VAE: demo-sd15's VAE shape with other weights (seed DEMO_VAE_SEED)."""
    return _build_vae(CONFIG_ROOT / DEMO_VAE_CONFIG, DEMO_VAE_SEED)


def write_demo_vae(vae_dir: Path, *, force: bool = False) -> Path:
    """Write `demo-vae.safetensors` (A1111 VAE layout: `first_stage_model.encoder/decoder.*`) into `vae_dir`.

    Atomic and deterministic like `write_demo_models`; kept if present unless `force`.
    """
    vae_dir = Path(vae_dir)
    vae_dir.mkdir(parents=True, exist_ok=True)
    path = vae_dir / f"{DEMO_VAE_STEM}.safetensors"
    if path.exists() and not force:
        logger.info("demo VAE %s exists; kept", path.name)
        return path
    tensors = vae_to_ldm(build_demo_vae().state_dict())
    write_safetensors(path, [layout_of(tensors, FILE_DTYPE)], [tensors], {METADATA_CONFIG_KEY: DEMO_VAE_CONFIG})
    logger.info("wrote demo VAE %s (%d bytes)", path.name, path.stat().st_size)
    return path


_LORA_TARGETS = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "te": ("q_proj", "k_proj", "v_proj", "out_proj")}


def write_demo_lora(path: Path, kind: str = "demo-sd15", *, fmt: str = "kohya", seed: int = 1, rank: int = 4,
                    parts: Iterable[str] = ("unet", "te"), metadata: dict[str, str] | None = None) -> Path:
    """A random LoRA for the demo model `kind`, written as a .safetensors file in `fmt` "kohya" (A1111 / civitai
    keys: `lora_unet_*`, `lora_te_*` or `lora_te1_*`/`lora_te2_*`, `.lora_down/.lora_up/.alpha`) or "diffusers"
    (`unet.*.lora_A/.lora_B`). `parts` chooses the UNet and/or text encoders. Deterministic for a seed."""
    from safetensors.torch import save_file

    if fmt not in ("kohya", "diffusers"):
        raise ValueError(f"unknown LoRA format {fmt!r}")
    pipe = build_demo_pipeline(kind)
    sdxl = hasattr(pipe, "text_encoder_2")
    modules: list[tuple[str, str, torch.nn.Module, tuple[str, ...]]] = []  # (diffusers prefix, kohya prefix, ...)
    if "unet" in parts:
        modules.append(("unet", "lora_unet", pipe.unet, _LORA_TARGETS["unet"]))
    if "te" in parts:
        modules.append(("text_encoder", "lora_te1" if sdxl else "lora_te", pipe.text_encoder, _LORA_TARGETS["te"]))
        if sdxl:
            modules.append(("text_encoder_2", "lora_te2", pipe.text_encoder_2, _LORA_TARGETS["te"]))
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, kohya, module, targets in modules:
        for name, sub in module.named_modules():
            if not isinstance(sub, torch.nn.Linear) or not name.endswith(targets):
                continue
            down = (torch.randn(rank, sub.in_features, generator=generator) * 0.5).to(FILE_DTYPE)
            up = (torch.randn(sub.out_features, rank, generator=generator) * 0.5).to(FILE_DTYPE)
            if fmt == "kohya":
                key = f"{kohya}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
                tensors[f"{key}.alpha"] = torch.tensor(float(rank), dtype=FILE_DTYPE)
            else:
                tensors[f"{prefix}.{name}.lora_A.weight"], tensors[f"{prefix}.{name}.lora_B.weight"] = down, up
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), **(metadata or {})})
    return path


DEMO_CONTROLNET_CONFIG: dict[str, str] = {"demo-sd15": "controlnet-demo-sd15", "demo-sdxl": "controlnet-demo-sdxl"}
DEMO_CONTROLNET_STEM: dict[str, str] = {"demo-sd15": "demo-controlnet-sd15", "demo-sdxl": "demo-controlnet-sdxl"}
_CONTROLNET_OWN = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


@building_modules
def build_demo_controlnet(kind: str = "demo-sd15", seed: int = 0) -> torch.nn.Module:
    """A tiny ControlNetModel for the demo model `kind`, shaped by `configs/controlnet-demo-*`.

    Its UNet half starts from the demo UNet's weights (as a trained ControlNet does); the hint encoder and the
    output convolutions, which diffusers initialises to zero (a ControlNet that changes nothing), get seeded
    random weights so that the control image visibly steers the image. Deterministic for a seed;
    float16-representable like the demo models.
    """
    if kind not in DEMO_CONTROLNET_CONFIG:
        raise ValueError(f"unknown demo model {kind!r}; expected one of {sorted(DEMO_CONTROLNET_CONFIG)}")
    from diffusers import ControlNetModel

    torch.manual_seed(DEMO_SEED)  # the same UNet weights build_demo_pipeline(kind) gets
    unet = _round_to_file_dtype(_build_unet(CONFIG_ROOT / DEMO_MODELS[kind]))
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_config(
        ControlNetModel.load_config(str(CONFIG_ROOT / DEMO_CONTROLNET_CONFIG[kind])))
    own = unet.state_dict()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(_CONTROLNET_OWN):
                fan_in = param[0].numel() if param.ndim > 1 else param.shape[0]
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
            else:
                param.copy_(own[name])
    return _round_to_file_dtype(controlnet)


def write_demo_controlnet(path: Path, kind: str = "demo-sd15", seed: int = 0) -> Path:
    """Write `build_demo_controlnet(kind, seed)` to `path` as one float16 `.safetensors` file in the layout
    A1111 users have: SD 1.5 in the original LDM layout (`control_model.input_blocks...`, `zero_convs`,
    `input_hint_block`, `middle_block_out`), SDXL in the diffusers layout (as the diffusers_xl_* files are),
    with metadata {"sdfunc_config": <config folder>}. Atomic (temp + rename); same bytes for the same input."""
    controlnet = build_demo_controlnet(kind, seed)
    state = controlnet.state_dict()
    tensors = controlnet_to_ldm(state, controlnet.config) if kind == "demo-sd15" else dict(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, [layout_of(tensors, FILE_DTYPE)], [tensors],
                      {METADATA_CONFIG_KEY: DEMO_CONTROLNET_CONFIG[kind]})
    logger.info("wrote demo ControlNet %s (%d bytes)", path.name, path.stat().st_size)
    return path


def write_demo_controlnets(controlnet_dir: Path, *, kinds: Iterable[str] = ("demo-sd15", "demo-sdxl"),
                           force: bool = False) -> list[Path]:
    """`<data>/models/ControlNet/demo-controlnet-sd15.safetensors` (and -sdxl), kept if present unless `force`."""
    paths = []
    for kind in kinds:
        path = Path(controlnet_dir) / f"{DEMO_CONTROLNET_STEM[kind]}.safetensors"
        if not path.exists() or force:
            write_demo_controlnet(path, kind)
        paths.append(path)
    return paths


DEMO_REFINER = "demo-sdxl-refiner"  # the config folder, and the file's stem


@building_modules
def build_demo_refiner(seed: int = DEMO_SEED + 7) -> DiffusionPipeline:
    """A tiny random-weight SDXL refiner (StableDiffusionXLImg2ImgPipeline in the refiner's layout: no first
    text encoder, OpenCLIP only, a UNet conditioned on an aesthetic score), deterministic per seed."""
    import diffusers

    folder = CONFIG_ROOT / DEMO_REFINER
    index = json.loads((folder / "model_index.json").read_text())
    torch.manual_seed(seed)
    unet = _round_to_file_dtype(_build_unet(folder))
    vae = _build_vae(folder, seed)
    torch.manual_seed(seed)
    text_encoder_2 = _round_to_file_dtype(_build_text_encoder(folder, "text_encoder_2"))
    sched_cls = getattr(diffusers, index["scheduler"][1])
    scheduler = sched_cls.from_config(sched_cls.load_config(str(folder / "scheduler")))
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
        tokenizer_2=tokenizers_for(Arch.SDXL)["tokenizer_2"], unet=unet, scheduler=scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_demo_refiner(models_dir: Path, *, force: bool = False) -> Path:
    """`<models_dir>/demo-sdxl-refiner.safetensors`: the tiny refiner in the refiner's single-file layout (OpenCLIP
    as `conditioner.embedders.0.model.`), with `sdfunc_config` metadata; kept if present unless `force`."""
    from pipelines.builders.ldm_layout import openclip_text_to_ldm, unet_to_ldm

    path = Path(models_dir) / f"{DEMO_REFINER}.safetensors"
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_demo_refiner()
    tensors = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config), **vae_to_ldm(pipe.vae.state_dict()),
               **openclip_text_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.0.model.")}
    return write_safetensors(path, [layout_of(tensors, FILE_DTYPE)], [tensors], {METADATA_CONFIG_KEY: DEMO_REFINER})


# Tiny upscaler and face-restoration models in A1111's folders (random weights, float32): what `sdfunc serve` puts
# beside the demo checkpoints, so that the extras routes and hires fix with a model upscaler work out of the box.
# None of them is named as a published model (`R-ESRGAN 4x+` and the like name only the real files).
DEMO_UPSCALERS: dict[str, str] = {  # file under <models> -> what it is
    "ESRGAN/demo-esrgan-4x.safetensors": "ESRGAN (RRDBNet) x4",
    "RealESRGAN/demo-srvgg-2x.safetensors": "Real-ESRGAN compact (SRVGG) x2",
    "SwinIR/demo-swinir-2x.safetensors": "SwinIR (pixelshuffle) x2",
    "GFPGAN/demo-gfpgan.safetensors": "GFPGAN v1 clean, 64 x 64 faces",
}


@building_modules
def build_demo_upscaler(name: str, seed: int = DEMO_SEED) -> torch.nn.Module:
    """The tiny network of `DEMO_UPSCALERS[name]`, random weights drawn with `seed` (small: its output stays
    close to a plain resize where the architecture adds its input back)."""
    from pipelines.faces.gfpgan import GFPGANv1Clean
    from pipelines.upscalers.arch import RRDBNet, SRVGGNetCompact
    from pipelines.upscalers.swinir import SwinIR

    torch.manual_seed(seed)
    builders = {
        "ESRGAN/demo-esrgan-4x.safetensors": lambda: RRDBNet(num_feat=8, num_grow_ch=4, num_block=1),
        "RealESRGAN/demo-srvgg-2x.safetensors": lambda: SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2),
        "SwinIR/demo-swinir-2x.safetensors": lambda: SwinIR(
            embed_dim=12, depths=[2], num_heads=[2], window_size=4, img_size=8, mlp_ratio=2.0, num_feat=8,
            upscale=2, upsampler="pixelshuffle"),
        "GFPGAN/demo-gfpgan.safetensors": lambda: GFPGANv1Clean(
            out_size=64, num_style_feat=16, channel_multiplier=2, num_mlp=2, different_w=True, narrow=1 / 32,
            sft_half=True),
    }
    net = builders[name]()
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0.0, 0.02)
    return net.eval()


def write_demo_upscalers(models_dir: Path, *, force: bool = False) -> list[Path]:
    """Write every `DEMO_UPSCALERS` file under `models_dir` (<data>/models), kept if present unless `force`;
    atomic (temp + rename), the same bytes on every run."""
    from safetensors.torch import save_file

    paths = []
    for i, (name, what) in enumerate(DEMO_UPSCALERS.items()):
        path = Path(models_dir) / name
        paths.append(path)
        if path.exists() and not force:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        net = build_demo_upscaler(name, DEMO_SEED + 20 + i)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
        tmp.replace(path)
        logger.info("wrote demo %s %s (%d bytes)", what, path.name, path.stat().st_size)
    return paths
