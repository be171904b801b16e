"""A1111 infotext: writing it, parsing it, and carrying it in image files.

Contract (A1111 v1.10.1 behaviour):

* `build_infotext()` writes `<prompt>[\\nNegative prompt: <neg>]\\n<Key: value, ...>`: fixed-order keys first,
  then extras in insertion order, then `Version`, then `User`; `None` values are left out; values containing
  `,` `:` or a newline are JSON-quoted.
* `parse_infotext()` is A1111's `parse_generation_parameters` as `POST /sdapi/v1/png-info` returns it in
  `parameters`: values are strings, plus A1111's defaults (with their own types) and version-compat keys.
* `read_image_info()` finds the infotext in an image (PNG text chunk, EXIF UserComment, GIF comment).
* `png_bytes()` encodes a PNG carrying the infotext in a `parameters` text chunk (tEXt, iTXt when not Latin-1).

Nothing here logs or raises with prompt text in the message.
"""

from __future__ import annotations

import io
import json
import logging
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from packaging import version as _pkg_version
from PIL import Image
from PIL.PngImagePlugin import PngInfo

logger = logging.getLogger(__name__)

__all__ = [
    "INFOTEXT_FIXED_ORDER",
    "build_infotext",
    "format_value",
    "parse_infotext",
    "png_bytes",
    "read_image_info",
]

INFOTEXT_FIXED_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
)
"""Keys that always sit at these positions, in A1111's order; `Version` and `User` come last."""

_TRAILING_KEYS: tuple[str, ...] = ("Version", "User")
_FIXED_SET = frozenset(INFOTEXT_FIXED_ORDER)

NEGATIVE_PROMPT_PREFIX = "Negative prompt:"


# ---------------------------------------------------------------------------------------------------------
# Writing


def format_value(value: Any) -> str:
    """A value as the params line writes it: `str(value)`, JSON-quoted if that holds `,`, `:` or a newline."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The A1111 infotext for one image.

    `params` maps infotext keys to values (already decided by the caller: e.g. pass `Clip skip` only when
    > 1, `Eta` only when it differs from the sampler default). `None` values are dropped. Keys in
    `INFOTEXT_FIXED_ORDER` come first in that order, then the others in insertion order, then `Version`,
    then `User`. A key whose value equals the key itself is written alone, as A1111 does.
    """
    ordered: list[tuple[str, Any]] = [(k, params[k]) for k in INFOTEXT_FIXED_ORDER if k in params]
    ordered += [(k, v) for k, v in params.items() if k not in _FIXED_SET and k not in _TRAILING_KEYS]
    ordered += [(k, params[k]) for k in _TRAILING_KEYS if k in params]

    pairs = [k if (isinstance(v, str) and v == k) else f"{k}: {format_value(v)}" for k, v in ordered
             if v is not None]
    negative = f"\n{NEGATIVE_PROMPT_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt or ''}{negative}\n{', '.join(pairs)}".strip()


# ---------------------------------------------------------------------------------------------------------
# Parsing

# One `Key: value` pair of the params line: a key starting with a word character (then words, spaces, `-`,
# `/`), a colon, and either a JSON-style double-quoted string or everything up to the next comma.
_PAIR_RE = re.compile(
    r"""\s*
        (\w[\w \-/]+)              # key
        :\s*
        ( "(?:\\.|[^\\"])+"        # quoted value (backslash escapes allowed)
        | [^,]*                    # or a plain value up to the next comma
        )
        (?:,|$)""",
    re.VERBOSE,
)
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")

# Defaults A1111 adds when the key is absent (section 6), in A1111's order, with A1111's types.
_DEFAULTS_BEFORE_HIRES_FIX: tuple[tuple[str, Any], ...] = (
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
)
_DEFAULTS_AFTER_HIRES_FIX: tuple[tuple[str, Any], ...] = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)

_V160 = _pkg_version.parse("1.6.0")
_V170_TSNR = _pkg_version.parse("v1.7.0-225")
_V180 = _pkg_version.parse("1.8.0")


def _unquote(text: str) -> str:
    """JSON-decode a `"..."` value; anything else, or undecodable, comes back unchanged."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        decoded = json.loads(text)
    except ValueError:
        return text
    return decoded if isinstance(decoded, str) else text


def _split_lines(text: str) -> tuple[str, str, str]:
    """(prompt, negative prompt, params line); the last line is params only with >= 3 pairs."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR_RE.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PROMPT_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PROMPT_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), last


