"""An upscaler file to a ready network: the architecture, scale and sizes read from the state dict's keys and shapes.

`.safetensors` files are read as tensors; `.pth` files only with `torch.load(weights_only=True)`, which refuses any
pickle that would run code (a 422 naming the file, never executed). Old ESRGAN keys (`model.0`, `model.1.sub.<i>.
RDB<k>.conv<j>.0`, ...) are mapped to the new ones (`conv_first`, `body.<i>.rdb<k>.conv<j>`, ...) as A1111 did.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipelines.errors import InvalidParameter
from pipelines.upscalers.arch import RRDBNet, SRVGGNetCompact
from pipelines.upscalers.swinir import SwinIR, is_swinir, swinir_params

StateDict = dict[str, torch.Tensor]
SUFFIXES = (".safetensors", ".pth")


@dataclass
class UpscalerNet:
    """A loaded upscaler: its network (eval mode, on the CPU until moved), architecture name and scale."""

    net: nn.Module
    arch: str  # "ESRGAN", "RealESRGAN" (pixel-unshuffle variants), "SRVGG" or "SwinIR"
    scale: int

    @property
    def components(self) -> dict[str, nn.Module]:
        """Its torch modules, as a pipeline's `components` (pipelines.cache keeps it warm with the pipelines)."""
        return {"net": self.net}

    @property
    def multiple(self) -> int:
        """Input sizes must be multiples of this (pixel-unshuffle folds 2x2 or 4x4 blocks)."""
        return getattr(self.net, "unshuffle", 1)


