"""Face restoration (pipelines/faces): tiny random-weight GFPGANv1Clean networks written as `.pth` (`params_ema`)
and `.safetensors`, loaded through the real loading code with their sizes read from the keys; the Haar detector's
face and landmarks on a real photo (matplotlib's sample portrait of Grace Hopper); faces restored and pasted back
only where the face is, an image without a face returned as it was; a file that is not GFPGAN refused by name.

The YuNet path needs its ONNX file, which no installed package ships and nothing here may download: not tested."""

from __future__ import annotations

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.errors import InvalidParameter
from pipelines.faces.detect import FFHQ_TEMPLATE, FaceDetector
from pipelines.faces.gfpgan import FaceRestorer, GFPGANv1Clean, gfpgan_hyperparameters, load_face_restorer
from pipelines.faces.restore import restore_faces

TINY = [  # the released layout (different_w, sft_half, channel_multiplier 2) and the other branches, tiny
    dict(out_size=64, num_style_feat=16, channel_multiplier=2, num_mlp=2, different_w=True, narrow=1 / 32,
         sft_half=True),
    dict(out_size=64, num_style_feat=8, channel_multiplier=1, num_mlp=1, different_w=False, narrow=1 / 16,
         sft_half=False),
    dict(out_size=32, num_style_feat=8, channel_multiplier=2, num_mlp=0, different_w=True, narrow=1 / 32,
         sft_half=False),
]


def _tiny(seed: int = 0, **kwargs) -> GFPGANv1Clean:
    torch.manual_seed(seed)
    net = GFPGANv1Clean(**(TINY[0] | kwargs)).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or p.numel() == 1:  # biases and noise strengths: zero in a fresh network
                p.normal_(0, 0.05)
    return net


def _restorer(net: GFPGANv1Clean) -> FaceRestorer:
    return FaceRestorer(net.requires_grad_(False), "GFPGAN", net.out_size)


def _sd(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.mark.parametrize("params", TINY, ids=["released-layout", "full-sft-one-w", "size-32"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_tiny_gfpgan_loads_from_its_file_with_its_sizes(tmp_path, params, suffix):
    net = _tiny(**params)
    path = tmp_path / f"GFPGANv1.4{suffix}"
    if suffix == ".pth":
        torch.save({"params_ema": _sd(net)}, path)
    else:
        save_file(_sd(net), str(path))
    restorer = load_face_restorer(path)
    assert (restorer.arch, restorer.size) == ("GFPGAN", params["out_size"])
    assert gfpgan_hyperparameters(restorer.net.state_dict()) == pytest.approx(
        params | {"channel_multiplier": params["channel_multiplier"] if params["out_size"] >= 64 else 2})
    x = torch.rand(2, 3, params["out_size"], params["out_size"]) * 2 - 1
    with torch.inference_mode():
        expected = net(x, randomize_noise=False)
        assert torch.equal(restorer.net(x, randomize_noise=False), expected)
        assert expected.shape == x.shape
        # fresh noise: reproducible from a generator, different from the stored noise
        fresh = restorer.net(x, generator=torch.Generator().manual_seed(1))
        assert torch.equal(fresh, net(x, generator=torch.Generator().manual_seed(1)))
        assert not torch.equal(fresh, expected)


def test_a_file_that_is_not_gfpgan_is_refused_by_name(tmp_path):
    save_file({"conv_first.weight": torch.zeros(4, 3, 3, 3), "x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    sd = _sd(_tiny())
    del sd["condition_shift.1.2.bias"]
    torch.save({"params_ema": sd}, tmp_path / "truncated.pth")
    for name in ("other.safetensors", "truncated.pth"):
        with pytest.raises(InvalidParameter) as err:
            load_face_restorer(tmp_path / name)
        assert err.value.field == name


def test_the_haar_detector_finds_the_face_and_plausible_landmarks(portrait, detector):
    faces = detector.detect(np.asarray(portrait))
    assert detector.name == "haar" and len(faces) == 1
    (le, re, nose, lm, rm) = faces[0]
    assert faces[0].shape == (5, 2) and faces[0].dtype == np.float32
    # the face in this photo lies within x 150..380, y 100..335 (her eyes near y 190, her mouth near y 280)
    assert ((faces[0] > [150, 100]) & (faces[0] < [380, 335])).all()
    assert le[0] < re[0] and lm[0] < rm[0] and le[0] < nose[0] < re[0]
    assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])
    assert 40 < re[0] - le[0] < 130  # the eyes of a face some 220 pixels wide
    assert FaceDetector(min_size=240).detect(np.asarray(portrait)) == []  # the face's box is 222 pixels wide


def test_restore_faces_changes_only_the_face(portrait, detector):
    restorer = _restorer(_tiny())
    out = restore_faces(portrait, restorer, detector, generator=torch.Generator().manual_seed(0))
    assert out.mode == "RGB" and out.size == portrait.size
    before, after = np.asarray(portrait), np.asarray(out)
    changed = (before != after).any(axis=2)
    # the region the aligned crop came from: its square (with a pixel of the crop's around it, which the bilinear
    # warps reach) taken back to the image
    landmarks = detector.detect(before)[0]
    affine = cv2.estimateAffinePartial2D(landmarks, FFHQ_TEMPLATE * (restorer.size / 512), method=cv2.LMEDS)[0]
    corners = cv2.transform(np.array([[[0, 0], [1, 0], [0, 1], [1, 1]]], np.float32) * (restorer.size + 2) - 1,
                            cv2.invertAffineTransform(affine))[0]
    (x0, y0), (x1, y1) = corners.min(axis=0) - 1, corners.max(axis=0) + 1
    ys, xs = np.nonzero(changed)
    assert len(xs) > 5000  # the face was replaced ...
    assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1  # ... and nothing else
    assert changed[int(landmarks[2, 1]), int(landmarks[2, 0])]  # the nose
    assert not changed[:, :80].any() and not changed[:, 450:].any() and not changed[450:].any()


class _Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return x


def test_a_face_aligned_and_pasted_back_unrestored_lands_where_it_was(portrait, detector):
    """The alignment and its inverse meet: a network that changes nothing leaves the face as it was, but for
    resampling (a crop 8 pixels off would differ by some 30 levels on average here)."""
    before = np.asarray(portrait).astype(np.int16)
    after = np.asarray(restore_faces(portrait, FaceRestorer(_Identity(), "GFPGAN", 256), detector)).astype(np.int16)
    changed = (before != after).any(axis=2)
    assert changed.sum() > 5000 and np.abs(after - before)[changed].mean() < 6


def test_an_image_without_a_face_comes_back_unchanged(detector):
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8), "RGB")
    out = restore_faces(noise, _restorer(_tiny()), detector)
    assert out.size == noise.size and np.array_equal(np.asarray(out), np.asarray(noise))