def _old_hires_first_pass(width: int, height: int) -> tuple[int, int]:
    """A1111's pre-1.0 automatic first-pass size: about 512x512 pixels, rounded up to multiples of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _restore_old_hires_fix(res: dict[str, Any]) -> None:
    """Old infotexts with `First pass size`: that is the real size, and `Size` was the hires target."""
    first_w, first_h = res.get("First pass size-1"), res.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    try:
        first_w, first_h = int(first_w), int(first_h)
        width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
        if first_w == 0 or first_h == 0:
            first_w, first_h = _old_hires_first_pass(width, height)
    except (ValueError, ZeroDivisionError, OverflowError):
        logger.debug("unusable 'First pass size' in infotext; left as is")
        return
    res["Size-1"], res["Size-2"] = first_w, first_h
    res["Hires resize-1"], res["Hires resize-2"] = width, height


def uses_emphasis(prompt: str) -> bool:
    """True when `prompt` gives any text an attention weight other than 1.0 (A1111's `Emphasis` rule), by the
    same parser the generation uses (pipelines.prompts)."""
    from pipelines.prompts import parse_prompt_attention

    try:
        fragments = parse_prompt_attention(prompt)
    except ValueError:  # a weight that is not a number, "(x:1.2.3)": A1111 fails; read as a plain close (1.1)
        fragments = parse_prompt_attention(_WEIGHT_CLOSE.sub(_plain_close_if_malformed, prompt))
    return any(w != 1.0 for text, w in fragments if text != "BREAK")


_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")


def _plain_close_if_malformed(match: re.Match[str]) -> str:
    try:
        float(match.group(1))
    except ValueError:
        return ")"
    return match.group(0)


def _parse_version(text: Any) -> _pkg_version.Version | None:
    """A1111's reading of the `Version` key: `v1.7.0-225-gabc` -> 1.7.0.post225; non-versions -> None."""
    if not isinstance(text, str):
        return None
    m = re.match(r"([^-]+-[^-]+)-.*", text)
    if m:
        text = m.group(1)
    try:
        return _pkg_version.parse(text)
    except _pkg_version.InvalidVersion:
        return None


def _add_backcompat(res: dict[str, Any]) -> None:
    """Old-behaviour switches A1111 turns on for infotexts from releases before 1.6.0 / 1.7.0-225 / 1.8.0."""
    ver = _parse_version(res.get("Version"))
    if ver is None:
        return
    if ver < _V160 and "[" in res.get("Prompt", ""):
        res["Old prompt editing timelines"] = True
    if ver < _V160 and res.get("Sampler", "") in ("DDIM", "PLMS"):
        res["Pad conds v0"] = True
    if ver < _V170_TSNR:
        res["Downcast alphas_cumprod"] = True
    if ver < _V180 and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True


def parse_infotext(text: str | None) -> dict[str, Any]:
    """Parse an infotext as A1111's png-info does (`POST /sdapi/v1/png-info`, `parameters`).

    Parsed values are strings (quoted ones JSON-unquoted; `WxH` split into `<key>-1` / `<key>-2`; a pair
    with an empty value is skipped). `Prompt` and `Negative prompt` are always present. A1111's defaults
    are added for absent keys with their own types (`Clip skip` "1", `Hires resize-1` 0, `Masked area
    padding` 32, `Refiner switch by sampling steps` False, ...), `Emphasis` "Original" only if a prompt uses
    attention weights, and compat switches when `Version` is an old A1111 release.
    """
    prompt, negative_prompt, params_line = _split_lines(text or "")

    res: dict[str, Any] = {}
    for key, value in _PAIR_RE.findall(params_line):
        if not value:
            continue  # A1111 fails on an empty value and skips the pair
        if value[0] == '"' and value[-1] == '"':
            value = _unquote(value)
        size = _SIZE_RE.match(value)
        if size is not None:
            res[f"{key}-1"] = size.group(1)
            res[f"{key}-2"] = size.group(2)
        else:
            res[key] = value

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt

    res.setdefault("Clip skip", "1")
    hypernet = res.get("Hypernet")
    if hypernet is not None:
        res["Prompt"] += f"<hypernet:{hypernet}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    for key, default in _DEFAULTS_BEFORE_HIRES_FIX:
        res.setdefault(key, default)
    _restore_old_hires_fix(res)
    for key, default in _DEFAULTS_AFTER_HIRES_FIX:
        res.setdefault(key, default)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in res and (uses_emphasis(prompt) or uses_emphasis(negative_prompt)):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)
    _add_backcompat(res)
    return res


# ---------------------------------------------------------------------------------------------------------
# Image files

