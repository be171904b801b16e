"""The face-restoration files on the mount: GFPGAN weights and an optional YuNet face detector in one folder
(`<models>/GFPGAN`, where A1111 keeps GFPGAN and its face helper's weights).

A weights file is offered when it is a `.safetensors` file, or a `.pth` file that unpickles weights-only (a pickle
that would run code is refused, never executed), whose tensors are GFPGAN's ("clean" v1.3 / v1.4 layout: checked by
its keys at the scan). With several, the last by name is used (`GFPGANv1.4` before `GFPGANv1.3`). The detector is a
`face_detection_yunet*.onnx` file there, when one is; without it OpenCV's Haar cascade is used.
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
    """The scanned folder `root`: `restorer` (the GFPGAN file or None) and `detector_file` (YuNet or None)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._restorer: FaceEntry | None = None
        self._detector: Path | None = None
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folder."""
        restorers: list[FaceEntry] = []
        detector: Path | None = None
        if self.root.is_dir():
            real_root = self.root.resolve()
            for path in sorted(self.root.iterdir()):
                if path.name.startswith(".") or not path.is_file() or leads_outside(path, real_root, "face model"):
                    continue
                if path.suffix == ".onnx" and path.name.startswith("face_detection_yunet"):
                    detector = path
                elif path.suffix in SUFFIXES:
                    try:
                        keys = _keys(path)
                    except InvalidParameter as exc:
                        log.warning("face model %s is not offered: %s", path.name, exc)
                        continue
                    if GFPGAN_KEY in keys:
                        restorers.append(FaceEntry(path.stem, path))
        with self._lock:
            self._restorer = restorers[-1] if restorers else None
            self._detector = detector
        if restorers:
            log.info("face restoration: GFPGAN from %s, faces found by %s", restorers[-1].path.name,
                     detector.name if detector else "OpenCV's Haar cascade")

    @property
    def restorer(self) -> FaceEntry | None:
        with self._lock:
            return self._restorer

    @property
    def detector_file(self) -> Path | None:
        with self._lock:
            return self._detector
