"""Faces and their five landmarks, found with OpenCV alone: nothing to download.

A1111 finds faces with facexlib's RetinaFace (ResNet-50, fetched from GitHub at first use). Here:
- "haar": OpenCV's frontal-face Haar cascade, shipped inside the opencv wheel (`cv2.data.haarcascades`). It gives
  only a box; the five landmarks are the FFHQ template placed in the box at the proportions of that cascade's
  boxes, the eyes then refined with the eye cascade in the box's upper half: two eyes found place all five
  landmarks from the eyes (so a tilted head is aligned), one eye found replaces its estimate.
- "yunet": OpenCV's YuNet face detector (`cv2.FaceDetectorYN`), when the deployment puts its ONNX file
  (`face_detection_yunet_2023mar.onnx`, from the OpenCV model zoo) on the mount: its own five landmarks.

Landmarks are in image coordinates (x, y), in facexlib's order: the eye on the image's left, the other eye, the
nose tip, the mouth corner on the image's left, the other one. As in A1111, the image is searched at most at 640
pixels on its shorter side, and faces whose eyes are less than 5 pixels apart are dropped.

Not thread-safe: cv2's cascade and YuNet objects keep state between calls, so a FaceDetector is used on one thread
(the device thread) only.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

# facexlib's FFHQ template (512 x 512): eyes, nose tip, mouth corners
FFHQ_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)

# Where the frontal-face cascade's box puts the eyes: their midpoint at (0.5, 0.38) of the box, their distance 0.39
# of its width (measured on frontal portraits); nose and mouth follow from the template's proportions.
_BOX_EYE_Y, _BOX_EYE_DIST = 0.38, 0.39


def _similar(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) taking the two points `src` to the two points `dst`."""
    s, d = complex(*(src[1] - src[0])), complex(*(dst[1] - dst[0]))
    r = d / s
    t = complex(*dst[0]) - r * complex(*src[0])
    return np.array([[r.real, -r.imag, t.real], [r.imag, r.real, t.imag]], dtype=np.float64)


def _apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return (points @ m[:, :2].T + m[:, 2]).astype(np.float32)


def _from_eyes(eyes: np.ndarray) -> np.ndarray:
    """Five landmarks: the template moved so that its eyes are `eyes` (2 x 2, image-left first)."""
    return _apply(_similar(FFHQ_TEMPLATE[:2], eyes), FFHQ_TEMPLATE)


def _from_box(x: float, y: float, w: float, h: float) -> np.ndarray:
    """Five landmarks estimated from a frontal-face cascade box."""
    mid = np.array([x + w / 2, y + _BOX_EYE_Y * h])
    half = np.array([_BOX_EYE_DIST * w / 2, 0.0])
    return _from_eyes(np.stack([mid - half, mid + half]))


class FaceDetector:
    """`detect(rgb)`: the five landmarks of each face of at least `min_size` pixels (box side), largest first.

    `yunet`: the path of a YuNet ONNX file; None uses the Haar cascades. `name` says which ("haar" / "yunet")."""

    def __init__(self, yunet: Path | None = None, *, min_size: int = 32, detect_size: int = 640,
                 score_threshold: float = 0.9, eye_dist_threshold: float = 5.0) -> None:
        self.min_size, self.detect_size = min_size, detect_size
        self.eye_dist_threshold = eye_dist_threshold
        self.name = "yunet" if yunet is not None else "haar"
        if yunet is not None:
            self._yunet = cv2.FaceDetectorYN.create(str(yunet), "", (320, 320), score_threshold, 0.3, 5000)
        else:
            root = cv2.data.haarcascades
            self._face = cv2.CascadeClassifier(root + "haarcascade_frontalface_default.xml")
            self._eye = cv2.CascadeClassifier(root + "haarcascade_eye.xml")
            if self._face.empty() or self._eye.empty():
                raise RuntimeError("OpenCV's Haar cascades are missing from cv2.data.haarcascades")

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Landmarks (5 x 2 float32, image coordinates) for each face in `rgb` (H x W x 3 uint8), largest first."""
        h, w = rgb.shape[:2]
        scale = min(1.0, self.detect_size / min(h, w))  # search a reduced copy of large images
        small = rgb if scale == 1.0 else cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                     interpolation=cv2.INTER_AREA)
        found = self._yunet_faces(small) if self.name == "yunet" else self._haar_faces(small)
        faces = []
        for side, points in sorted(found, key=lambda f: -f[0]):
            points = points / scale
            if side / scale >= self.min_size and np.linalg.norm(points[1] - points[0]) >= self.eye_dist_threshold:
                faces.append(points.astype(np.float32))
        return faces

    def _yunet_faces(self, rgb: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """YuNet's rows: box (x, y, w, h), five landmarks, score. Its landmark order names the subject's eyes; here
        each pair is sorted by x to facexlib's image-left-first order."""
        self._yunet.setInputSize((rgb.shape[1], rgb.shape[0]))
        _, rows = self._yunet.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        out = []
        for row in rows if rows is not None else ():
            p = row[4:14].reshape(5, 2).astype(np.float64)
            eyes, mouth = p[np.argsort(p[:2, 0])], p[3 + np.argsort(p[3:, 0])]
            out.append((math.sqrt(float(row[2]) * float(row[3])), np.concatenate([eyes, p[2:3], mouth])))
        return out

    def _haar_faces(self, rgb: np.ndarray) -> list[tuple[float, np.ndarray]]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        boxes = self._face.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        return [(float(bw), self._haar_landmarks(gray, int(x), int(y), int(bw), int(bh))) for x, y, bw, bh in boxes]

    def _haar_landmarks(self, gray: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The box's estimate, its eyes replaced by the eye cascade's finds in the box's upper half: per half of
        the box, the find nearest the estimate, if within a tenth of the box's width of it."""
        points = _from_box(x, y, w, h)
        upper = gray[y:y + h // 2, x:x + w]
        lo, hi = max(1, w // 10), max(2, w // 3)
        finds = self._eye.detectMultiScale(upper, scaleFactor=1.1, minNeighbors=5, minSize=(lo, lo), maxSize=(hi, hi))
        centres = [np.array([x + ex + ew / 2, y + ey + eh / 2]) for ex, ey, ew, eh in finds]
        eyes: list[np.ndarray | None] = []
        for k in range(2):
            near = [c for c in centres if (c[0] < x + w / 2) == (k == 0)]
            best = min(near, key=lambda c: np.linalg.norm(c - points[k]), default=None)
            eyes.append(best if best is not None and np.linalg.norm(best - points[k]) <= 0.1 * w else None)
        if eyes[0] is not None and eyes[1] is not None:
            return _from_eyes(np.stack(eyes))
        for k, eye in enumerate(eyes):
            if eye is not None:
                points[k] = eye
        return points
