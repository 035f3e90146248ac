"""Image checks: which bytes are kept, re-encoded or rejected, and why."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.sharding.validate import check_image, jpeg_header, structural_ok


def _img(mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _bytes(img, fmt="JPEG", **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _sof_components(jpeg: bytes) -> int:
    return jpeg_header(jpeg).components


def test_clean_rgb_jpeg_is_kept_byte_for_byte_in_both_modes():
    data = _bytes(_img())
    for validation in ("structural", "decode"):
        c = check_image(data, validation)
        assert c.jpeg == data and not c.reencoded
        assert (c.width, c.height) == (40, 30)


def test_progressive_jpeg_is_clean():
    data = _bytes(_img(), progressive=True)
    assert jpeg_header(data).sof == 0xC2
    assert check_image(data).jpeg == data


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "GIF")])
def test_other_images_are_reencoded_to_rgb_jpeg(mode, fmt):
    data = _bytes(_img(mode), fmt)
    assert structural_ok(data, None) is None
    c = check_image(data)
    assert c.reencoded and c.jpeg != data
    assert _sof_components(c.jpeg) == 3
    out = Image.open(io.BytesIO(c.jpeg))
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (40, 30))


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"hello, I am text", "not an image"),
        (_bytes(_img(size=(200, 200)))[:900], "truncated"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 50, "corrupt"),
    ],
    ids=["empty", "text", "truncated", "header-only"],
)
def test_broken_files_are_rejected_with_a_reason(data, reason):
    for validation in ("structural", "decode"):
        c = check_image(data, validation)
        assert c.jpeg is None and reason in c.reason


def test_trailing_garbage_after_eoi_goes_through_decode():
    data = _bytes(_img()) + b"junk"
    c = check_image(data)
    assert c.jpeg is not None and c.reencoded


def test_max_side_downscales_only_large_images():
    big = _bytes(_img(size=(120, 60)))
    c = check_image(big, max_side=64)
    assert c.reencoded and (c.width, c.height) == (64, 32)
    small = _bytes(_img(size=(60, 30)))
    assert check_image(small, max_side=64).jpeg == small


def test_unknown_validation_mode_is_named():
    with pytest.raises(ValueError, match="'fast'"):
        check_image(b"x", "fast")


def test_decoding_threads_keep_the_plan_order_and_the_bytes(tmp_path):
    from pipeline.sharding.images import checked_images
    from pipeline.sharding.sources import Entry

    blobs = [_bytes(_img(size=(20 + i, 10))) for i in range(9)] + [b"not an image", _bytes(_img("L"))]
    entries = []
    for i, b in enumerate(blobs):
        (tmp_path / f"{i}.jpg").write_bytes(b)
        entries.append(Entry(f"k{i}", f"{i}.jpg", "n01", len(b), str(tmp_path / f"{i}.jpg")))
    entries.append(Entry("gone", "gone.jpg", "n01", 5, str(tmp_path / "gone.jpg")))
    one = list(checked_images(entries, "decode", None, threads=1))
    assert list(checked_images(entries, "decode", None, threads=3)) == one
    assert [e.key for e, *_ in one] == [e.key for e in entries]
    assert [r[1] is None for r in one] == [False] * 9 + [True, False, True]