def read_state_dict(path: Path, *, mmap: bool = False) -> StateDict:
    """The tensors of `path`; InvalidParameter (field = the file name) for a file that is not one. `mmap` maps a
    `.pth` file's storages instead of reading them (a file saved in torch's old format is read)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        elif path.suffix == ".pth":
            data = _torch_load(path, mmap)
        else:
            raise InvalidParameter(f"{path.name}: not a .safetensors or .pth file", field=path.name)
    except InvalidParameter:
        raise
    except Exception as exc:  # a pickle with code in it, a truncated or corrupt file
        if "unsupported global" in str(exc).lower():
            raise InvalidParameter(f"{path.name}: a pickle that names code or objects other than tensors; refused "
                                   "by weights-only unpickling, never run (save it as .safetensors)",
                                   field=path.name) from None
        raise InvalidParameter(f"{path.name}: not a loadable weights file ({type(exc).__name__})",
                               field=path.name) from None
    for wrapper in ("params_ema", "params", "state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InvalidParameter(f"{path.name}: holds no state dict of tensors", field=path.name)
    return data


def meta_state_dict(path: Path) -> StateDict:
    """The tensors of `path` as meta tensors of their shapes, for checking a file without reading its weights: the
    `.safetensors` header alone, or the `.pth` pickle unpickled weights-only with its storages memory-mapped;
    InvalidParameter (field = the file name) for a file that is not one."""
    if path.suffix == ".safetensors":
        from pipelines import safetensors_header

        try:
            shapes = safetensors_header.read_header(path, check_offsets=True).shapes()
        except (safetensors_header.HeaderError, OSError) as exc:
            raise InvalidParameter(f"{path.name}: not a loadable weights file ({exc})", field=path.name) from None
        return {k: torch.empty(shape, device="meta") for k, (_dtype, shape) in shapes.items()}
    return {k: torch.empty(v.shape, device="meta") for k, v in read_state_dict(path, mmap=True).items()}


def _torch_load(path: Path, mmap: bool) -> object:
    """`torch.load` weights-only: a pickle naming anything but tensors and containers raises before it runs."""
    if mmap:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "zipfile" not in str(exc):  # only torch's old format cannot be mapped
                raise
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _old_esrgan_to_new(sd: StateDict) -> StateDict:
    """ESRGAN's original keys to BasicSR's: body blocks, then the upsampling convs at model.3, .6, ... and the two
    last convs after them."""
    last = max(int(m[1]) for k in sd if (m := re.match(r"model\.(\d+)\.weight$", k)))
    ups = (last - 4) // 3
    names = {"0": "conv_first", str(3 * ups + 2): "conv_hr", str(last): "conv_last"}
    names.update({str(3 * n): f"conv_up{n}" for n in range(1, ups + 1)})
    blocks = sum(1 for k in sd if re.match(r"model\.1\.sub\.\d+\.RDB1\.conv1\.0\.weight$", k))
    out: StateDict = {}
    for key, value in sd.items():
        if m := re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := re.match(rf"model\.1\.sub\.{blocks}\.(weight|bias)$", key):
            out[f"conv_body.{m[1]}"] = value
        elif (m := re.match(r"model\.(\d+)\.(weight|bias)$", key)) and m[1] in names:
            out[f"{names[m[1]]}.{m[2]}"] = value
        else:
            raise KeyError(key)
    return out


def from_state_dict(sd: StateDict, name: str = "upscaler") -> UpscalerNet:
    """The network `sd` describes, its weights loaded strictly; InvalidParameter (field `name`) when the layout is
    none of the supported ones or does not fit."""
    try:
        if "model.0.weight" in sd and any(k.startswith("model.1.sub.") for k in sd):
            sd = _old_esrgan_to_new(sd)
        if is_swinir(sd):  # first: SwinIR has a conv_first too
            net: nn.Module = SwinIR(**swinir_params(sd))
            arch = "SwinIR"
        elif "conv_first.weight" in sd:
            first = sd["conv_first.weight"]
            unshuffle = math.isqrt(first.shape[1] // 3)
            if unshuffle == 0 or 3 * unshuffle * unshuffle != first.shape[1]:  # 1 grey channel, 4 with alpha...
                raise InvalidParameter(f"{name}: a model for {first.shape[1]} input channels; only RGB models "
                                       "(3 channels) are offered", field=name)
            net = RRDBNet(
                in_ch=first.shape[1] // (unshuffle * unshuffle), out_ch=sd["conv_last.weight"].shape[0],
                num_feat=first.shape[0], num_grow_ch=sd["body.0.rdb1.conv1.weight"].shape[0],
                num_block=sum(1 for k in sd if re.match(r"body\.\d+\.rdb1\.conv1\.weight$", k)),
                upsamples=sum(1 for k in sd if re.match(r"conv_up\d+\.weight$", k)), unshuffle=unshuffle)
            arch = "ESRGAN" if unshuffle == 1 else "RealESRGAN"
        elif "body.0.weight" in sd and sd["body.0.weight"].ndim == 4:
            convs = sorted(int(m[1]) for k, v in sd.items() if (m := re.match(r"body\.(\d+)\.weight$", k)) and v.ndim == 4)
            last = sd[f"body.{convs[-1]}.weight"]
            in_ch = sd["body.0.weight"].shape[1]
            net = SRVGGNetCompact(in_ch=in_ch, out_ch=in_ch, num_feat=sd["body.0.weight"].shape[0],
                                  num_conv=len(convs) - 2, upscale=math.isqrt(last.shape[0] // in_ch),
                                  prelu="body.1.weight" in sd)
            arch = "SRVGG"
        else:
            raise InvalidParameter(f"{name}: not an ESRGAN, Real-ESRGAN, SRVGG or SwinIR state dict", field=name)
        first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
        if first.in_channels // getattr(net, "unshuffle", 1) ** 2 != 3:
            raise InvalidParameter(f"{name}: a model for {first.in_channels} input channels; only RGB models "
                                   "(3 channels) are offered", field=name)
        net.load_state_dict(sd, strict=True)
    except InvalidParameter:
        raise
    except Exception as exc:  # noqa: BLE001 - any shape the layout does not expect (a zero channel count...)
        raise InvalidParameter(f"{name}: the state dict does not fit its architecture ({type(exc).__name__})",
                               field=name) from None
    scale = net.scale
    if scale != int(scale) or scale < 1:
        raise InvalidParameter(f"{name}: an upscaler of scale {scale} is not supported", field=name)
    return UpscalerNet(net.eval().requires_grad_(False), arch, int(scale))


def load_upscaler(path: Path) -> UpscalerNet:
    """The upscaler in `path` (see the module docstring)."""
    return from_state_dict(read_state_dict(path), path.name)
