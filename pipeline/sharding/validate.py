"""Image checks: keep clean RGB JPEGs byte for byte, re-encode what decodes, reject the rest.

`structural` reads only JPEG markers (no decode): a clean file has SOI, a baseline or
progressive SOF with 3 components, and ends with EOI. Anything else, and every image in
`decode` mode, goes through Pillow; what decodes is written back as an RGB JPEG. In both modes
an image whose header claims more than `max_pixels` pixels is rejected before Pillow sees it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pipeline.jpeg import CLEAN_SOF, MAX_PIXELS, ends_with_eoi, frame, too_many_pixels

VALIDATIONS = ("structural", "decode")
JPEG_QUALITY = 90


@dataclass(slots=True)
class Checked:
    """A usable image (jpeg set) or a rejection (reason set)."""

    jpeg: bytes | None
    width: int = 0
    height: int = 0
    reencoded: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class JpegHeader:
    sof: int
    width: int
    height: int
    components: int


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG, walking the marker segments; None when there is none."""
    f = frame(data)
    return None if f is None else JpegHeader(*f)


def clean_size(data: bytes, max_side: int | None, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) when `data` can be kept as it is, without decoding it; else None."""
    f = frame(data)
    if f is None:
        return None
    sof, w, h, comps = f
    if sof not in CLEAN_SOF or comps != 3 or not w or not h or too_many_pixels(w, h, max_pixels):
        return None
    if not ends_with_eoi(data):  # truncated files would decode with grey padding
        return None
    if max_side and (w > max_side or h > max_side):
        return None
    return w, h


def structural_ok(data: bytes, max_side: int | None) -> JpegHeader | None:
    """The header when `data` can be kept as it is, without decoding it."""
    if clean_size(data, max_side) is None:
        return None
    return jpeg_header(data)


def check_image(
    data: bytes, validation: str = "structural", max_side: int | None = None, max_pixels: int | None = MAX_PIXELS
) -> Checked:
    """Decide what to store for one source file (pure: bytes in, bytes out)."""
    if validation not in VALIDATIONS:
        raise ValueError(f"validation={validation!r}: expected one of {', '.join(VALIDATIONS)}")
    if not data:
        return Checked(None, reason="empty file")
    f = frame(data)
    if f is not None and (reason := too_many_pixels(f[1], f[2], max_pixels)):
        return Checked(None, reason=f"too large: {reason}")
    if validation == "structural":
        size = clean_size(data, max_side, max_pixels)
        if size is not None:
            return Checked(data, *size)
    return _decode(data, max_side, max_pixels)


def _decode(data: bytes, max_side: int | None, max_pixels: int | None = MAX_PIXELS) -> Checked:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        fmt = img.format
        if reason := too_many_pixels(img.width, img.height, max_pixels):  # any format: PNG bombs too
            return Checked(None, reason=f"too large: {reason}")
        img.load()  # raises on truncated data: LOAD_TRUNCATED_IMAGES stays off on purpose
    except Image.DecompressionBombError as e:  # over Pillow's own limit, raised by open()
        return Checked(None, reason=f"too large: {e}")
    except UnidentifiedImageError:
        if data[:2] == b"\xff\xd8":
            return Checked(None, reason="corrupt JPEG (starts with SOI, but Pillow cannot read its headers)")
        return Checked(None, reason="not an image (Pillow cannot identify it)")
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        return Checked(None, reason=f"corrupt or truncated: {type(e).__name__}: {e}")
    too_big = bool(max_side) and max(img.size) > max_side
    if fmt == "JPEG" and img.mode == "RGB" and not too_big and clean_size(data, None, None) is not None:
        return Checked(data, img.width, img.height)
    try:
        img = _to_rgb(img)
        if too_big:
            scale = max_side / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=JPEG_QUALITY)
    except Exception as e:
        return Checked(None, reason=f"cannot re-encode ({fmt} {img.mode}): {type(e).__name__}: {e}")
    return Checked(out.getvalue(), img.width, img.height, reencoded=True)


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, not whatever colour happens to sit under alpha=0.
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode == "I;16" or img.mode == "I":
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")
