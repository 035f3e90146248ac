"""A shard's images read and checked, in plan order.

Structural checks run inline: they are a few microseconds of Python, which threads cannot
share (the GIL). Decoding is different: Pillow releases the GIL while it decodes and encodes,
so `threads` > 1 decodes that many images at once; the order, and so the shard's bytes, stay
those of the plan.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

from pipeline.config import StorageConfig
from pipeline.jpeg import MAX_PIXELS
from pipeline.sharding.remote import read_entries
from pipeline.sharding.sources import Entry
from pipeline.sharding.validate import Checked, check_image, clean_size

# (entry, bytes to store, (width, height), re-encoded) or (entry, None, rejection reason, False)
Image = tuple[Entry, "bytes | None", "tuple[int, int] | str", bool]


def checked_images(
    entries: Sequence[Entry],
    validation: str,
    max_side: int | None,
    threads: int = 1,
    max_pixels: int | None = MAX_PIXELS,
    cfg: StorageConfig | None = None,
) -> Iterator[Image]:
    """cfg: where entries on object storage are read from (remote.py)."""
    if validation == "decode" and threads > 1:
        yield from _decoded_in_threads(entries, max_side, threads, max_pixels, cfg)
        return
    structural = validation == "structural"
    for e, data in read_entries(entries, cfg):
        if isinstance(data, OSError):
            yield e, None, f"unreadable: {data}", False
            continue
        # Clean JPEGs, nearly every image, are checked here; the rest go through Pillow.
        size = clean_size(data, max_side, max_pixels) if structural else None
        if size is not None:
            yield e, data, size, False
        else:
            yield _result(e, check_image(data, validation, max_side, max_pixels))


def _result(e: Entry, c: Checked) -> Image:
    if c.jpeg is None:
        return e, None, c.reason, False
    return e, c.jpeg, (c.width, c.height), c.reencoded


def _decoded_in_threads(entries, max_side, threads, max_pixels, cfg) -> Iterator[Image]:
    from concurrent.futures import ThreadPoolExecutor

    # Files are read here, in order; a bounded window of decodes runs ahead of the writer.
    window: deque = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="mfm-decode") as pool:
        for e, data in read_entries(entries, cfg):
            if isinstance(data, OSError):
                window.append((e, f"unreadable: {data}"))
            else:
                window.append((e, pool.submit(check_image, data, "decode", max_side, max_pixels)))
            if len(window) >= 4 * threads:
                yield _done(*window.popleft())
        while window:
            yield _done(*window.popleft())


def _done(e: Entry, pending) -> Image:
    if isinstance(pending, str):
        return e, None, pending, False
    return _result(e, pending.result())
