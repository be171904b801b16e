"""The single-file export is the exact inverse of diffusers' single-file import.

Tiny demo pipelines round-trip through a file and `load_pipeline` with equal tensors; the real SD 1.5 / SDXL
architectures are checked on `meta` tensors (names and shapes, no weights) against diffusers' own converters.
"""

import pytest
import torch

from pipelines.builders.demo import DEMO_MODELS, build_demo_pipeline
from pipelines.builders.ldm_layout import (
    SD1_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    clip_text_to_ldm,
    component_to_ldm,
    openclip_text_to_ldm,
    pipeline_to_ldm,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)
from pipelines.builders.realarch import _build
from pipelines.loading import CONFIG_ROOT, load_pipeline, read_header

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _assert_same_weights(a, b) -> None:
    for name in COMPONENTS:
        ma, mb = getattr(a, name, None), getattr(b, name, None)
        assert (ma is None) == (mb is None), name
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys(), name
        unequal = [k for k in sa if not torch.equal(sa[k], sb[k].to(sa[k].device))]
        assert not unequal, f"{name}: {unequal[:5]}"


@pytest.mark.parametrize("kind", sorted(DEMO_MODELS))
def test_round_trip_through_single_file(kind, tmp_path):
    pipe = build_demo_pipeline(kind)
    tensors = pipeline_to_ldm(pipe)
    path = save_single_file(tmp_path / f"{kind}.safetensors", tensors, {"sdfunc_config": DEMO_MODELS[kind]})
    header, metadata = read_header(path)
    assert set(header) == set(tensors) and metadata == {"sdfunc_config": DEMO_MODELS[kind]}
    loaded = load_pipeline(path)
    assert type(loaded) is type(pipe)
    _assert_same_weights(pipe, loaded)


@pytest.mark.parametrize("kind", sorted(DEMO_MODELS))
def test_export_inverts_diffusers_converters(kind):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    pipe = build_demo_pipeline(kind)
    ckpt = pipeline_to_ldm(pipe)
    for name, back in [
        ("unet", convert_ldm_unet_checkpoint(ckpt, pipe.unet.config)),
        ("vae", convert_ldm_vae_checkpoint(ckpt, pipe.vae.config)),
    ]:
        sd = getattr(pipe, name).state_dict()
        assert back.keys() == sd.keys(), name
        assert all(torch.equal(back[k], sd[k]) for k in sd), name
    clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
    sd = pipe.text_encoder.state_dict()
    assert clip.keys() == sd.keys() and all(torch.equal(clip[k], sd[k]) for k in sd)
    if kind == "demo-sdxl":
        back = convert_open_clip_checkpoint(pipe.text_encoder_2, ckpt, prefix=SDXL_OPENCLIP_PREFIX)
        sd = pipe.text_encoder_2.state_dict()
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def _meta_components(folder: str, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        return {n: _build(CONFIG_ROOT / folder, n) for n in names}


@pytest.mark.parametrize(
    ("folder", "names", "model_type", "expected_keys"),
    [
        (
            "sd15",
            ("unet", "vae", "text_encoder"),
            "v1",
            {
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
                "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
                "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
                "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
                "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
            },
        ),
        (
            "sdxl",
            ("unet", "vae", "text_encoder", "text_encoder_2"),
            "xl_base",
            {
                "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
                "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                "conditioner.embedders.1.model.text_projection": (1280, 1280),
                "conditioner.embedders.1.model.positional_embedding": (77, 1280),
            },
        ),
    ],
)
def test_real_architecture_layout_on_meta(folder, names, model_type, expected_keys):
    """Real SD 1.5 / SDXL names and shapes, checked without materialising any weight."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    models = _meta_components(folder, names)
    sdxl = "text_encoder_2" in names
    ckpt: dict[str, torch.Tensor] = {}
    for name, module in models.items():
        ckpt.update(component_to_ldm(name, module, sdxl=sdxl))
    for key, shape in expected_keys.items():
        assert tuple(ckpt[key].shape) == shape, key
    assert infer_diffusers_model_type(ckpt) == model_type
    for name, convert in [("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)]:
        module = models[name]
        back = convert(ckpt, module.config)
        sd = module.state_dict()
        assert back.keys() == sd.keys(), name
        assert all(back[k].shape == sd[k].shape for k in sd), name
    counts = {
        "sd15": {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196},
        "sdxl": {"model.diffusion_model.": 1680, "first_stage_model.": 248, "conditioner.embedders.0.": 196,
                 "conditioner.embedders.1.": 389},
    }[folder]
    for prefix, n in counts.items():
        assert sum(k.startswith(prefix) for k in ckpt) == n, prefix
    assert len(ckpt) == sum(counts.values())


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="no LDM name"):
        unet_to_ldm({"down_blocks.0.motion_modules.0.x.weight": torch.zeros(1)}, {"layers_per_block": 2})
    with pytest.raises(ValueError, match="no LDM name"):
        vae_to_ldm({"encoder.something.weight": torch.zeros(1)})
    with pytest.raises(ValueError):
        openclip_text_to_ldm({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError):
        clip_text_to_ldm({"text_projection.weight": torch.zeros(2, 2)}, SD1_CLIP_PREFIX)


def test_clip_export_accepts_both_state_dict_spellings():
    t = torch.zeros(3)
    a = clip_text_to_ldm({"final_layer_norm.weight": t, "embeddings.position_ids": t}, SD1_CLIP_PREFIX)
    b = clip_text_to_ldm({"text_model.final_layer_norm.weight": t}, SD1_CLIP_PREFIX)
    assert a.keys() == b.keys() == {"cond_stage_model.transformer.text_model.final_layer_norm.weight"}