# PIL info entries that png-info leaves out of `items` (A1111's IGNORED_INFO_KEYS).
IGNORED_INFO_KEYS = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
    "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop",
})

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_USER_COMMENT_CODECS = {
    b"ASCII\x00\x00\x00": "ascii",
    b"JIS\x00\x00\x00\x00\x00": "shift_jis",
    b"UNICODE\x00": "utf_16_be",
}


def _decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment: 8-byte charset prefix + body (as piexif reads it); else the bytes as UTF-8."""
    if isinstance(raw, str):
        return raw
    codec = _USER_COMMENT_CODECS.get(raw[:8]) if len(raw) >= 8 else None
    if codec is None:
        return raw.decode("utf8", errors="ignore")
    return raw[8:].decode(codec, errors="replace")


def _exif_user_comment(exif_data: Any) -> str:
    """The UserComment of an EXIF blob, "" when there is none or the blob is unreadable."""
    try:
        exif = Image.Exif()
        exif.load(exif_data)
        raw = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT, b"")
    except Exception:  # noqa: BLE001 - a broken EXIF blob must not fail png-info
        logger.debug("unreadable EXIF data ignored")
        return ""
    return _decode_user_comment(raw) if raw else ""


def _json_safe(value: Any) -> Any:
    """A PIL info value as JSON: bytes decoded as UTF-8, tuples as lists, odd numbers as floats, else str."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf8", errors="replace")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def _novelai_infotext(image: Image.Image, items: Mapping[str, Any]) -> str | None:
    """NovelAI's PNG metadata rewritten as an infotext, as A1111 does; None when it cannot be read."""
    from pipelines.samplers import SAMPLERS  # local: keeps this module importable without diffusers

    names = {s.name.lower(): s.name for s in SAMPLERS}
    names.update({a.lower(): s.name for s in SAMPLERS for a in s.aliases})
    try:
        meta = json.loads(items["Comment"])
        sampler = names.get(str(meta["sampler"]).lower(), "Euler a")
        return (
            f"{items['Description']}\n{NEGATIVE_PROMPT_PREFIX} {meta['uc']}\n"
            f"Steps: {meta['steps']}, Sampler: {sampler}, CFG scale: {meta['scale']}, Seed: {meta['seed']}, "
            f"Size: {image.width}x{image.height}, Clip skip: 2, ENSD: 31337"
        )
    except Exception:  # noqa: BLE001 - foreign metadata; never fail png-info on it
        logger.info("NovelAI metadata present but unreadable; ignored")
        return None


def read_image_info(image: Image.Image) -> tuple[str, dict]:
    """(info, items) for png-info (`POST /sdapi/v1/png-info`).

    `info`: the `parameters` text chunk; an EXIF UserComment (JPEG/WEBP) replaces it when present and
    non-empty; else a GIF comment; "" when there is none. NovelAI PNGs are converted as A1111 does.
    `items`: the image's other PIL info entries minus the technical ones, with JSON-safe values.
    """
    items: dict[str, Any] = dict(image.info or {})
    geninfo = items.pop("parameters", None)

    if "exif" in items:
        comment = _exif_user_comment(items.pop("exif"))
        if comment:
            geninfo = comment
    elif "comment" in items:  # GIF
        comment = items["comment"]
        geninfo = comment.decode("utf8", errors="ignore") if isinstance(comment, bytes) else comment

    for key in IGNORED_INFO_KEYS:
        items.pop(key, None)

    if items.get("Software") == "NovelAI":
        geninfo = _novelai_infotext(image, items) or geninfo

    if geninfo is not None and not isinstance(geninfo, str):
        geninfo = _json_safe(geninfo)
        geninfo = geninfo if isinstance(geninfo, str) else str(geninfo)
    return geninfo or "", {str(k): _json_safe(v) for k, v in items.items()}


def png_bytes(image: Image.Image, infotext: str) -> bytes:
    """PNG bytes of `image` with `infotext` in a `parameters` chunk: tEXt if Latin-1 encodable, else iTXt.

    Only that chunk is written (no other `image.info` text); the same image and text give the same bytes.
    """
    info = PngInfo()
    try:
        infotext.encode("latin-1")
    except UnicodeEncodeError:
        info.add_itxt("parameters", infotext)
    else:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_with_chunks(image: Image.Image, chunks: Mapping[str, str]) -> bytes:
    """PNG bytes of `image` with one text chunk per item of `chunks`, in order (tEXt when Latin-1 encodable, else
    iTXt), as A1111's API writes an extras result (the input's chunks, then `postprocessing`)."""
    info = PngInfo()
    for key, text in chunks.items():
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            info.add_itxt(key, text)
        else:
            info.add_text(key, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
