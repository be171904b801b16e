"""Images in and out of the API: base64 / data-URL decoding with limits, and PNG base64 encoding."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from handler.errors import InvalidRequest


def read_image(data: str, *, field: str, max_pixels: int) -> Image.Image:
    """A base64 string or `data:image/...;base64,` URL -> the PIL image as stored (mode and text chunks kept).

    Undecodable input, URLs, non-images and images above `max_pixels` are a 422 naming `field`; an
    oversized image is refused from its header, before its pixels are decoded."""
    if not isinstance(data, str) or not data.strip():
        raise InvalidRequest(f"{field}: an image (base64 or data URL) is required", field=field)
    text = data.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidRequest(f"{field}: only base64 data URLs are accepted", field=field)
    elif text.startswith(("http://", "https://")):
        raise InvalidRequest(f"{field}: image URLs are not fetched; send the image as base64", field=field)
    text = "".join(text.split())  # MIME-style line-wrapped base64 is common (base64.encodebytes)
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}: invalid base64 image", field=field) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > max_pixels:
                raise InvalidRequest(
                    f"{field}: image of {image.width}x{image.height} exceeds the limit of {max_pixels} pixels",
                    field=field,
                )
            image.load()
    except InvalidRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        raise InvalidRequest(f"{field}: not a decodable image", field=field) from None
    return image


def decode_image(data: str, *, field: str, max_pixels: int, background: str = "#ffffff") -> Image.Image:
    """`read_image`, then flattened to RGB (transparency over `background`, A1111's img2img_background_color)."""
    return flatten(read_image(data, field=field, max_pixels=max_pixels), background)


def flatten(image: Image.Image, background: str = "#ffffff") -> Image.Image:
    """RGB copy; alpha composited over `background`."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background)
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def b64(data: bytes) -> str:
    """Raw base64 text, no data: prefix (what A1111 returns and webuiapi decodes)."""
    return base64.b64encode(data).decode("ascii")
