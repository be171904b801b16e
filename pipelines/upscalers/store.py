"""The upscaler models on the mount, listed and named as A1111 lists and names them.

Folders as A1111 lays them out: `<models>/ESRGAN`, `RealESRGAN`, `SwinIR`, `DAT`, `HAT` (sub-folders too). A file
is offered when it is a `.safetensors` file, or a `.pth` file that unpickles weights-only (a pickle that would run
code is refused and never executed), and its state dict is an architecture `pipelines.upscalers.load` builds
(ESRGAN, Real-ESRGAN, SRVGG compact, SwinIR): that is checked at the scan from the tensors' shapes alone, on the
meta device, so the listing says each model's real scale and a file that cannot load is not offered. DAT and HAT
files are scanned and refused with the reason (their architectures are not built here).

Names: the file stem, as A1111 names ESRGAN, SwinIR, DAT and HAT models. A1111's built-in names (`R-ESRGAN 4x+`,
`R-ESRGAN 2x+`, `SwinIR 4x`, ...), which A1111 downloads on first use, name the file of the published name when it
is on the mount (never downloaded here): `R-ESRGAN 4x+` is `RealESRGAN_x4plus.pth` (or `.safetensors`), looked for
in `RealESRGAN` first, then in every folder. Clients name models; a name is only ever matched against what the scan
found, and a link that leads out of its folder is not offered.

The scan reads a file again only when its size or modification time changed (`refresh`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import InvalidParameter, ModelNotFound
from pipelines.store import leads_outside

log = logging.getLogger(__name__)

FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT")
SUFFIXES = (".safetensors", ".pth")
# A1111's upscalers that need no weights, listed first and in this order.
WEIGHTLESS = ("None", "Lanczos", "Nearest")
# A1111 1.10's built-in names -> the stem of the file that provides them (modules/realesrgan_model.py, esrgan_model,
# the SwinIR extension), in A1111's listing order of the Real-ESRGAN ones.
BUILTIN_NAMES: dict[str, str] = {
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
    "ESRGAN_4x": "ESRGAN_4x",
    "SwinIR 4x": "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN",
}
# A1111's `model_name` of each upscaler family (None for Real-ESRGAN, DAT and HAT, as A1111 has it).
FAMILY_MODEL_NAME = {"ESRGAN": "ESRGAN_4x", "SwinIR": "SwinIR 4x"}


@dataclass(frozen=True)
class UpscalerEntry:
    """One model upscaler: `name` as listed, its file, the folder it was found in, and what the scan read from its
    tensors (`arch` as `pipelines.upscalers.load.UpscalerNet.arch`, `scale`)."""

    name: str
    path: Path
    folder: str
    arch: str
    scale: int

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_NAMES


def describe(path: Path) -> tuple[str, int]:
    """(arch, scale) of the upscaler file `path`, read from its tensors' names and shapes without reading the
    weights (a `.pth` file is unpickled weights-only, memory-mapped); InvalidParameter (field = file name) when it
    is not a file `load_upscaler` loads."""
    import torch

    from pipelines.upscalers.load import from_state_dict, meta_state_dict

    meta = meta_state_dict(path)
    with torch.device("meta"):
        model = from_state_dict(meta, path.name)
    probe = torch.empty((1, 3, 8 * model.multiple, 8 * model.multiple), device="meta")
    try:
        out = model.net(probe)  # shapes only: an RGB model gives 3 channels at `scale` times the size
    except Exception as exc:  # noqa: BLE001
        raise InvalidParameter(f"{path.name}: the network does not run ({type(exc).__name__})", field=path.name) from None
    if out.shape[1] != 3 or out.shape[-1] != probe.shape[-1] * model.scale:
        raise InvalidParameter(f"{path.name}: gives {out.shape[1]} channels at {out.shape[-1] / probe.shape[-1]:g}x; "
                               "only RGB upscalers are offered", field=path.name)
    return model.arch, model.scale


class UpscalerStore:
    """The scanned upscaler files under `root` (the models folder). Thread-safe; `refresh` rescans."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._entries: list[UpscalerEntry] = []
        self._refused: dict[str, str] = {}  # name (stem) -> why the file is not offered
        self._seen: dict[Path, tuple[int, int, tuple[str, int] | str]] = {}  # path -> (size, mtime, result)
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders (POST /sdapi/v1/refresh-checkpoints)."""
        found: list[UpscalerEntry] = []
        refused: dict[str, str] = {}
        seen: dict[Path, tuple[int, int, tuple[str, int] | str]] = {}
        for folder in FOLDERS:
            base = self.root / folder
            if not base.is_dir():
                continue
            real_root = base.resolve()
            for path in sorted(base.rglob("*")):
                rel = path.relative_to(base)
                if (any(part.startswith(".") for part in rel.parts) or not path.is_file()
                        or path.suffix not in SUFFIXES or leads_outside(path, real_root, "upscaler")):
                    continue
                stat = path.stat()
                old = self._seen.get(path)
                if old is not None and old[:2] == (stat.st_size, stat.st_mtime_ns):
                    result = old[2]
                else:
                    try:
                        result = describe(path)
                    except InvalidParameter as exc:
                        result = str(exc)
                    except Exception as exc:  # noqa: BLE001 - one odd file never hides the others
                        result = f"{path.name}: not a loadable upscaler file ({type(exc).__name__})"
                    if isinstance(result, str):
                        log.warning("upscaler %s/%s is not offered: %s", folder, rel.as_posix(), result)
                seen[path] = (stat.st_size, stat.st_mtime_ns, result)
                if isinstance(result, str):
                    refused[path.stem] = result
                else:
                    found.append(UpscalerEntry(path.stem, path, folder, *result))
        entries = _with_builtin_names(found)
        with self._lock:
            self._entries, self._refused, self._seen = entries, refused, seen
        log.info("found %d upscaler model(s)", len(entries))

    @property
    def entries(self) -> list[UpscalerEntry]:
        """Every offered model upscaler, by name (case-insensitive), as A1111 lists them after the weightless ones."""
        with self._lock:
            return list(self._entries)

    def find(self, name: str, *, field: str) -> UpscalerEntry:
        """The model upscaler `name` names (a listed name or a file stem); ModelNotFound naming it (404) when
        there is none, InvalidParameter (422) when its file was refused, with the reason."""
        wanted = (name or "").strip()
        entries = self.entries
        for entry in entries:
            if entry.name == wanted:
                return entry
        for entry in entries:
            if entry.path.stem == wanted:
                return entry
        with self._lock:
            reason = self._refused.get(BUILTIN_NAMES.get(wanted, wanted))
        if reason is not None:
            raise InvalidParameter(f"{field}: upscaler '{wanted}' is not offered: {reason}", field=field)
        raise ModelNotFound(f"{field}: upscaler '{wanted}' not found (GET /sdapi/v1/upscalers lists them; models are "
                            f"read from models/{{{','.join(FOLDERS)}}})", field=field)


def _with_builtin_names(found: list[UpscalerEntry]) -> list[UpscalerEntry]:
    """`found`, each file of a built-in name listed under that name (the Real-ESRGAN folder's file first when two
    folders hold one), the rest under their stems; by name, case-insensitively, as A1111 sorts them."""
    named: list[UpscalerEntry] = []
    taken: set[Path] = set()
    for builtin, stem in BUILTIN_NAMES.items():
        matches = [e for e in found if e.path.stem == stem]
        matches.sort(key=lambda e: (e.folder != "RealESRGAN", str(e.path)))
        if matches:
            entry = matches[0]
            named.append(UpscalerEntry(builtin, entry.path, entry.folder, entry.arch, entry.scale))
            taken.add(entry.path)
    others: dict[str, UpscalerEntry] = {}
    for entry in found:
        if entry.path not in taken and entry.name not in others:  # the same stem twice: the first folder's
            others[entry.name] = entry
    return sorted([*named, *others.values()], key=lambda e: e.name.lower())
