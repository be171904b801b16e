"""Faces restored in place, as A1111 1.10 does it (`modules/face_restoration_utils.restore_with_face_helper` with
facexlib's `FaceRestoreHelper(upscale_factor=1, face_size=512)`), the face size being the restorer's:

1. the five landmarks of each face (`FaceDetector`), largest first;
2. the similarity taking them to the FFHQ template (`cv2.estimateAffinePartial2D`, LMEDS, as facexlib), the face
   warped to a `size` x `size` crop, outside the image facexlib's gray (BGR 135, 133, 132);
3. the crop as RGB in [-1, 1] through the network, the result clamped and truncated to uint8 as A1111 converts it;
4. pasted back through the inverse similarity with facexlib's square soft mask: the warped mask eroded by 2 pixels,
   eroded again by w_edge * 2 and Gaussian-blurred over w_edge * 2 + 1 (w_edge = sqrt(face area) // 20); faces
   are blended one after another on a float canvas truncated to uint8 at the end.

A1111 asks facexlib for a face-parsing mask (`use_parse=True`, a ParseNet download); the square mask here is
facexlib's own fallback, which it uses without parsing. The visibility blend with the original image is the
caller's, as in A1111.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from pipelines.faces.detect import FFHQ_TEMPLATE, FaceDetector
from pipelines.faces.gfpgan import FaceRestorer

_BORDER_RGB = (132, 133, 135)  # facexlib's BGR (135, 133, 132): this module works in RGB


def _restore_crop(restorer: FaceRestorer, crop: np.ndarray, device: torch.device | str, dtype: torch.dtype,
                  generator: torch.Generator | None, weight: float) -> np.ndarray:
    """The network on one aligned RGB uint8 crop, back to RGB uint8 (clamped to [-1, 1], truncated as A1111)."""
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5)
    x = x.to(device=device, dtype=dtype)
    if restorer.arch == "CodeFormer":
        out = restorer.net(x, w=weight, adain=True)
    else:
        out = restorer.net(x, generator=generator)
    rgb01 = ((out[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    return (rgb01 * 255.0).astype(np.uint8)


def _paste(canvas: np.ndarray, face: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """`face` warped back by `inverse` and blended into `canvas` (float32 H x W x 3) with facexlib's soft mask."""
    h, w = canvas.shape[:2]
    warped = cv2.warpAffine(face, inverse, (w, h))
    mask = cv2.warpAffine(np.ones(face.shape[:2], np.float32), inverse, (w, h))
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))  # the warp's blurred border
    pasted = mask[:, :, None] * warped
    w_edge = int(float(mask.sum()) ** 0.5) // 20
    side = 2 * w_edge or 3  # facexlib's empty kernel (faces under 20 x 20 pixels) is OpenCV's default 3 x 3
    mask = cv2.erode(mask, np.ones((side, side), np.uint8))
    soft = cv2.GaussianBlur(mask, (2 * w_edge + 1, 2 * w_edge + 1), 0)[:, :, None]
    return soft * pasted + (1 - soft) * canvas


@torch.inference_mode()
def restore_faces(image: Image.Image, restorer: FaceRestorer, detector: FaceDetector, *,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  generator: torch.Generator | None = None, weight: float = 0.5) -> Image.Image:
    """`image` (as RGB) with each detected face restored; the same pixels when no face is found. `restorer.net`
    must already be on `device` in `dtype`. GFPGAN draws fresh noise for each face, from `generator` when given
    (reproducible), else from torch's global generator (as A1111); it ignores `weight`. CodeFormer is
    deterministic and takes `weight` as its fidelity `w` (A1111's `code_former_weight` / `codeformer_weight`: 0 the
    most restored, 1 the closest to the input), with AdaIN as A1111 runs it."""
    rgb = np.asarray(image.convert("RGB"))
    template = FFHQ_TEMPLATE * (restorer.size / 512.0)
    canvas: np.ndarray | None = None
    for landmarks in detector.detect(rgb):
        affine = cv2.estimateAffinePartial2D(landmarks, template, method=cv2.LMEDS)[0]
        if affine is None:
            continue
        crop = cv2.warpAffine(rgb, affine, (restorer.size, restorer.size), borderMode=cv2.BORDER_CONSTANT,
                              borderValue=_BORDER_RGB)
        face = _restore_crop(restorer, crop, device, dtype, generator, weight)
        canvas = _paste(rgb.astype(np.float32) if canvas is None else canvas, face,
                        cv2.invertAffineTransform(affine))
    if canvas is None:
        return Image.fromarray(rgb.copy(), "RGB")
    return Image.fromarray(canvas.astype(np.uint8), "RGB")
