"""Checkpoint detection and offline loading: demo files, refusals, diffusers folders, external VAEs."""

import hashlib
import resource
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.builders.demo import (
    DEMO_MODELS,
    build_demo_pipeline,
    build_demo_vae,
    write_demo_models,
    write_demo_vae,
)
from pipelines.builders.ldm_layout import pipeline_to_ldm, save_single_file
from pipelines.errors import (
    CheckpointError,
    IncompleteCheckpoint,
    ModelNotFound,
    PickleCheckpointRefused,
    UnsupportedArchitecture,
)
from pipelines.loading import (
    CONFIG_ROOT,
    Arch,
    config_dir_for,
    detect_arch,
    is_diffusers_dir,
    is_refiner,
    load_pipeline,
    load_vae,
    read_header,
)


@pytest.fixture(scope="module")
def ckpt_demo_dir(tmp_path_factory) -> Path:
    """<data>/models/Stable-diffusion with both demo checkpoints (written once per module)."""
    d = tmp_path_factory.mktemp("models") / "Stable-diffusion"
    write_demo_models(d)
    return d


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_detect_arch():
    assert detect_arch(["model.diffusion_model.x", "cond_stage_model.transformer.text_model.y"]) is Arch.SD1
    assert detect_arch(["conditioner.embedders.0.transformer.a", "conditioner.embedders.1.model.b"]) is Arch.SDXL
    with pytest.raises(UnsupportedArchitecture):
        detect_arch(["cond_stage_model.model.token_embedding.weight"])  # SD 2.x
    # the SDXL refiner's own layout (OpenCLIP only, as embedders.0) is SDXL; is_refiner tells it apart
    assert detect_arch(["conditioner.embedders.0.model.text_projection"]) is Arch.SDXL
    assert is_refiner(["conditioner.embedders.0.model.text_projection", "model.diffusion_model.x"])
    assert not is_refiner(["conditioner.embedders.0.transformer.a", "conditioner.embedders.1.model.b"])
    with pytest.raises(UnsupportedArchitecture):
        detect_arch([])


def test_header_and_config_dir(ckpt_demo_dir, tmp_path):
    for stem, folder in DEMO_MODELS.items():
        path = ckpt_demo_dir / f"{stem}.safetensors"
        tensors, metadata = read_header(path)
        assert metadata == {"sdfunc_config": folder}
        assert all(dtype == "F16" for dtype, _ in tensors.values())
        arch, config = config_dir_for(path)
        assert config == CONFIG_ROOT / folder
        assert arch is (Arch.SDXL if "sdxl" in stem else Arch.SD1)
    # Without (or with unknown) metadata: the real folder of the detected architecture.
    bare = save_single_file(tmp_path / "bare.safetensors", {"cond_stage_model.transformer.x": torch.zeros(1)})
    assert config_dir_for(bare) == (Arch.SD1, CONFIG_ROOT / "sd15")
    odd = save_single_file(
        tmp_path / "odd.safetensors", {"conditioner.embedders.1.model.x": torch.zeros(1)}, {"sdfunc_config": "../x"}
    )
    assert config_dir_for(odd) == (Arch.SDXL, CONFIG_ROOT / "sdxl")
    # Metadata naming a folder of the other architecture is a broken file.
    wrong = save_single_file(
        tmp_path / "wrong.safetensors", {"conditioner.embedders.1.model.x": torch.zeros(1)}, {"sdfunc_config": "demo-sd15"}
    )
    with pytest.raises(CheckpointError):
        config_dir_for(wrong)


def test_refusals(tmp_path):
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04not really a pickle")
    for name in ("model.ckpt", "model.pt", "model.bin", "model.pth", "missing.ckpt"):
        with pytest.raises(PickleCheckpointRefused):
            load_pipeline(tmp_path / name)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError):
        load_pipeline(garbage)
    with pytest.raises(ModelNotFound):
        load_pipeline(tmp_path / "nope.safetensors")
    sd2 = save_single_file(tmp_path / "sd2.safetensors", {"cond_stage_model.model.token_embedding.weight": torch.zeros(2)})
    with pytest.raises(UnsupportedArchitecture, match="sd2.safetensors"):
        load_pipeline(sd2)


