"""The upscaler and face-restoration models of a worker: their folders, their names, and running them.

Upscalers (pipelines.upscalers.store): `<models>/{ESRGAN,RealESRGAN,SwinIR,DAT,HAT}`, plus A1111's weightless "None",
"Lanczos" and "Nearest". Face restoration (pipelines.faces): GFPGAN weights in `<models>/GFPGAN` (CodeFormer's in `<models>/Codeformer`,
the user's own), faces found by OpenCV's Haar cascade (shipped with OpenCV) or by a YuNet file in the GFPGAN folder. The folders are scanned on first use
(the scan imports torch, which health checks and app start never import) and again on a refresh.

Running a model belongs to the device thread, like every torch call: the loaded networks are cached components of
the warm pipeline cache (pipelines.cache.PipelineCache.component: the same LRU and byte budget), in float16 on a
GPU where the architecture allows (ESRGAN, Real-ESRGAN, SRVGG; SwinIR and GFPGAN in float32, as spandrel and A1111
keep them),
tiled with A1111's options `ESRGAN_tile` / `ESRGAN_tile_overlap` (`SWIN_tile` / `SWIN_tile_overlap` for SwinIR).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from handler.runtime.engine import Engine
from handler.settings import Settings
from pipelines.errors import InvalidParameter, ModelNotFound
from pipelines.postprocess import upscale_by, weightless_step

log = logging.getLogger(__name__)

WEIGHTLESS = ("None", "Lanczos", "Nearest")
HALF_ARCHS = frozenset({"ESRGAN", "RealESRGAN", "SRVGG"})  # float16 on a GPU (spandrel's choice too)
CODEFORMER_MISSING = ("CodeFormer runs only with weights you supply: its weights are licensed for non-commercial use "
                      "only (S-Lab License 1.0), so none ship; put codeformer-v0.1.0.pth in models/Codeformer, or use "
                      "GFPGAN (GFPGANv1.4.pth in models/GFPGAN)")


class Upscaling:
    """Upscalers and face restorers of one worker (see the module docstring). Listing and name checks run on any
    thread; `upscale` and `restore` on the device thread."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._lock = threading.Lock()
        self._store: Any = None
        self._faces: Any = None
        self._detector: Any = None

    # the folders -----------------------------------------------------------------------------------------
    @property
    def store(self) -> Any:  # -> pipelines.upscalers.store.UpscalerStore
        with self._lock:
            if self._store is None:
                from pipelines.upscalers.store import UpscalerStore

                self._store = UpscalerStore(self.settings.models_dir)
            return self._store

    @property
    def faces(self) -> Any:  # -> pipelines.faces.store.FaceStore
        with self._lock:
            if self._faces is None:
                from pipelines.faces.store import FaceStore

                self._faces = FaceStore(self.settings.models_dir)
            return self._faces

    def refresh(self) -> None:
        """Rescan the upscaler and face-restoration folders (A1111's refresh routes)."""
        self.store.refresh()
        self.faces.refresh()

    def listing(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/upscalers: A1111's weightless upscalers, then every model found (A1111's item shape)."""
        from pipelines.upscalers.store import FAMILY_MODEL_NAME

        items: list[dict[str, Any]] = [{"name": name, "model_name": None, "model_path": None, "model_url": None,
                                        "scale": 4.0} for name in WEIGHTLESS]
        for entry in self.store.entries:
            items.append({"name": entry.name, "model_name": FAMILY_MODEL_NAME.get(entry.folder),
                          "model_path": str(entry.path), "model_url": None, "scale": float(entry.scale)})
        return items

    def realesrgan_listing(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/realesrgan-models: the Real-ESRGAN models found (A1111's `{name, path, scale}`)."""
        return [{"name": e.name, "path": str(e.path), "scale": e.scale} for e in self.store.entries
                if e.folder == "RealESRGAN" or e.name.startswith("R-ESRGAN")]

    def face_restorers(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/face-restorers: those whose weights are on the mount (A1111's `{name, cmd_dir}`)."""
        return [{"name": name, "cmd_dir": str(entry.path.parent)} for name, entry in self.faces.restorers.items()]

    def check(self, name: str | None, field: str) -> str:
        """The upscaler `name` names, as listed ("None" for None or ""); ModelNotFound (404) naming it when there
        is none, InvalidParameter (422) when its file is refused."""
        wanted = (name or "").strip() or "None"
        if wanted in WEIGHTLESS:
            return wanted
        return self.store.find(wanted, field=field).name

    def check_restorer(self, name: str, field: str) -> str:
        """The face restorer `name` names ("GFPGAN" or "CodeFormer", any case); a 422 naming `field` that says what
        to install where when it is not on the mount."""
        wanted = (name or "").strip()
        canonical = {"gfpgan": "GFPGAN", "codeformer": "CodeFormer"}.get(wanted.lower())
        if canonical is None:
            raise InvalidParameter(f"{field}: face restorer '{wanted}' is not offered (GFPGAN, CodeFormer)",
                                   field=field)
        if canonical not in self.faces.restorers:
            if canonical == "CodeFormer":
                raise InvalidParameter(f"{field}: {CODEFORMER_MISSING}", field=field)
            raise InvalidParameter(
                f"{field}: face restoration needs GFPGAN weights on the mount: put GFPGANv1.4.pth (or GFPGANv1.3.pth) "
                f"in {self.settings.models_dir / 'GFPGAN'} and refresh", field=field)
        return canonical

    def largest(self, width: int, height: int, scale: float, name: str, field: str) -> tuple[int, int]:
        """The largest image an upscale of a width x height image by `scale` with `name` makes (A1111's passes of
        the model until the image covers the target, or its result), to hold against the pixel limit."""
        from pipelines.postprocess import target_size

        dest = target_size(width, height, scale)
        biggest = dest
        factor = scale if name in WEIGHTLESS else self.store.find(name, field=field).scale
        w, h = width, height
        for i in range(3):
            if (w >= dest[0] and h >= dest[1] and (i > 0 or scale != 1)) or factor <= 1:
                break
            w, h = int(w * factor), int(h * factor)
            if w * h > biggest[0] * biggest[1]:
                biggest = (w, h)
        return biggest

    def check_size(self, width: int, height: int, scale: float, name: str, field: str, what: str) -> None:
        """A 422 naming `field` when upscaling `what` (width x height) by `scale` with `name` makes an empty image or
        one over the pixel limit (`max_input_pixels`), the model's passes on the way included."""
        from pipelines.postprocess import target_size

        limit = self.settings.max_input_pixels
        dest = target_size(width, height, scale)
        if dest[0] < 1 or dest[1] < 1:
            raise InvalidParameter(f"{field}: upscaling {what} ({width}x{height}) by {scale:g} makes an empty image "
                                   f"({dest[0]}x{dest[1]}: sides are floored to multiples of 8)", field=field)
        big = self.largest(width, height, scale, name, field)
        if big[0] * big[1] > limit:
            raise InvalidParameter(f"{field}: upscaling {what} ({width}x{height}) with {name} makes a "
                                   f"{big[0]}x{big[1]} image, over the limit of {limit} pixels", field=field)

    # the device thread ---------------------------------------------------------------------------------
    def upscale(self, image: Image.Image, name: str, scale: float, options: dict[str, Any],
                keep_going: Callable[[], bool] | None = None) -> Image.Image:
        """`image` upscaled by `scale` with the upscaler `name` (checked already), A1111's way
        (pipelines.postprocess.upscale_by); the model runs tiled with the caller's tile options, `keep_going`
        asked before each tile (pipelines.upscalers.tiling.Interrupted when it says no)."""
        if name in WEIGHTLESS:
            return upscale_by(image, scale, weightless_step(name, scale))
        from pipelines.upscalers.tiling import upscale

        entry = self.store.find(name, field="upscaler")
        model = self._model(entry.path, f"upscaler {entry.name}", _load_upscaler)
        prefix = "SWIN" if model.arch == "SwinIR" else "ESRGAN"
        tile = int(options.get(f"{prefix}_tile", 192))
        overlap = int(options.get(f"{prefix}_tile_overlap", 8))
        param = next(model.net.parameters())

        def step(im: Image.Image) -> Image.Image:
            return upscale(model, im, tile=tile, overlap=overlap, device=param.device, dtype=param.dtype,
                           keep_going=keep_going)

        return upscale_by(image, scale, step)

    def restore(self, image: Image.Image, name: str, weight: float = 0.5) -> Image.Image:
        """`image` (RGB) with each face found restored by `name` ("GFPGAN" or "CodeFormer", checked already; `weight`
        is CodeFormer's fidelity) and pasted back."""
        from pipelines.faces.restore import restore_faces

        entry = self.faces.restorers.get(name)
        if entry is None:  # removed from the mount since the request was checked
            raise ModelNotFound(f"the {name} weights are no longer on the mount; refresh", field="restore_faces")
        model = self._model(entry.path, f"face restorer {name}", _load_restorer)
        param = next(model.net.parameters())
        return restore_faces(image, model, self._face_detector(), device=param.device, dtype=param.dtype,
                             weight=weight)

    def _face_detector(self) -> Any:
        """The face detector: YuNet when its file is in the GFPGAN folder (and loads), else OpenCV's Haar cascade
        (made once per file)."""
        yunet = self.faces.detector_file
        key = str(yunet) if yunet is not None else "haar"
        if self._detector is None or self._detector[0] != key:
            from pipelines.faces.detect import FaceDetector

            try:
                detector = FaceDetector(yunet)
            except Exception as exc:  # noqa: BLE001 - cv2.error: a corrupt or foreign ONNX file
                log.warning("the YuNet file %s does not load (%s); faces are found by OpenCV's Haar cascade",
                            yunet, exc)
                detector = FaceDetector(None)
            self._detector = (key, detector)
            log.info("face detector: %s", detector.name)
        return self._detector[1]

    def _model(self, path: Path, name: str, load: Any) -> Any:
        """The network of `path` from the warm cache, loaded by `load(path)` and moved to the device (float16 on a
        GPU where its architecture allows) on a miss."""
        import torch

        cache = self.engine.cache

        def build() -> Any:
            model = load(path)
            half = cache.dtype in ("float16", "bfloat16") and model.arch in HALF_ARCHS
            model.net.to(device=cache.device, dtype=getattr(torch, cache.dtype) if half else torch.float32)
            return model

        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ModelNotFound(f"{path.name} is no longer on the mount; refresh", field=path.name) from None
        # a file replaced on the mount is a new component (the old one leaves the cache in its turn)
        return cache.component(path, build, name=name, version=f"{stat.st_size}-{stat.st_mtime_ns}")


def _load_upscaler(path: Path) -> Any:
    from pipelines.upscalers.load import load_upscaler

    return load_upscaler(path)


def _load_restorer(path: Path) -> Any:
    from pipelines.faces.gfpgan import load_face_restorer

    return load_face_restorer(path)
