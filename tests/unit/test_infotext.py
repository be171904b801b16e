"""pipelines.infotext: A1111's infotext writer, parser, and the PNG/EXIF/GIF carriers."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.infotext import (
    INFOTEXT_FIXED_ORDER,
    build_infotext,
    format_value,
    parse_infotext,
    png_bytes,
    read_image_info,
)

BASE = {
    "Steps": 20,
    "Sampler": "Euler a",
    "Schedule type": "Automatic",
    "CFG scale": 7.0,
    "Seed": 42,
    "Size": "512x512",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Version": "v1.10.1",
}

EULER_A = ("a red house\n"
           "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 42, Size: 512x512, "
           "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")

DEFAULTS = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every PNG chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        out.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def _image() -> Image.Image:
    return Image.new("RGB", (16, 8), (200, 30, 60))


# ------------------------------------------------------------------------------------------------------
# Writing


def test_fixed_order_list():
    assert INFOTEXT_FIXED_ORDER[:4] == ("Steps", "Sampler", "Schedule type", "CFG scale")
    assert INFOTEXT_FIXED_ORDER[-2:] == ("RNG", "Tiling")
    assert len(INFOTEXT_FIXED_ORDER) == 26
    assert "Version" not in INFOTEXT_FIXED_ORDER and "User" not in INFOTEXT_FIXED_ORDER


def test_section5_example_euler_a():
    assert build_infotext("a red house", "", BASE) == EULER_A


def test_section5_example_dpmpp_2m():
    params = dict(BASE, Sampler="DPM++ 2M", **{"Schedule type": "Karras"})
    assert build_infotext("a red house", "", params) == (
        "a red house\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")


def test_order_is_fixed_then_insertion_then_version_user():
    params = {
        "Version": "sdfunc-0.1.0",
        "User": "someone",
        "Hires upscale": 2.0,
        "Eta": 0.0,
        "Denoising strength": 0.7,  # an extra whose key is in the fixed list keeps its fixed position
        "Seed": 1,
        "Steps": 20,
        "Hires upscaler": "Latent",
        "Clip skip": 2,
    }
    assert build_infotext("p", "", params) == (
        "p\nSteps: 20, Seed: 1, Denoising strength: 0.7, Clip skip: 2, Hires upscale: 2.0, Eta: 0.0, "
        "Hires upscaler: Latent, Version: sdfunc-0.1.0, User: someone")


def test_hires_example_of_section5():
    params = dict(BASE)
    params.pop("Version")
    params.update({"Hires upscale": 2.0, "Hires upscaler": "Latent", "Denoising strength": 0.7,
                   "Version": "v1.10.1"})
    assert build_infotext("a", "", params).endswith(
        "Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Hires upscale: 2.0, Hires upscaler: Latent, "
        "Version: v1.10.1")


def test_none_values_are_dropped_and_key_equal_value_is_bare():
    text = build_infotext("p", "", {"Steps": 20, "Sampler": None, "Face restoration": None, "Flag": "Flag",
                                    "Tiling": "True", "Eta": None})
    assert text == "p\nSteps: 20, Tiling: True, Flag"


def test_negative_prompt():
    text = build_infotext("cat", "blurry, ugly", BASE)
    assert text.startswith("cat\nNegative prompt: blurry, ugly\nSteps: 20, ")
    assert build_infotext("cat", "", BASE).startswith("cat\nSteps: 20")


def test_prompt_written_verbatim_and_result_stripped():
    prompt = "  a, b: c\nsecond line <lora:x:0.5> (d:1.2)"
    text = build_infotext(prompt, "", BASE)
    assert text.startswith("a, b: c\nsecond line <lora:x:0.5> (d:1.2)\nSteps:")
    assert build_infotext("", "", {"Steps": 1}) == "Steps: 1"


@pytest.mark.parametrize("value, expected", [
    (7.0, "7.0"),
    (20, "20"),
    (True, "True"),
    ("Euler a", "Euler a"),
    ("a,b", '"a,b"'),
    ("x: y", '"x: y"'),
    ("line\nbreak", '"line\\nbreak"'),
    ('say "hi", ok', '"say \\"hi\\", ok"'),
    ("naïve, 猫", '"naïve, 猫"'),  # ensure_ascii=False, as A1111
    ("plain \"quote\"", 'plain "quote"'),
])
def test_format_value(value, expected):
    assert format_value(value) == expected


def test_lora_hashes_are_json_quoted():
    params = dict(BASE)
    params.pop("Version")
    params["Lora hashes"] = "x: 0123456789ab, y: ba9876543210"
    params["Version"] = "v1.10.1"
    text = build_infotext("<lora:x:0.5> <lora:y:1>", "", params)
    assert ', Lora hashes: "x: 0123456789ab, y: ba9876543210", Version: v1.10.1' in text
    parsed = parse_infotext(text)
    assert parsed["Lora hashes"] == "x: 0123456789ab, y: ba9876543210"
    assert parsed["Version"] == "v1.10.1"
    assert parsed["Prompt"] == "<lora:x:0.5> <lora:y:1>"


# ------------------------------------------------------------------------------------------------------
# Parsing


def test_parse_section5_example():
    parsed = parse_infotext(EULER_A)
    expected = {
        "Steps": "20", "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "7.0", "Seed": "42",
        "Size-1": "512", "Size-2": "512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly",
        "Version": "v1.10.1", "Prompt": "a red house", "Negative prompt": "",
    }
    assert parsed == {**DEFAULTS, **expected}
    assert list(parsed)[:10] == list(expected)[:10]
    for key, value in DEFAULTS.items():  # exact types
        assert type(parsed[key]) is type(value), key
    assert "Emphasis" not in parsed and "Cache FP16 weight for LoRA" not in parsed
    json.dumps(parsed)


def test_parse_empty_text():
    assert parse_infotext("") == {"Prompt": "", "Negative prompt": "", **DEFAULTS}
    assert parse_infotext(None) == parse_infotext("")


def test_parse_negative_prompt_multiline():
    text = "line one\nline two\nNegative prompt: bad, worse\nmore bad\nSteps: 5, Sampler: Euler, Seed: 3"
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two"
    assert parsed["Negative prompt"] == "bad, worse\nmore bad"
    assert parsed["Steps"] == "5"


def test_last_line_with_two_pairs_is_prompt():
    text = "a cat\nstyle: oil, mood: calm"
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a cat\nstyle: oil, mood: calm"
    assert "style" not in parsed and "mood" not in parsed
    assert parse_infotext("Steps: 20, Seed: 1")["Prompt"] == "Steps: 20, Seed: 1"
    only_params = parse_infotext("Steps: 20, Seed: 1, Sampler: Euler")
    assert only_params["Prompt"] == "" and only_params["Sampler"] == "Euler"


def test_round_trip_of_awkward_prompt():
    prompt = "a, b: c\n<lora:x:0.5> d:e, f"
    negative = "no: thanks, really\nsecond"
    params = dict(BASE, **{"Mask blur": 4, "Hires resize": "1024x768", "Note": "one, two: three\nfour"})
    parsed = parse_infotext(build_infotext(prompt, negative, params))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    assert parsed["Note"] == "one, two: three\nfour"
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == ("1024", "768")
    assert parsed["Mask blur"] == "4"


def test_parse_quoted_size_and_empty_value():
    parsed = parse_infotext('p\nSteps: 2, Size: "64x32", Empty: , Sampler: Euler')
    assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "32")
    assert "Empty" not in parsed  # A1111 skips an empty value


def test_emphasis_only_with_attention_weights():
    assert "Emphasis" not in parse_infotext("plain <lora:x:0.5>\nSteps: 1, Seed: 2, Sampler: Euler")
    assert "Emphasis" not in parse_infotext("(a:1.0) \\(escaped\\)\nSteps: 1, Seed: 2, Sampler: Euler")
    assert parse_infotext("(a)\nSteps: 1, Seed: 2, Sampler: Euler")["Emphasis"] == "Original"
    assert parse_infotext("p\nNegative prompt: [bad]\nSteps: 1, Seed: 2, Sampler: Euler")["Emphasis"] == "Original"
    given = parse_infotext("(a)\nSteps: 1, Seed: 2, Emphasis: No norm")
    assert given["Emphasis"] == "No norm"


def test_explicit_values_win_over_defaults():
    parsed = parse_infotext("p\nSteps: 1, Clip skip: 2, Schedule type: Karras, RNG: CPU, FP8 weight: Enable for SDXL")
    assert (parsed["Clip skip"], parsed["Schedule type"], parsed["RNG"]) == ("2", "Karras", "CPU")
    assert parsed["Cache FP16 weight for LoRA"] is False


@pytest.mark.parametrize("version, expected", [
    ("v1.10.1", {}),
    ("sdfunc-0.1.0", {}),
    ("not a version", {}),
    ("v1.5.1", {"Pad conds v0": True, "Downcast alphas_cumprod": True, "Old prompt editing timelines": True,
                "Refiner switch by sampling steps": True}),
    ("v1.7.0-133-gde03882d", {"Downcast alphas_cumprod": True, "Refiner switch by sampling steps": True}),
    ("v1.7.0-300-gabcdef", {"Refiner switch by sampling steps": True}),
    # why sdfunc must never write a bare low semver as Version (section 5)
    ("0.1.0", {"Pad conds v0": True, "Downcast alphas_cumprod": True, "Old prompt editing timelines": True,
               "Refiner switch by sampling steps": True}),
])
def test_version_backcompat(version, expected):
    text = f"[a:b:3]\nSteps: 1, Sampler: DDIM, Refiner: x, Version: {version}"
    parsed = parse_infotext(text)
    compat = {k: parsed[k] for k in ("Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod")
              if k in parsed}
    if parsed["Refiner switch by sampling steps"]:
        compat["Refiner switch by sampling steps"] = True
    assert compat == expected


def test_old_first_pass_size_is_converted():
    parsed = parse_infotext("p\nSteps: 1, Size: 1024x1024, First pass size: 0x0")
    assert (parsed["Size-1"], parsed["Size-2"]) == (512, 512)
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == (1024, 1024)
    parsed = parse_infotext("p\nSteps: 1, Size: 1024x768, First pass size: 640x480")
    assert (parsed["Size-1"], parsed["Hires resize-1"]) == (640, 1024)


def test_hypernet_appended_to_prompt():
    parsed = parse_infotext("p\nSteps: 1, Seed: 2, Hypernet: anime")
    assert parsed["Prompt"] == "p<hypernet:anime:1.0>"


# ------------------------------------------------------------------------------------------------------
# Image carriers


def test_round_trip_through_png():
    params = dict(BASE, **{"Lora hashes": "x: 0123456789ab"})
    text = build_infotext("a, b: c\n<lora:x:0.5>", "ugly, bad", params)
    data = png_bytes(_image(), text)
    image = Image.open(io.BytesIO(data))
    info, items = read_image_info(image)
    assert info == text
    assert items == {}
    parsed = parse_infotext(info)
    assert parsed["Prompt"] == "a, b: c\n<lora:x:0.5>"
    assert parsed["Negative prompt"] == "ugly, bad"
    assert parsed["Lora hashes"] == "x: 0123456789ab"
    assert parsed["Seed"] == "42"


def test_latin1_text_goes_to_text_chunk():
    data = png_bytes(_image(), "café\nSteps: 1")
    kinds = [k for k, _ in _chunks(data)]
    assert b"tEXt" in kinds and b"iTXt" not in kinds
    payload = dict(_chunks(data))[b"tEXt"]
    assert payload == b"parameters\x00" + "café\nSteps: 1".encode("latin-1")


def test_unicode_text_goes_to_itxt():
    text = "猫, a cat 🐱\nNegative prompt: 悪い\nSteps: 20, Sampler: Euler a, Seed: 1"
    data = png_bytes(_image(), text)
    chunks = _chunks(data)
    kinds = [k for k, _ in chunks]
    assert b"iTXt" in kinds and b"tEXt" not in kinds
    payload = dict(chunks)[b"iTXt"]
    assert payload.startswith(b"parameters\x00")
    info, _ = read_image_info(Image.open(io.BytesIO(data)))
    assert info == text
    assert parse_infotext(info)["Negative prompt"] == "悪い"


def test_png_bytes_deterministic_and_image_preserved():
    image = Image.new("RGBA", (9, 7), (1, 2, 3, 4))
    image.info["parameters"] = "stale"  # only the given text is written
    a, b = png_bytes(image, "x\nSteps: 1"), png_bytes(image, "x\nSteps: 1")
    assert a == b
    decoded = Image.open(io.BytesIO(a))
    assert decoded.mode == "RGBA" and decoded.size == (9, 7)
    assert decoded.getpixel((0, 0)) == (1, 2, 3, 4)
    assert decoded.info["parameters"] == "x\nSteps: 1"


def test_read_info_items_and_ignored_keys():
    meta = PngInfo()
    meta.add_text("parameters", "p\nSteps: 1")
    meta.add_text("Software", "something")
    buf = io.BytesIO()
    _image().save(buf, format="PNG", pnginfo=meta, dpi=(72, 72))
    info, items = read_image_info(Image.open(io.BytesIO(buf.getvalue())))
    assert info == "p\nSteps: 1"
    assert items == {"Software": "something"}  # dpi dropped
    json.dumps(items)


def test_no_info_is_empty_string():
    buf = io.BytesIO()
    _image().save(buf, format="PNG")
    assert read_image_info(Image.open(io.BytesIO(buf.getvalue()))) == ("", {})


def _jpeg_with_user_comment(raw: bytes) -> Image.Image:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = raw
    buf = io.BytesIO()
    _image().save(buf, format="JPEG", exif=exif.tobytes())
    return Image.open(io.BytesIO(buf.getvalue()))


def test_jpeg_exif_user_comment_unicode():
    text = "a cat, 猫\nSteps: 20, Sampler: Euler a, Seed: 5"
    image = _jpeg_with_user_comment(b"UNICODE\x00" + text.encode("utf-16-be"))
    info, items = read_image_info(image)
    assert info == text
    assert "exif" not in items and "jfif" not in items
    json.dumps(items)


def test_jpeg_exif_user_comment_ascii():
    image = _jpeg_with_user_comment(b"ASCII\x00\x00\x00" + b"p\nSteps: 1, Seed: 2, Sampler: Euler")
    assert read_image_info(image)[0] == "p\nSteps: 1, Seed: 2, Sampler: Euler"


def test_webp_exif_user_comment():
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + "w\nSteps: 1".encode("utf-16-be")
    buf = io.BytesIO()
    try:
        _image().save(buf, format="WEBP", exif=exif.tobytes())
    except (KeyError, OSError):
        pytest.skip("Pillow built without WEBP")
    assert read_image_info(Image.open(io.BytesIO(buf.getvalue())))[0] == "w\nSteps: 1"


def test_gif_comment():
    buf = io.BytesIO()
    _image().convert("P").save(buf, format="GIF", comment=b"g\nSteps: 3, Seed: 4, Sampler: Euler")
    info, items = read_image_info(Image.open(io.BytesIO(buf.getvalue())))
    assert info == "g\nSteps: 3, Seed: 4, Sampler: Euler"
    json.dumps(items)


def test_novelai_metadata():
    meta = PngInfo()
    meta.add_text("Software", "NovelAI")
    meta.add_text("Description", "a girl")
    meta.add_text("Comment", json.dumps({"uc": "bad", "steps": 28, "sampler": "k_euler_ancestral",
                                         "scale": 11, "seed": 7}))
    buf = io.BytesIO()
    _image().save(buf, format="PNG", pnginfo=meta)
    info, _ = read_image_info(Image.open(io.BytesIO(buf.getvalue())))
    assert info == ("a girl\nNegative prompt: bad\nSteps: 28, Sampler: Euler a, CFG scale: 11, Seed: 7, "
                    "Size: 16x8, Clip skip: 2, ENSD: 31337")


def test_crc_of_written_chunks_is_valid():
    for kind, payload in _chunks(png_bytes(_image(), "ü\nSteps: 1")):
        assert kind.isalpha()
    data = png_bytes(_image(), "x")
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        body = data[pos + 4:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(body) == crc
        pos += 12 + length
