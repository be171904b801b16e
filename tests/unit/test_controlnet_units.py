"""ControlNet building blocks: sd-webui-controlnet's unit fields, its weight-free preprocessors, the models folder,
offline loading of A1111-layout files, and the diffusers pipelines driven by the demo ControlNets."""

import base64
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from pipelines.controlnet.detectmap import (
    detect,
    detect_map,
    effective_resolution,
    fit_map,
    pixel_perfect_resolution,
    preprocess,
)
from pipelines.controlnet.loading import (
    REAL_CONFIG,
    ControlNetSpec,
    _config_arch,
    arch_of,
    check_compatible,
    inspect_controlnet,
    load_controlnet,
)
from pipelines.controlnet.preprocessors import PREPROCESSORS, module_list
from pipelines.controlnet.stack import (
    SOFT_LAYER_FACTORS,
    call_kwargs,
    controlnet_stack,
    is_stack,
    layer_factors,
    pipeline_class,
)
from pipelines.controlnet.store import ControlNetStore
from pipelines.controlnet.units import (
    ControlMode,
    HiResFixOption,
    ResizeMode,
    controlnet_script_args,
    infotext_params,
    parse_units,
)
from pipelines.errors import (
    CheckpointError,
    InvalidParameter,
    ModelNotFound,
    PickleCheckpointRefused,
    UnsupportedArchitecture,
)
from pipelines.loading import CONFIG_ROOT, Arch, read_header

PREFIX = "alwayson_scripts.controlnet"
IMG = "aGVsbG8="  # any non-empty string: parsing never decodes images


def unit(**fields):
    return {"image": IMG, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]", **fields}


def parse(*units, img2img=False):
    return parse_units({"args": list(units)}, img2img=img2img)


def refused(*units, img2img=False) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as e:
        parse(*units, img2img=img2img)
    return e.value


