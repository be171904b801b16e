"""The face-restoration files on the mount, in A1111's folders: GFPGAN weights and an optional YuNet face detector
in `<models>/GFPGAN` (where A1111 keeps GFPGAN and its face helper's weights), CodeFormer weights in
`<models>/Codeformer` (only ever the user's: their licence is non-commercial).

A weights file is offered when it is a `.safetensors` file, or a `.pth` file that unpickles weights-only (a pickle
that would run code is refused, never executed), whose tensors are GFPGAN's ("clean" v1.3 / v1.4 layout) or
CodeFormer's: checked by its keys at the scan. With several of a kind, the last by name is used (`GFPGANv1.4`
before `GFPGANv1.3`). The detector is a `face_detection_yunet*.onnx` file in the GFPGAN folder, when one is;
without it OpenCV's Haar cascade is used.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import InvalidParameter
from pipelines.store import leads_outside

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pth")
GFPGAN_KEY = "stylegan_decoder.style_conv1.modulated_conv.weight"  # present in every clean GFPGAN state dict
CODEFORMER_KEYS = ("position_emb", "quantize.embedding.weight")
FOLDERS = {"GFPGAN": "GFPGAN", "CodeFormer": "Codeformer"}  # restorer -> its folder under <models>


@dataclass(frozen=True)
class FaceEntry:
    name: str  # file stem
    path: Path


def _keys(path: Path) -> list[str]:
    """The tensor names of a weights file (the header alone for `.safetensors`; `.pth` memory-mapped, weights-only)."""
    if path.suffix == ".safetensors":
        from pipelines import safetensors_header

        try:
            return list(safetensors_header.read_header(path, check_offsets=True).tensors)
        except (safetensors_header.HeaderError, OSError) as exc:
            raise InvalidParameter(f"{path.name}: not a loadable weights file ({exc})", field=path.name) from None
    from pipelines.upscalers.load import read_state_dict

    return list(read_state_dict(path, mmap=True))


class FaceStore:
    """The scanned folders under `models_dir`: `restorers` (name -> file) and `detector_file` (YuNet or None)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._lock = threading.Lock()
        self._restorers: dict[str, FaceEntry] = {}
        self._detector: Path | None = None
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders."""
        restorers: dict[str, FaceEntry] = {}
        detector: Path | None = None
        for name, folder in FOLDERS.items():
            root = self.models_dir / folder
            if not root.is_dir():
                continue
            real_root = root.resolve()
            for path in sorted(root.iterdir()):
                if path.name.startswith(".") or not path.is_file() or leads_outside(path, real_root, "face model"):
                    continue
                if path.suffix == ".onnx" and path.name.startswith("face_detection_yunet") and name == "GFPGAN":
                    detector = path
                elif path.suffix in SUFFIXES:
                    try:
                        keys = set(_keys(path))
                    except InvalidParameter as exc:
                        log.warning("face model %s is not offered: %s", path.name, exc)
                        continue
                    if (GFPGAN_KEY in keys) if name == "GFPGAN" else all(k in keys for k in CODEFORMER_KEYS):
                        restorers[name] = FaceEntry(path.stem, path)  # the last by name wins
                    else:
                        log.warning("face model %s/%s is not a %s state dict; not offered", folder, path.name, name)
        with self._lock:
            self._restorers, self._detector = restorers, detector
        for name, entry in restorers.items():
            log.info("face restoration: %s from %s, faces found by %s", name, entry.path.name,
                     detector.name if detector else "OpenCV's Haar cascade")

    @property
    def restorers(self) -> dict[str, FaceEntry]:
        """The offered restorers, GFPGAN first."""
        with self._lock:
            return dict(self._restorers)

    @property
    def restorer(self) -> FaceEntry | None:
        """GFPGAN's file, or None."""
        with self._lock:
            return self._restorers.get("GFPGAN")

    @property
    def detector_file(self) -> Path | None:
        with self._lock:
            return self._detector
