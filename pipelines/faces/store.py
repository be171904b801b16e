"""The face-restoration files on the mount, in A1111's folders: GFPGAN weights and an optional YuNet face detector
in `<models>/GFPGAN` (where A1111 keeps GFPGAN and its face helper's weights), CodeFormer weights in
`<models>/Codeformer` (only ever the user's: their licence is non-commercial).

A weights file is offered when it is a `.safetensors` file, or a `.pth` file that unpickles weights-only (a pickle
that would run code is refused, never executed), whose tensors are GFPGAN's ("clean" v1.3 / v1.4 layout) or
CodeFormer's: the network is built from them on the meta device at the scan (shapes only), so a file that would not
load is not offered. With several of a kind, the published files come first (`GFPGANv1.4`, then `GFPGANv1.3`;
`codeformer-v0.1.0`), then others by name, the tiny demo files last. The detector is a `face_detection_yunet*.onnx`
file in the GFPGAN folder, when one is; without it OpenCV's Haar cascade is used.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.store import leads_outside

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pth")
FOLDERS = {"GFPGAN": "GFPGAN", "CodeFormer": "Codeformer"}  # restorer -> its folder under <models>


@dataclass(frozen=True)
class FaceEntry:
    name: str  # file stem
    path: Path


PREFERRED = ("GFPGANv1.4", "GFPGANv1.3", "codeformer-v0.1.0")  # the published files, best first


def _rank(entry: FaceEntry) -> tuple[int, str]:
    """Sort key: the published files first, the tiny demo files last, else by name."""
    stem = entry.path.stem
    for i, name in enumerate(PREFERRED):
        if stem.startswith(name):
            return i, stem
    return (len(PREFERRED) + 1 if stem.startswith("demo-") else len(PREFERRED)), stem


def describe(path: Path) -> str:
    """"GFPGAN" or "CodeFormer": the restorer the file `path` holds, checked by building its network from the
    tensors' shapes on the meta device (nothing but the header or the pickle is read); InvalidParameter (field =
    the file name) otherwise."""
    import torch

    from pipelines.faces.gfpgan import face_restorer_from_state_dict
    from pipelines.upscalers.load import meta_state_dict

    meta = meta_state_dict(path)
    with torch.device("meta"):
        return face_restorer_from_state_dict(meta, path.name).arch


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
                        arch = describe(path)
                    except Exception as exc:  # noqa: BLE001 - one odd file never hides the others
                        log.warning("face model %s/%s is not offered: %s", folder, path.name, exc)
                        continue
                    entry = FaceEntry(path.stem, path)
                    if arch != name:
                        log.warning("face model %s/%s is a %s model, not %s; not offered", folder, path.name, arch,
                                    name)
                    elif name not in restorers or _rank(entry) < _rank(restorers[name]):
                        restorers[name] = entry
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