@pytest.mark.parametrize(
    ("kind", "missing"),
    [
        ("demo-sd15", "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
        ("demo-sdxl", "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.bias"),
        ("demo-sd15", "model.diffusion_model.out.2.bias"),
    ],
)
def test_missing_tensor_is_refused(kind, missing, tmp_path):
    tensors = pipeline_to_ldm(build_demo_pipeline(kind))
    del tensors[missing]
    path = save_single_file(tmp_path / "broken.safetensors", tensors, {"sdfunc_config": DEMO_MODELS[kind]})
    with pytest.raises(IncompleteCheckpoint, match="broken.safetensors"):
        load_pipeline(path)


def test_shape_mismatch_is_a_checkpoint_error(tmp_path):
    tensors = pipeline_to_ldm(build_demo_pipeline("demo-sd15"))
    tensors["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 1, 1)
    path = save_single_file(tmp_path / "bad-shape.safetensors", tensors, {"sdfunc_config": "demo-sd15"})
    with pytest.raises(CheckpointError, match="bad-shape.safetensors"):
        load_pipeline(path)


def test_write_demo_models_is_deterministic_and_atomic(ckpt_demo_dir, tmp_path):
    first = {p.name: _sha256(p) for p in ckpt_demo_dir.iterdir()}
    assert sorted(first) == ["demo-sd15.safetensors", "demo-sdxl.safetensors"]  # no temp leftovers
    again = write_demo_models(tmp_path, force=True)
    assert {p.name: _sha256(p) for p in again} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(first)
    # Existing files are kept (same inode, untouched) unless forced; forcing replaces by rename.
    before = {p.name: p.stat().st_ino for p in again}
    write_demo_models(tmp_path, kinds=("demo-sd15",))
    assert (tmp_path / "demo-sd15.safetensors").stat().st_ino == before["demo-sd15.safetensors"]
    write_demo_models(tmp_path, kinds=("demo-sd15",), force=True)
    assert (tmp_path / "demo-sd15.safetensors").stat().st_ino != before["demo-sd15.safetensors"]
    assert {p.name: _sha256(p) for p in tmp_path.iterdir()} == first
    # Sizes stay demo-sized.
    assert all(p.stat().st_size < 25_000_000 for p in again)


@pytest.mark.parametrize("kind", sorted(DEMO_MODELS))
def test_demo_file_loads_and_generates(kind, ckpt_demo_dir):
    pipe = load_pipeline(ckpt_demo_dir / f"{kind}.safetensors")
    built = build_demo_pipeline(kind)  # float16-representable weights: the float16 file is lossless
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(built, name, None) is not None:
            assert _same_weights(getattr(pipe, name), getattr(built, name)), name
    if kind == "demo-sd15":
        assert pipe.safety_checker is None and pipe.feature_extractor is None
    image = pipe(
        "a red house",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(42),
    ).images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()


@pytest.mark.parametrize("kind", sorted(DEMO_MODELS))
def test_diffusers_folder_loads(kind, tmp_path):
    built = build_demo_pipeline(kind)
    built.save_pretrained(tmp_path / kind)
    assert is_diffusers_dir(tmp_path / kind)
    assert not is_diffusers_dir(tmp_path)
    pipe = load_pipeline(tmp_path / kind)
    assert type(pipe) is type(built)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(built, name, None) is not None:
            assert _same_weights(getattr(pipe, name), getattr(built, name)), name
    with pytest.raises(CheckpointError):
        load_pipeline(tmp_path)  # a folder without model_index.json


def test_external_vae_round_trip(tmp_path):
    path = write_demo_vae(tmp_path)
    assert path.name == "demo-vae.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-vae.safetensors"]
    first = _sha256(path)
    assert _sha256(write_demo_vae(tmp_path, force=True)) == first
    expected = build_demo_vae()
    vae = load_vae(path, arch=Arch.SD1, device="cpu", dtype=torch.float32)
    assert _same_weights(vae, expected)
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    # Differs from the checkpoint's own VAE (another seed).
    assert not _same_weights(vae, build_demo_pipeline("demo-sd15").vae)
    # Same file for an SDXL pipeline: the SDXL family's scaling factor.
    vae_xl = load_vae(path, arch=Arch.SDXL, device="cpu", dtype=torch.float32)
    assert vae_xl.config.scaling_factor == pytest.approx(0.13025)
    assert _same_weights(vae_xl, expected)
    # The A1111 VAE spelling without the `first_stage_model.` prefix.
    from safetensors.torch import load_file

    bare = {k.removeprefix("first_stage_model."): v for k, v in load_file(path).items()}
    bare_path = save_single_file(tmp_path / "bare-vae.safetensors", bare, {"sdfunc_config": "demo-sd15"})
    assert _same_weights(load_vae(bare_path, arch=Arch.SD1, device="cpu", dtype=torch.float32), expected)
    with pytest.raises(CheckpointError):
        load_vae(save_single_file(tmp_path / "novae.safetensors", {"x": torch.zeros(1)}), arch=Arch.SD1,
                 device="cpu", dtype=torch.float32)
    with pytest.raises(PickleCheckpointRefused):
        load_vae(tmp_path / "vae.pt", arch=Arch.SD1, device="cpu", dtype=torch.float32)


@pytest.mark.slow
def test_real_sd15_architecture_loads_and_generates(tmp_path):
    """~2.1 GB fp16 random-weight SD 1.5 file; loaded in float32 on CPU (peak RSS ~6.7 GiB)."""
    from pipelines.builders.realarch import write_real_arch_checkpoint

    path = write_real_arch_checkpoint(tmp_path / "real-sd15.safetensors", Arch.SD1, dtype=torch.float16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real-sd15.safetensors"]
    tensors, metadata = read_header(path)
    assert len(tensors) == 1130 and metadata["sdfunc_config"] == "sd15"
    assert config_dir_for(path) == (Arch.SD1, CONFIG_ROOT / "sd15")
    pipe = load_pipeline(path, dtype=torch.float32)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters()), name
    image = pipe("a red house", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peak_gib < 8, f"peak RSS {peak_gib:.1f} GiB"