def shapes_image(size=(96, 64)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((8, 8, size[0] - 20, size[1] - 8), fill=(20, 40, 200))
    draw.rectangle((size[0] // 2, 4, size[0] // 2 + 10, size[1] - 4), fill=(250, 200, 10))
    return img


# --- units ----------------------------------------------------------------------------------------------------

def test_defaults_are_the_extensions():
    (u,) = parse({"image": IMG, "model": "m"})
    assert (u.module, u.weight, u.resize_mode, u.control_mode, u.hr_option) == (
        "none", 1.0, ResizeMode.CROP_AND_RESIZE, ControlMode.BALANCED, HiResFixOption.BOTH)
    assert (u.guidance_start, u.guidance_end, u.pixel_perfect, u.processor_res) == (0.0, 1.0, False, 512)
    assert u.field("weight") == f"{PREFIX}.args.0.weight" and u.image == IMG and not u.use_init_image


@pytest.mark.parametrize("value, expected", [
    ("Just Resize", ResizeMode.JUST_RESIZE), (0, ResizeMode.JUST_RESIZE), ("1", ResizeMode.CROP_AND_RESIZE),
    ("Crop and Resize", ResizeMode.CROP_AND_RESIZE), (2, ResizeMode.RESIZE_AND_FILL),
    ("Inner Fit (Scale to Fit)", ResizeMode.CROP_AND_RESIZE), ("Envelope (Outer Fit)", ResizeMode.RESIZE_AND_FILL),
    (3, ResizeMode.JUST_RESIZE), ("resize and fill", ResizeMode.RESIZE_AND_FILL),
])
def test_resize_mode_by_name_alias_or_number(value, expected):
    assert parse(unit(resize_mode=value))[0].resize_mode is expected


@pytest.mark.parametrize("value, expected", [
    ("Balanced", ControlMode.BALANCED), (1, ControlMode.PROMPT), ("My prompt is more important", ControlMode.PROMPT),
    (2, ControlMode.CONTROL), ("ControlNet is more important", ControlMode.CONTROL),
])
def test_control_mode_by_name_or_number(value, expected):
    assert parse(unit(control_mode=value))[0].control_mode is expected


@pytest.mark.parametrize("fields, name", [
    ({"weight": 2.5}, "weight"), ({"weight": "heavy"}, "weight"), ({"weight": float("nan")}, "weight"),
    ({"guidance_end": 1.5}, "guidance_end"), ({"guidance_start": -0.1}, "guidance_start"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start"), ({"processor_res": "big"}, "processor_res"),
    ({"control_mode": 7}, "control_mode"), ({"resize_mode": "Stretch"}, "resize_mode"),
    ({"resize_mode": -1}, "resize_mode"), ({"enabled": "maybe"}, "enabled"), ({"pixel_perfect": 3}, "pixel_perfect"),
    ({"model": "None"}, "model"), ({"model": 5}, "model"), ({"module": "no_such_thing"}, "module"),
    ({"image_link": "ftp://host/x.png", "image": None}, "image_link"), ({"image": 12}, "image"),
    ({"threshold_a": [1]}, "threshold_a"), ({"hr_option": "Sometimes"}, "hr_option"),
])
def test_each_bad_field_is_named_with_its_unit_index(fields, name):
    err = refused(unit(enabled=False), unit(**fields))
    assert err.field == f"{PREFIX}.args.1.{name}"
    assert err.message.startswith(err.field)


def test_disabled_units_and_non_objects_are_skipped_and_indexes_kept():
    units = parse(unit(enabled=False), None, "junk", unit(weight=0.5), unit(enabled="false"), unit(weight=1.5))
    assert [(u.index, u.weight) for u in units] == [(3, 0.5), (5, 1.5)]
    assert parse_units(None) == [] and parse_units({"args": []}) == [] and parse_units({}) == []


def test_at_most_four_enabled_units():
    assert len(parse(*[unit() for _ in range(4)], unit(enabled=False))) == 4
    assert refused(*[unit() for _ in range(5)]).field == f"{PREFIX}.args"


def test_thresholds_and_resolution_outside_the_slider_take_the_default_as_the_extension_does():
    (u,) = parse(unit(threshold_a=-1, threshold_b=300, processor_res=-1))
    assert (u.threshold_a, u.threshold_b, u.processor_res) == (100, 200, 512)
    (u,) = parse(unit(threshold_a=64, threshold_b=64, processor_res=4096))
    assert (u.threshold_a, u.threshold_b, u.processor_res) == (64, 64, 512)
    (u,) = parse(unit(module="none", threshold_a=64, processor_res=768.0))  # webuiapi sends 64 for every module
    assert (u.threshold_a, u.processor_res) == (0.5, 768)


def test_webuiapi_unit_payload_is_accepted():
    webuiapi = pytest.importorskip("webuiapi")
    payload = webuiapi.ControlNetUnit(image=shapes_image(), module="canny", model="control_v11p_sd15_canny",
                                      control_mode=2, pixel_perfect=True).to_dict()
    (u,) = parse(payload)
    assert (u.module, u.resize_mode, u.control_mode, u.threshold_a, u.pixel_perfect, u.mask) == (
        "canny", ResizeMode.RESIZE_AND_FILL, ControlMode.CONTROL, 64, True, None)
    assert base64.b64decode(u.image)[:4] == b"\x89PNG"


def test_module_names_labels_case_and_the_refused_ones():
    assert parse(unit(module="invert (from white bg & black line)"))[0].module == "invert"
    assert parse(unit(module="Canny"))[0].module == "canny"
    assert parse(unit(module=None))[0].module == "none"
    err = refused(unit(module="depth_midas"))
    assert "not offered" in err.message and "weights" in err.message and "canny" in err.message
    assert "reference_only" in refused(unit(module="reference_only")).message
    err = refused(unit(module="frobnicate"))
    assert err.field == f"{PREFIX}.args.0.module" and ", ".join(PREPROCESSORS) in err.message


def test_image_sources():
    err = refused({"module": "canny", "model": "m"})
    assert err.field == f"{PREFIX}.args.0.image"
    (u,) = parse({"module": "canny", "model": "m", "image": ""}, img2img=True)  # webuiapi sends "" for no image
    assert u.use_init_image and u.image is None and u.image_field == "init_images"
    (u,) = parse({"model": "m", "image_link": "https://example.com/a.png"})
    assert u.image_link == "https://example.com/a.png" and u.image_field == f"{PREFIX}.args.0.image_link"
    (u,) = parse({"model": "m", "input_image": IMG})  # legacy alias
    assert u.image == IMG and u.image_field == f"{PREFIX}.args.0.input_image"
    (u,) = parse({"model": "m", "image": {"image": IMG, "mask": "bWFzaw=="}})
    assert (u.image, u.mask, u.mask_field) == (IMG, "bWFzaw==", f"{PREFIX}.args.0.image.mask")
    (u,) = parse({"model": "m", "image": [IMG, "bWFzaw=="]})
    assert u.mask == "bWFzaw==" and u.image_field == f"{PREFIX}.args.0.image.0"
    (u,) = parse({"model": "m", "image": IMG, "mask_image": "bWFzaw=="})
    assert u.mask_field == f"{PREFIX}.args.0.mask_image"
    (u,) = parse({"model": "m", "image": IMG, "image_link": "https://example.com/a.png"})
    assert u.image == IMG and u.image_link is None
    assert refused({"model": "m", "image": IMG, "input_image": IMG}).field == f"{PREFIX}.args.0.input_image"
    assert refused({"model": "m", "image": [{"image": IMG}, {"image": IMG}]}).field == f"{PREFIX}.args.0.image"


def test_legacy_guidance_and_lowvram_aliases():
    (u,) = parse(unit(guidance=0.5, lowvram=True))
    assert (u.guidance_end, u.low_vram) == (0.5, True)
    assert refused(unit(guidance=3)).field == f"{PREFIX}.args.0.guidance"


def test_script_key_matches_ignoring_case():
    assert controlnet_script_args({"ControlNet": {"args": []}}) == ("alwayson_scripts.ControlNet", {"args": []})
    assert controlnet_script_args({"sd_model_checkpoint": "x"}) is None
    prefix, value = controlnet_script_args({"ControlNet": {"args": [unit(weight=9)]}})
    with pytest.raises(InvalidParameter) as e:
        parse_units(value, prefix)
    assert e.value.field == "alwayson_scripts.ControlNet.args.0.weight"


def test_infotext_is_the_extensions():
    (u,) = parse(unit(module="canny", weight=1, threshold_a=-1))
    assert infotext_params([u]) == {"ControlNet 0": (
        "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize, "
        "Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, "
        "Pixel Perfect: False, Control Mode: Balanced")}


def test_module_list_has_the_extensions_shape_and_order():
    body = module_list()
    assert body["module_list"][0] == "none" and set(body["module_list"]) == set(PREPROCESSORS)
    assert body["module_list"].index("canny") < body["module_list"].index("invert") < body["module_list"].index("threshold")
    assert body["module_detail"]["canny"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]
    assert body["module_detail"]["invert"]["sliders"] == []
    assert "invert (from white bg & black line)" in module_list(alias_names=True)["module_list"]


# --- preprocessing --------------------------------------------------------------------------------------------

def test_canny_is_cv2_canny_on_the_same_input():
    img = shapes_image((64, 64))
    (u,) = parse(unit(processor_res=64, threshold_a=50, threshold_b=150))
    out = np.asarray(preprocess(u, img, 64, 64))
    expected = cv2.cvtColor(cv2.Canny(np.asarray(img), 50, 150), cv2.COLOR_GRAY2RGB)
    assert out.shape == (64, 64, 3) and out.any() and np.array_equal(out, expected)


def test_canny_at_another_resolution_stays_a_thin_binary_map_at_the_generation_size():
    (u,) = parse(unit(processor_res=256))
    out = np.asarray(preprocess(u, shapes_image((96, 64)), 72, 48))
    assert out.shape == (48, 72, 3) and set(np.unique(out)) <= {0, 255} and out.any()


def test_pixel_perfect_resolution():
    assert pixel_perfect_resolution((200, 300), 512, 512, ResizeMode.CROP_AND_RESIZE) == 512
    assert pixel_perfect_resolution((200, 300), 512, 512, ResizeMode.RESIZE_AND_FILL) == 341
    assert pixel_perfect_resolution((200, 300), 515, 515, ResizeMode.JUST_RESIZE) == 512  # aligned to 8
    (u,) = parse(unit(pixel_perfect=True, processor_res=64))
    assert effective_resolution(u, (64, 96), 192, 128) == 128
    direct = np.asarray(preprocess(replace_unit(u, pixel_perfect=False, processor_res=128), shapes_image(), 192, 128))
    assert np.array_equal(np.asarray(preprocess(u, shapes_image(), 192, 128)), direct)


def replace_unit(u, **changes):
    from dataclasses import replace

    return replace(u, **changes)


@pytest.mark.parametrize("mode", list(ResizeMode))
def test_resize_modes_give_the_generation_size(mode):
    img = Image.new("RGB", (40, 80), (255, 255, 255))
    ImageDraw.Draw(img).rectangle((10, 30, 30, 50), fill=(0, 0, 0))
    (u,) = parse(unit(module="none", resize_mode=mode.value))
    out = np.asarray(preprocess(u, img, 64, 64))
    assert out.shape == (64, 64, 3)
    if mode is ResizeMode.RESIZE_AND_FILL:  # fitted (32 wide) and padded with the border colour
        assert (out[:, :16] == 255).all() and (out[:, 48:] == 255).all() and (out[28:36, 28:36] == 0).all()
    if mode is ResizeMode.CROP_AND_RESIZE:  # covered (64 wide, 128 high) and cropped in the middle
        assert (out[24:40, 24:40] == 0).all() and (out[:, :4] == 255).all()


def test_invert_threshold_and_a_mask_used_as_scribble():
    img = shapes_image((64, 64))
    (u,) = parse(unit(module="invert"))
    assert np.array_equal(np.asarray(preprocess(u, img, 64, 64)), 255 - np.asarray(img))
    (u,) = parse(unit(module="threshold", threshold_a=100, processor_res=64))
    out = np.asarray(preprocess(u, img, 64, 64))
    assert np.array_equal(out[:, :, 0] == 255, np.asarray(img).min(axis=2) > 100)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).line((0, 32, 63, 32), fill=255, width=3)
    (u,) = parse(unit(module="none"))
    assert np.array_equal(np.asarray(preprocess(u, img, 64, 64, mask=mask))[:, :, 1], np.asarray(mask))
    full = Image.new("L", (64, 64), 255)  # an all-white mask: the image is the input
    assert np.array_equal(np.asarray(preprocess(u, img, 64, 64, mask=full)), np.asarray(img))
    with pytest.raises(InvalidParameter):
        preprocess(u, img, 64, 64, mask=Image.new("L", (32, 32)))


@pytest.mark.parametrize("module", ["blur_gaussian", "scribble_xdog", "tile_resample", "lineart_standard"])
def test_other_preprocessors_give_an_rgb_map(module):
    (u,) = parse(unit(module=module, processor_res=128, threshold_a=2.0 if module == "tile_resample" else -1))
    out = preprocess(u, shapes_image(), 96, 64)
    assert out.mode == "RGB" and out.size == (96, 64)
    assert detect_map(module, shapes_image(), processor_res=128).mode == "RGB"


def test_a_transparent_input_is_composited_over_white():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    (u,) = parse(unit(module="none"))
    assert (np.asarray(preprocess(u, rgba, 64, 64)) == 255).all()


# --- LDM layout, configs, loading -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    from pipelines.builders.demo import write_demo_controlnets

    folder = tmp_path_factory.mktemp("ControlNet")
    return dict(zip(("demo-sd15", "demo-sdxl"), write_demo_controlnets(folder)))


@pytest.mark.parametrize("kind", ["demo-sd15", "demo-sdxl"])
def test_demo_controlnet_round_trips_exactly(demo_files, kind):
    from pipelines.builders.demo import build_demo_controlnet

    tensors, metadata = read_header(demo_files[kind])
    assert metadata == {"sdfunc_config": f"controlnet-{kind}"}
    if kind == "demo-sd15":  # what A1111 users have: the original layout
        assert {"control_model.input_hint_block.0.weight", "control_model.input_hint_block.14.weight",
                "control_model.zero_convs.0.0.weight", "control_model.middle_block_out.0.weight",
                "control_model.input_blocks.1.1.proj_in.weight", "control_model.time_embed.0.weight"} <= set(tensors)
    else:
        assert "controlnet_cond_embedding.conv_in.weight" in tensors and "add_embedding.linear_1.weight" in tensors
    spec = inspect_controlnet(demo_files[kind])
    assert spec.arch is (Arch.SDXL if kind == "demo-sdxl" else Arch.SD1) and spec.config_dir.name == f"controlnet-{kind}"
    built, loaded = build_demo_controlnet(kind).state_dict(), load_controlnet(demo_files[kind]).state_dict()
    assert built.keys() == loaded.keys()
    assert [k for k in built if not torch.equal(built[k], loaded[k])] == []
    zero_convs = [v for k, v in built.items() if k.startswith("controlnet_down_blocks.") and k.endswith("weight")]
    assert all(v.abs().sum() > 0 for v in zero_convs)  # a ControlNet that changes something


@pytest.mark.parametrize("arch, unet_folder", [(Arch.SD1, "sd15"), (Arch.SDXL, "sdxl")])
def test_real_configs_match_the_real_unets_and_the_ldm_export_inverts_diffusers(arch, unet_folder):
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from pipelines.builders.ldm_layout import controlnet_to_ldm

    config = ControlNetModel.load_config(str(CONFIG_ROOT / REAL_CONFIG[arch]))
    with init_empty_weights():
        model = ControlNetModel.from_config(config)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIG_ROOT / unet_folder / "unet")))
        from_unet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    assert _config_arch(CONFIG_ROOT / REAL_CONFIG[arch]) is arch
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in from_unet.state_dict().items()}
    if arch is Arch.SD1:
        ldm = controlnet_to_ldm(sd, model.config)
        assert tuple(ldm["control_model.input_hint_block.0.weight"].shape) == (16, 3, 3, 3)
        assert tuple(ldm["control_model.zero_convs.11.0.weight"].shape) == (1280, 1280, 1, 1)
        assert tuple(ldm["control_model.middle_block_out.0.weight"].shape) == (1280, 1280, 1, 1)
        assert tuple(ldm["control_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (640, 768)
        back = convert_controlnet_checkpoint(ldm, model.config)
        assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def _header_file(path: Path, shapes: dict[str, tuple[int, ...]], metadata=None) -> Path:
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


def test_architecture_is_read_from_the_keys(tmp_path):
    ldm = "control_model."
    sd15 = _header_file(tmp_path / "sd15.safetensors", {
        f"{ldm}input_hint_block.0.weight": (16, 3, 3, 3),
        f"{ldm}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)})
    assert inspect_controlnet(sd15) == ControlNetSpec(Arch.SD1, "ldm", CONFIG_ROOT / "controlnet-sd15", False)
    shuffle = _header_file(tmp_path / "control_v11e_sd15_shuffle.safetensors", {
        f"{ldm}input_hint_block.0.weight": (16, 3, 3, 3),
        f"{ldm}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)})
    assert inspect_controlnet(shuffle).global_pool
    xl = _header_file(tmp_path / "diffusers_xl_canny_full.safetensors", {
        "controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3), "add_embedding.linear_1.weight": (2, 2),
        "down_blocks.2.attentions.1.transformer_blocks.9.norm3.weight": (2,)})
    assert inspect_controlnet(xl) == ControlNetSpec(Arch.SDXL, "diffusers", CONFIG_ROOT / "controlnet-sdxl", False)
    refusals = {
        "sd21": {f"{ldm}input_hint_block.0.weight": (16, 3, 3, 3),
                 f"{ldm}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
        "xl_mid": {"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3), "add_embedding.linear_1.weight": (2, 2)},
        "xl_ldm": {f"{ldm}input_hint_block.0.weight": (16, 3, 3, 3), f"{ldm}label_emb.0.0.weight": (2, 2)},
        "control_lora": {"lora_controlnet": (1,), "input_hint_block.0.weight": (16, 3, 3, 3)},
        "t2i_adapter": {"adapter.body.0.resnets.0.block1.weight": (2, 2)},
        "not_a_controlnet": {"model.diffusion_model.conv_in.weight": (2, 2)},
    }
    for stem, keys in refusals.items():
        with pytest.raises(UnsupportedArchitecture):
            inspect_controlnet(_header_file(tmp_path / f"{stem}.safetensors", keys), field="f")
    with pytest.raises(PickleCheckpointRefused):
        inspect_controlnet(tmp_path / "x.pth")
    with pytest.raises(ModelNotFound):
        inspect_controlnet(tmp_path / "missing.safetensors")


def test_a_missing_tensor_or_wrong_shape_is_a_clear_error(tmp_path, demo_files):
    from safetensors.torch import load_file

    full = load_file(str(demo_files["demo-sd15"]))
    meta = {"sdfunc_config": "controlnet-demo-sd15"}
    missing = dict(full)
    del missing["control_model.zero_convs.3.0.weight"]
    with pytest.raises(CheckpointError) as e:
        load_controlnet(_st(tmp_path / "missing.safetensors", missing, meta), field="f")
    assert e.value.field == "f"
    with pytest.raises(CheckpointError):  # the real SD 1.5 config does not fit the tiny weights
        load_controlnet(_st(tmp_path / "nometa.safetensors", full, {}).with_name("nometa.safetensors"))


def _st(path: Path, tensors, metadata) -> Path:
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def test_check_compatible_names_the_model_field(demo_files):
    spec = inspect_controlnet(demo_files["demo-sdxl"])
    check_compatible(spec, "sdxl", "x")
    with pytest.raises(InvalidParameter) as e:
        check_compatible(spec, Arch.SD1, f"{PREFIX}.args.0.model", "demo-controlnet-sdxl [1234abcd]")
    assert e.value.field == f"{PREFIX}.args.0.model" and "SDXL" in e.value.message


# --- the models folder ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store_root(demo_files, tmp_path_factory):
    from pipelines.builders.demo import build_demo_controlnet

    root = tmp_path_factory.mktemp("models") / "ControlNet"
    (root / "sd15").mkdir(parents=True)
    os.link(demo_files["demo-sd15"], root / "sd15" / "control_demo_sd15_canny.safetensors")
    os.link(demo_files["demo-sdxl"], root / "demo-controlnet-sdxl.safetensors")
    build_demo_controlnet("demo-sd15", seed=3).save_pretrained(str(root / "control_folder_sd15"))
    (root / "control_v11p_sd15_openpose.pth").write_bytes(b"pickle")
    (root / ".control_hidden.safetensors").write_bytes(b"x")
    (root / "None.safetensors").write_bytes(b"x")
    outside = tmp_path_factory.mktemp("outside") / "evil.safetensors"
    outside.write_bytes(b"x")
    (root / "evil.safetensors").symlink_to(outside)
    return root


def test_store_lists_titles_as_the_extension_does(store_root):
    from pipelines.hashing import legacy_model_hash

    store = ControlNetStore(store_root)
    sd15 = legacy_model_hash(store_root / "sd15" / "control_demo_sd15_canny.safetensors")
    folder = legacy_model_hash(store_root / "control_folder_sd15" / "diffusion_pytorch_model.safetensors")
    assert store.model_list() == [f"control_demo_sd15_canny [{sd15}]", f"control_folder_sd15 [{folder}]",
                                  f"demo-controlnet-sdxl [{legacy_model_hash(store_root / 'demo-controlnet-sdxl.safetensors')}]"]
    assert all(re.fullmatch(r"[0-9a-f]{8}", e.short_hash) for e in store.entries)


def test_store_find_by_title_stem_case_or_part(store_root):
    store = ControlNetStore(store_root)
    entry = store.find("control_demo_sd15_canny", "f")
    assert entry.path == store_root / "sd15" / "control_demo_sd15_canny.safetensors"
    assert store.find(entry.title, "f") == entry
    assert store.find("Control_Demo_SD15_Canny", "f") == entry
    assert store.find("control_demo_sd15_canny [0badc0de]", "f") == entry  # another hash: the same name
    assert store.find("canny", "f") == entry  # the extension's closest match: the shortest stem containing it
    assert store.find("sd15/control_demo_sd15_canny.safetensors", "f") == entry
    with pytest.raises(ModelNotFound) as e:
        store.find("control_v11p_sd15_depth", f"{PREFIX}.args.0.model")
    assert e.value.field == f"{PREFIX}.args.0.model"
    with pytest.raises(PickleCheckpointRefused) as e:
        store.find("control_v11p_sd15_openpose [abcd1234]", "f")
    assert e.value.field == "f"
    with pytest.raises(InvalidParameter):
        store.find("None", "f")
    for hidden in ("evil", ".control_hidden"):
        with pytest.raises(ModelNotFound):
            store.find(hidden, "f")


def test_store_loads_a_diffusers_folder_and_knows_each_arch(store_root):
    store = ControlNetStore(store_root)
    folder = store.find("control_folder_sd15", "f")
    assert folder.is_dir and store.spec(folder).arch is Arch.SD1
    assert store.spec(store.find("demo-controlnet-sdxl", "f")).arch is Arch.SDXL
    model = load_controlnet(folder)
    assert arch_of(model) is Arch.SD1 and all(p.device.type == "cpu" for p in model.parameters())


# --- generation ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15(demo_files):
    from pipelines.builders.demo import build_demo_pipeline

    return build_demo_pipeline("demo-sd15"), load_controlnet(demo_files["demo-sd15"])


@pytest.fixture(scope="module")
def sdxl(demo_files):
    from pipelines.builders.demo import build_demo_pipeline

    return build_demo_pipeline("demo-sdxl"), load_controlnet(demo_files["demo-sdxl"])


def _run(pipe, size=64, **kwargs):
    return pipe(prompt="a red house", negative_prompt="blurry", num_inference_steps=2, guidance_scale=7.0,
                output_type="np", generator=torch.Generator().manual_seed(7), **kwargs).images


def _controlled(base, arch, models, units, *, mode="txt2img", inpaint=False, steps=2, size=64, **call):
    from pipelines.cache import assemble_pipeline

    maps = [preprocess(u, shapes_image((size, size)), size, size) for u in units]
    kwargs = call_kwargs(models, maps, units, mode, guidance_scale=7.0, steps=steps)
    pipe = assemble_pipeline(pipeline_class(arch, mode, inpaint), base.components, controlnet=kwargs.pop("controlnet"))
    if mode == "txt2img":
        call.update(height=size, width=size)
    return _run(pipe, **kwargs, **call)


@pytest.fixture(scope="module")
def sd15_plain(sd15):
    return _run(sd15[0], height=64, width=64)


def test_a_controlnet_changes_the_image_and_weight_zero_does_not(sd15, sd15_plain):
    base, model = sd15
    steered = _controlled(base, "sd1", [model], parse(unit(processor_res=64)))
    assert np.abs(steered - sd15_plain).mean() > 0.01
    off = _controlled(base, "sd1", [model], parse(unit(processor_res=64, weight=0)))
    assert np.allclose(off, sd15_plain, atol=1e-6)
    outside = _controlled(base, "sd1", [model], parse(unit(guidance_start=1.0, guidance_end=1.0)))
    assert np.allclose(outside, sd15_plain, atol=1e-6)  # a window that holds no step


def test_control_modes_and_several_units(sd15, sd15_plain):
    base, model = sd15
    outs = {mode: _controlled(base, "sd1", [model], parse(unit(control_mode=mode.value, processor_res=64)))
            for mode in ControlMode}
    balanced, prompt, control = (outs[m] for m in ControlMode)
    assert np.abs(prompt - sd15_plain).mean() < np.abs(balanced - sd15_plain).mean()  # soft weights: weaker
    assert not np.allclose(control, balanced, atol=1e-3)
    two = _controlled(base, "sd1", [model, model], parse(unit(processor_res=64), unit(module="invert", weight=0.5)))
    assert two.shape == (1, 64, 64, 3) and not np.allclose(two, balanced, atol=1e-3)


def test_img2img_and_inpaint_take_the_maps_as_control_image(sd15):
    base, model = sd15
    init = shapes_image((64, 64))
    out = _controlled(base, "sd1", [model], parse(unit(processor_res=64), img2img=True), mode="img2img",
                      image=init, strength=0.6)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    inp = _controlled(base, "sd1", [model], parse(unit(processor_res=64)), mode="img2img", inpaint=True,
                      image=init, mask_image=mask, strength=0.8, height=64, width=64)
    assert out.shape == inp.shape == (1, 64, 64, 3) and not np.isnan(out).any()


def test_sdxl_controlnet(sdxl):
    base, model = sdxl
    size = {"height": 64, "width": 64}
    plain = _run(base, **size)
    steered = _controlled(base, "sdxl", [model], parse(unit(processor_res=64)))
    assert np.abs(steered - plain).mean() > 0.01
    off = _controlled(base, "sdxl", [model], parse(unit(processor_res=64, weight=0)))
    assert np.allclose(off, plain, atol=1e-6)


def test_stack_applies_the_extensions_layer_weights_and_conditional_half(sd15):
    _, model = sd15
    torch.manual_seed(0)
    sample, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    hint, t = torch.rand(2, 3, 64, 64), torch.tensor(500)
    with torch.no_grad():
        down, mid = model(sample, t, states, hint, conditioning_scale=0.5, return_dict=False)
        factors = layer_factors(model, ControlMode.CONTROL)
        assert len(factors) == len(down) + 1 == 10 and factors[0] == pytest.approx(0.825 ** 12)
        stack = controlnet_stack([model], layer_factors=[factors], cond_only=[True], cfg=True)
        assert is_stack(stack)
        s_down, s_mid = stack(sample, t, states, [hint], [0.5], return_dict=False)
        for d, s, f in zip([*down, mid], [*s_down, s_mid], factors):
            assert (s[:1] == 0).all() and torch.allclose(s[1:], d[1:] * f, atol=1e-5)
        assert layer_factors(model, ControlMode.BALANCED) is None


def test_call_kwargs_map_fields_to_diffusers(sd15):
    _, model = sd15
    units = parse(unit(weight=0.7, guidance_start=0.2, guidance_end=0.5), unit(guidance_start=0.5, guidance_end=0.5))
    maps = [Image.new("RGB", (64, 64))] * 2
    kw = call_kwargs([model, model], maps, units, "img2img", guidance_scale=1.0, steps=20)
    assert kw["control_image"] == maps and "image" not in kw and kw["guess_mode"] is False
    assert kw["controlnet_conditioning_scale"] == [0.7, 1.0]
    assert kw["control_guidance_start"] == [0.2, 0.5]
    assert kw["control_guidance_end"] == pytest.approx([0.55, 0.55])
    assert kw["controlnet"].cfg is False and len(kw["controlnet"].nets) == 2
    kw = call_kwargs([model], maps[:1], units[:1], "txt2img", guidance_scale=7.0)
    assert kw["control_guidance_end"] == [0.5] and "image" in kw
    assert pipeline_class("sdxl", "img2img", True).__name__ == "StableDiffusionXLControlNetInpaintPipeline"
    with pytest.raises(ValueError):
        pipeline_class("sd1", "txt2img", True)


def test_hires_passes_follow_hr_option_and_soften_canny(sd15):
    _, model = sd15
    units = parse(unit(hr_option="Low res only"), unit(hr_option="High res only"), unit(module="invert"), unit())
    maps = [Image.new("RGB", (64, 64))] * 4
    scales = {p: call_kwargs([model] * 4, maps, units, "txt2img", guidance_scale=7.0, hires_pass=p)
              for p in (None, False, True)}
    assert scales[None]["controlnet_conditioning_scale"] == [1.0, 1.0, 1.0, 1.0]
    assert scales[False]["controlnet_conditioning_scale"] == [1.0, 0.0, 1.0, 1.0]
    assert scales[True]["controlnet_conditioning_scale"] == [0.0, 1.0, 1.0, 1.0]
    factors = scales[True]["controlnet"].layer_factors
    assert factors[2] is None and factors[3] == pytest.approx(SOFT_LAYER_FACTORS[:10])
    assert scales[False]["controlnet"].layer_factors[3] is None


def test_detect_then_fit_is_preprocess():
    (u,) = parse(unit(processor_res=128, resize_mode="Resize and Fill"))
    raw = detect(u, shapes_image(), 100, 61)
    assert raw.shape == (128, 192, 3)
    fitted = fit_map(raw, u.resize_mode, 96, 56)
    assert np.array_equal(np.asarray(preprocess(u, shapes_image(), 100, 61)), fitted)


def test_demo_controlnet_is_deterministic(tmp_path):
    from pipelines.builders.demo import write_demo_controlnet

    a = write_demo_controlnet(tmp_path / "a.safetensors", "demo-sd15", seed=5)
    b = write_demo_controlnet(tmp_path / "b.safetensors", "demo-sd15", seed=5)
    c = write_demo_controlnet(tmp_path / "c.safetensors", "demo-sd15", seed=6)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert json.loads(b.read_bytes()[8:8 + int.from_bytes(b.read_bytes()[:8], "little")])["__metadata__"] == {
        "sdfunc_config": "controlnet-demo-sd15"}

