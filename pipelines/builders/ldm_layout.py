"""Export diffusers components to the public single-file checkpoint layout (original LDM / A1111 / civitai).

Each function is the exact inverse of diffusers' own single-file import (`diffusers.loaders.single_file_utils`:
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`, `convert_controlnet_checkpoint`): a state dict exported here and loaded back
with `from_single_file` gives the same tensors. The UNet block indexing is derived from the UNet config (levels,
`layers_per_block`, which up levels carry attention), so the same code serves the tiny demo models and the real
SD 1.5 / SDXL ones.

Every key must map: an unknown key raises `ValueError` rather than being silently dropped. Tensors are
returned as views where the layout allows it (renames cost no memory); only the VAE attention reshape, the
OpenCLIP q/k/v concatenation and the text projection transpose make new tensors. The functions work on
`meta` tensors too, so a header can be computed without materialising weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.controlnet.loading import LDM_PREFIX

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers UNet top-level names -> LDM names (inverse of DIFFUSERS_TO_LDM_MAPPING["unet"]).
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}

# Resnet sub-module names inside UNet blocks: diffusers -> LDM (inverse of update_unet_resnet_ldm_to_diffusers).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_VAE_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}

_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}

_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _split_param(key: str) -> tuple[str, str]:
    """`a.b.weight` -> (`a.b`, `weight`)."""
    module, _, param = key.rpartition(".")
    return module, param


def _resnet_rest(rest: str) -> str:
    module, param = _split_param(rest)
    if module not in _UNET_RESNET:
        raise ValueError(f"unexpected UNet resnet parameter {rest!r}")
    return f"{_UNET_RESNET[module]}.{param}"


def _layers_per_block(unet_config: Mapping[str, Any]) -> int:
    lpb = unet_config["layers_per_block"]
    if not isinstance(lpb, int):
        # diffusers' importer indexes blocks with an int `layers_per_block`; a per-level list cannot round-trip.
        raise ValueError(f"layers_per_block must be an int for the LDM layout, got {lpb!r}")
    return lpb


_RE_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_RE_DOWNSAMPLE = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)")
_RE_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_RE_UPSAMPLE = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)")
_RE_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def unet_key_to_ldm(key: str, unet_config: Mapping[str, Any]) -> str:
    """One diffusers `UNet2DConditionModel` key -> its LDM name (without `model.diffusion_model.`)."""
    lpb = _layers_per_block(unet_config)
    stride = lpb + 1  # each down level: lpb layers + 1 downsampler slot; each up level: lpb + 1 layers
    module, param = _split_param(key)
    if module in _UNET_TOP:
        if module.startswith("add_embedding") and unet_config.get("addition_embed_type") != "text_time":
            raise ValueError(f"{key!r} present but addition_embed_type is not 'text_time'")
        return f"{_UNET_TOP[module]}.{param}"
    if m := _RE_DOWN.fullmatch(key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + level * stride + j
        return f"input_blocks.{idx}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := _RE_DOWNSAMPLE.fullmatch(key):
        level = int(m[1])
        return f"input_blocks.{1 + level * stride + lpb}.0.op.{m[2]}"
    if m := _RE_MID.fullmatch(key):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_resnet_rest(rest)}"
        if j != 0:
            raise ValueError(f"unexpected mid-block attention {key!r}")
        return f"middle_block.1.{rest}"
    if m := _RE_UP.fullmatch(key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = level * stride + j
        return f"output_blocks.{idx}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := _RE_UPSAMPLE.fullmatch(key):
        level = int(m[1])
        has_attention = "CrossAttn" in unet_config["up_block_types"][level]
        # The upsampler sits after the resnet (.0) and, when present, the attention (.1) of the last layer.
        slot = 2 if has_attention else 1
        return f"output_blocks.{level * stride + lpb}.{slot}.conv.{m[2]}"
    raise ValueError(f"no LDM name for UNet key {key!r}")


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> keys under `model.diffusion_model.` (tensors unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = UNET_PREFIX + unet_key_to_ldm(key, unet_config)
        if new in out:
            raise ValueError(f"two UNet keys map to {new!r}")
        out[new] = tensor
    return out


_RE_VAE_RES = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.resnets\.(\d+)\.(.+)")
_RE_VAE_SAMPLE = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(.+)")
_RE_VAE_MIDRES = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)")
_RE_VAE_MIDATTN = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> keys under `first_stage_model.`.

    Mid-block attention q/k/v/proj_out weights become 1x1 conv weights `[C, C, 1, 1]`, as LDM stores them.
    Decoder up blocks are numbered in reverse (diffusers `up_blocks.0` is LDM `up.<n-1>`).
    """
    up_levels = {int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(up_levels) + 1 if up_levels else 0
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, param = _split_param(key)
        coder, _, sub = module.partition(".")
        if module in ("quant_conv", "post_quant_conv"):
            new = key
        elif coder in ("encoder", "decoder") and sub in _VAE_TOP:
            new = f"{coder}.{_VAE_TOP[sub]}.{param}"
        elif m := _RE_VAE_RES.fullmatch(key):
            coder, blocks, level, j, rest = m[1], m[2], int(m[3]), int(m[4]), m[5]
            rest = rest.replace("conv_shortcut", "nin_shortcut")
            if blocks == "down_blocks":
                new = f"{coder}.down.{level}.block.{j}.{rest}"
            else:
                new = f"{coder}.up.{n_up - 1 - level}.block.{j}.{rest}"
        elif m := _RE_VAE_SAMPLE.fullmatch(key):
            coder, blocks, level, rest = m[1], m[2], int(m[3]), m[5]
            if blocks == "down_blocks":
                new = f"{coder}.down.{level}.downsample.conv.{rest}"
            else:
                new = f"{coder}.up.{n_up - 1 - level}.upsample.conv.{rest}"
        elif m := _RE_VAE_MIDRES.fullmatch(key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := _RE_VAE_MIDATTN.fullmatch(key):
            sub, param = _split_param(m[2])
            if sub not in _VAE_ATTN:
                raise ValueError(f"unexpected VAE attention parameter {key!r}")
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[sub]}.{param}"
            if param == "weight" and sub != "group_norm" and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        else:
            raise ValueError(f"no LDM name for VAE key {key!r}")
        new = VAE_PREFIX + new
        if new in out:
            raise ValueError(f"two VAE keys map to {new!r}")
        out[new] = tensor
    return out


def clip_text_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF `CLIPTextModel` state dict -> `<prefix>text_model.*`.

    `prefix` is the LDM module path: `cond_stage_model.transformer.` (SD1) or
    `conditioner.embedders.0.transformer.` (SDXL). Accepts keys with or without the `text_model.` prefix
    (transformers >= 5.6 drops it for `CLIPTextModel`); `position_ids` buffers are dropped (ignored on load).
    """
    if not prefix.endswith("."):
        raise ValueError(f"prefix must end with '.', got {prefix!r}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("text_projection"):
            raise ValueError(f"{key!r}: a CLIPTextModel has no projection (use openclip_text_to_ldm)")
        inner = key.removeprefix("text_model.")
        out[f"{prefix}text_model.{inner}"] = tensor
    return out


_RE_OPENCLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")


def openclip_text_to_ldm(
    state_dict: Mapping[str, torch.Tensor], prefix: str = SDXL_OPENCLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """HF `CLIPTextModelWithProjection` state dict -> OpenCLIP layout under `prefix`.

    q/k/v projections are concatenated (in that order) into `attn.in_proj_weight` / `in_proj_bias`;
    `text_projection` is stored transposed (`[hidden, projection_dim]`, OpenCLIP's `x @ proj`).
    """
    sd = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = tensor
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = tensor
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rpartition(".")[2]] = tensor
        elif m := _RE_OPENCLIP_LAYER.fullmatch(key):
            layer, rest = int(m[1]), m[2]
            module, param = _split_param(rest)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module[-6]] = tensor
            elif module in _OPENCLIP_LAYER:
                out[f"{prefix}transformer.resblocks.{layer}.{_OPENCLIP_LAYER[module]}.{param}"] = tensor
            else:
                raise ValueError(f"no OpenCLIP name for {key!r}")
        else:
            raise ValueError(f"no OpenCLIP name for {key!r}")
    for (layer, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer} {param}: incomplete q/k/v ({sorted(parts)})")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out


def component_to_ldm(name: str, module: torch.nn.Module, *, sdxl: bool) -> dict[str, torch.Tensor]:
    """One pipeline component (`unet`, `vae`, `text_encoder`, `text_encoder_2`) -> its LDM keys."""
    sd = module.state_dict()
    if name == "unet":
        return unet_to_ldm(sd, module.config)
    if name == "vae":
        return vae_to_ldm(sd)
    if name == "text_encoder":
        return clip_text_to_ldm(sd, SDXL_CLIP_PREFIX if sdxl else SD1_CLIP_PREFIX)
    if name == "text_encoder_2" and sdxl:
        return openclip_text_to_ldm(sd, SDXL_OPENCLIP_PREFIX)
    raise ValueError(f"no LDM layout for component {name!r}")


def pipeline_components(pipe: Any) -> tuple[bool, list[str]]:
    """(is_sdxl, names of the components that go into a single file) for an SD1 or SDXL pipeline."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if sdxl else [])
    return sdxl, names


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """Whole single-file checkpoint (UNet, VAE, text encoder(s)) for an SD1 or SDXL diffusers pipeline."""
    sdxl, names = pipeline_components(pipe)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        part = component_to_ldm(name, getattr(pipe, name), sdxl=sdxl)
        clash = out.keys() & part.keys()
        if clash:
            raise ValueError(f"{name}: keys already present: {sorted(clash)[:3]}")
        out.update(part)
    logger.debug("exported %d tensors (%s)", len(out), "sdxl" if sdxl else "sd1")
    return out


# ControlNet: the inverse of diffusers' `convert_controlnet_checkpoint`

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
# Writing a single file. A streaming safetensors writer: the header is computed from shapes first, then tensors
# are written group by group as they are produced, so a caller can build one component, write it and free it.
# Files appear only by write-to-temp-then-rename: a loaded checkpoint may be a live mmap (overwriting it in place
# kills the process with SIGBUS).

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def layout_of(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> Layout:
    """Name -> (dtype, shape) of `tensors` (optionally as if cast to `dtype`); works on meta tensors."""
    return {k: (dtype or t.dtype, tuple(t.shape)) for k, t in tensors.items()}


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def write_safetensors(
    path: Path,
    groups: Sequence[Layout],
    parts: Iterable[Mapping[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file atomically, one group of tensors at a time.

    `groups[i]` gives the names, dtypes and shapes of the i-th mapping `parts` yields (in write order); each
    yielded tensor is cast to its declared dtype, checked against its shape, written and released before the
    next part is requested. The file appears at `path` only when complete (temp file + `os.replace`); on any
    error the temp file is removed and nothing at `path` changes.
    """
    path = Path(path)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for group in groups:
        for name, (dtype, shape) in group.items():
            if name in header:
                raise ValueError(f"duplicate tensor name {name!r}")
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            it = iter(parts)
            for i, group in enumerate(groups):
                part = next(it, None)
                if part is None:
                    raise ValueError(f"parts ended before group {i}")
                if part.keys() != group.keys():
                    missing, extra = group.keys() - part.keys(), part.keys() - group.keys()
                    raise ValueError(f"group {i}: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
                for name, (dtype, shape) in group.items():
                    t = part[name].detach()
                    if tuple(t.shape) != shape:
                        raise ValueError(f"{name}: shape {tuple(t.shape)} != declared {shape}")
                    t = t.to(device="cpu", dtype=dtype).contiguous().reshape(-1)
                    f.write(t.view(torch.uint8).numpy().data)
                del part
            if next(it, None) is not None:
                raise ValueError("more parts than groups")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def save_single_file(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `tensors` (optionally cast to `dtype`) to `path` atomically. Same input, same bytes."""
    return write_safetensors(path, [layout_of(tensors, dtype)], [tensors], metadata)
