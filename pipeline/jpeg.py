"""JPEG marker parsing without decoding: the frame header and the end-of-image marker. Shared by
the sharder's structural validation and the loaders' header check."""

from __future__ import annotations

# SOF markers a stock decoder (DALI's nvJPEG, libjpeg-turbo) handles: baseline, extended, progressive
CLEAN_SOF = {0xC0, 0xC1, 0xC2}
ALL_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field
# The pixel-count limit of the header checks, before any decoder sees an image: a few hundred
# bytes can claim 60000x60000 (10 GB of RGB). Pillow's decompression-bomb threshold: far above
# any ImageNet photo, and the point where Pillow itself starts to warn.
MAX_PIXELS = 89_478_485


def too_many_pixels(width: int, height: int, max_pixels: int | None) -> str | None:
    """The rejection reason when width x height exceeds `max_pixels` (None: no limit), else None."""
    if max_pixels is not None and width * height > max_pixels:
        return f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels} (max_pixels)"
    return None


def frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(sof, width, height, components) of the frame header, walking the marker segments.

    A plain tuple and local names only: this runs once per image on the default path."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in STANDALONE:
            i += 2
        elif marker == 0xD9 or marker == 0xDA:  # EOI or start of scan before any frame header
            return None
        elif marker in ALL_SOF:
            if i + 10 > n:
                return None
            return marker, (data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6], data[i + 9]
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def ends_with_eoi(data: bytes) -> bool:
    """Whether the file ends with its EOI marker (NUL padding after it is harmless). The
    endswith test first: rstrip copies the whole file."""
    return data.endswith(b"\xff\xd9") or data.rstrip(b"\x00").endswith(b"\xff\xd9")
