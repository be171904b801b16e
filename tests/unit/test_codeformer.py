"""CodeFormer (pipelines/faces/codeformer.py): tiny random-weight networks written as `.pth` (`params_ema`) and
`.safetensors`, loaded through `load_face_restorer` with every size read back from the keys; the released
configuration's parameter names, shapes and count; the fidelity weight `w` reaching the network; faces restored
only where the face is; a truncated file refused by name.

The released weights (S-Lab License 1.0, non-commercial) are never needed: the layout is checked on a network built
with the released sizes, without running it."""

from __future__ import annotations

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.errors import InvalidParameter
from pipelines.faces.codeformer import CodeFormer, codeformer_hyperparameters, is_codeformer
from pipelines.faces.detect import FFHQ_TEMPLATE, FaceDetector
from pipelines.faces.gfpgan import FaceRestorer, load_face_restorer
from pipelines.faces.restore import restore_faces

TINY = [  # the released layout in small (fusion at levels without attention) and the other branches
    dict(img_size=64, nf=8, ch_mult=(1, 2, 2), res_blocks=2, attn_resolutions=(16,), emb_dim=8, codebook_size=16,
         dim_embd=16, n_head=8, n_layers=1, dim_mlp=32, connect_list=(32, 64)),
    dict(img_size=32, nf=8, ch_mult=(1, 2, 4), res_blocks=1, attn_resolutions=(8, 16), emb_dim=4, codebook_size=8,
         dim_embd=12, n_head=4, n_layers=2, dim_mlp=20, connect_list=(8, 32)),
]


def _tiny(seed: int = 0, **kwargs) -> CodeFormer:
    torch.manual_seed(seed)
    net = CodeFormer(**(TINY[0] | kwargs)).eval()
    with torch.no_grad():
        for p in net.parameters():  # norms at 1 / 0 and a zero position embedding would hide wrong wiring
            p.add_(torch.randn_like(p) * 0.1)
    return net.requires_grad_(False)


def _sd(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    image = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return image.resize((240, 282), Image.BICUBIC)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def test_the_released_configuration_has_the_released_layout():
    """The defaults are codeformer-v0.1.0.pth's: 94,112,707 parameters (376 MB as float32), and read back."""
    with torch.device("meta"):
        net = CodeFormer()
    sd = net.state_dict()
    assert sum(v.numel() for v in sd.values()) == 94_112_707 and len(sd) == 515
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["position_emb"] == (256, 512) and shapes["quantize.embedding.weight"] == (1024, 256)
    assert shapes["encoder.blocks.0.weight"] == (64, 3, 3, 3) and shapes["encoder.blocks.24.weight"] == (256, 512, 3, 3)
    assert shapes["encoder.blocks.19.q.weight"] == (512, 512, 1, 1) and "encoder.blocks.21.proj_out.bias" in sd
    assert shapes["generator.blocks.0.weight"] == (512, 256, 3, 3)
    assert shapes["generator.blocks.24.weight"] == (3, 64, 3, 3)
    assert shapes["generator.blocks.8.conv.weight"] == (512, 512, 3, 3)  # the first Upsample, after 16 x 16
    assert shapes["ft_layers.8.self_attn.in_proj_weight"] == (1536, 512)
    assert shapes["ft_layers.8.linear1.weight"] == (1024, 512) and "ft_layers.9.linear1.weight" not in sd
    assert shapes["idx_pred_layer.1.weight"] == (1024, 512) and "idx_pred_layer.1.bias" not in sd
    assert shapes["fuse_convs_dict.256.encode_enc.conv_out.weight"] == (128, 256, 1, 1)
    assert shapes["fuse_convs_dict.32.scale.2.weight"] == (256, 256, 3, 3)
    assert sorted(k.split(".")[1] for k in sd if k.endswith("scale.0.weight")) == ["128", "256", "32", "64"]
    assert is_codeformer(sd)
    assert codeformer_hyperparameters(sd) == dict(
        img_size=512, nf=64, ch_mult=(1, 2, 2, 4, 4, 8), res_blocks=2, attn_resolutions=(16,), emb_dim=256,
        codebook_size=1024, dim_embd=512, n_head=8, n_layers=9, dim_mlp=1024, connect_list=(32, 64, 128, 256))
    # CodeFormer's fixed fusion points: encoder blocks 5, 8, 11, 14 and generator blocks 18, 15, 12, 9
    assert net._enc_taps == {14: 32, 11: 64, 8: 128, 5: 256} and net._gen_taps == {9: 32, 12: 64, 15: 128, 18: 256}
    with torch.device("meta"):
        ends = CodeFormer(connect_list=(16, 512))  # at 16 x 16, before the level's last attention
    assert ends._enc_taps == {18: 16, 2: 512} and ends._gen_taps == {6: 16, 21: 512}


@pytest.mark.parametrize("params", TINY, ids=["released-layout", "attention-fusion"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_tiny_codeformer_loads_from_its_file_with_its_sizes(tmp_path, params, suffix):
    net = _tiny(**params)
    path = tmp_path / f"codeformer-v0.1.0{suffix}"
    if suffix == ".pth":
        torch.save({"params_ema": _sd(net)}, path)
    else:
        save_file(_sd(net), str(path))
    restorer = load_face_restorer(path)
    assert (restorer.arch, restorer.size) == ("CodeFormer", params["img_size"])
    assert codeformer_hyperparameters(restorer.net.state_dict()) == params
    assert restorer.net.latent_size == (params["img_size"] >> len(params["ch_mult"]) - 1) ** 2
    x = torch.rand(2, 3, params["img_size"], params["img_size"]) * 2 - 1
    with torch.inference_mode():
        outs = {w: restorer.net(x, w=w) for w in (0.0, 0.5, 1.0)}
        for w in (0.0, 1.0):
            assert torch.equal(outs[w], net(x, w=w))
        assert outs[0.0].shape == x.shape
        assert not torch.allclose(outs[0.0], outs[0.5]) and not torch.allclose(outs[0.5], outs[1.0])
        assert not torch.allclose(restorer.net(x, w=0.5, adain=False), outs[0.5])
        # each image on its own (up to the batched kernels' rounding)
        torch.testing.assert_close(restorer.net(x[1:], w=0.5), outs[0.5][1:], atol=1e-4, rtol=1e-4)


def test_restore_faces_with_codeformer_changes_only_the_face_and_follows_the_weight(portrait, detector):
    restorer = FaceRestorer(_tiny(), "CodeFormer", 64)
    before = np.asarray(portrait)
    landmarks = detector.detect(before)
    assert len(landmarks) == 1
    out = restore_faces(portrait, restorer, detector, weight=0.5)
    assert out.mode == "RGB" and out.size == portrait.size
    after = np.asarray(out)
    changed = (before != after).any(axis=2)
    # the region the aligned crop came from: its square (with a pixel of the crop's around it) taken back
    affine = cv2.estimateAffinePartial2D(landmarks[0], FFHQ_TEMPLATE * (restorer.size / 512), method=cv2.LMEDS)[0]
    corners = cv2.transform(np.array([[[0, 0], [1, 0], [0, 1], [1, 1]]], np.float32) * (restorer.size + 2) - 1,
                            cv2.invertAffineTransform(affine))[0]
    (x0, y0), (x1, y1) = corners.min(axis=0) - 1, corners.max(axis=0) + 1
    ys, xs = np.nonzero(changed)
    assert len(xs) > 1500  # the face was replaced ...
    assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1  # ... and nothing else
    assert changed[int(landmarks[0][2, 1]), int(landmarks[0][2, 0])]  # the nose
    assert np.array_equal(np.asarray(restore_faces(portrait, restorer, detector, weight=0.5)), after)
    other = np.asarray(restore_faces(portrait, restorer, detector, weight=1.0))
    ys, xs = np.nonzero((other != after).any(axis=2))
    assert len(xs) > 500 and xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1


@pytest.mark.parametrize("missing", ["ft_layers.0.norm2.bias", "fuse_convs_dict.64.shift.2.weight",
                                     "encoder.blocks.0.weight", "position_emb"])
def test_a_codeformer_file_with_a_missing_key_is_refused_by_name(tmp_path, missing):
    sd = _sd(_tiny())
    del sd[missing]
    torch.save({"params_ema": sd}, tmp_path / "codeformer-v0.1.0.pth")
    with pytest.raises(InvalidParameter) as err:
        load_face_restorer(tmp_path / "codeformer-v0.1.0.pth")
    assert err.value.field == "codeformer-v0.1.0.pth" and "codeformer-v0.1.0.pth" in str(err.value)
