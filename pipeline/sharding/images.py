"""A shard's images read and checked, in plan order.

Structural checks run inline: they are a few microseconds of Python, which threads cannot
share (the GIL). Decoding is different: Pillow releases the GIL while it decodes and encodes,
so `threads` > 1 decodes that many images at once; the order, and so the shard's bytes, stay
those of the plan.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

from pipeline.jpeg import MAX_PIXELS
from pipeline.sharding.sources import Entry, read_entry
from pipeline.sharding.validate import Checked, check_image, clean_size

# (entry, bytes to store, (width, height), re-encoded) or (entry, None, rejection reason, False)
Image = tuple[Entry, "bytes | None", "tuple[int, int] | str", bool]


def checked_images(
    entries: Sequence[Entry],
    validation: str,
    max_side: int | None,
    threads: int = 1,
    max_pixels: int | None = MAX_PIXELS,
) -> Iterator[Image]:
    handles: dict = {}
    try:
        if validation == "decode" and threads > 1:
            yield from _decoded_in_threads(entries, max_side, threads, handles, max_pixels)
            return
        structural = validation == "structural"
        for e in entries:
            try:
                data = read_entry(e, handles)
            except OSError as err:
                yield e, None, f"unreadable: {err}", False
                continue
            # Clean JPEGs, nearly every image, are checked here; the rest go through Pillow.
            size = clean_size(data, max_side, max_pixels) if structural else None
            if size is not None:
                yield e, data, size, False
            else:
                yield _result(e, check_image(data, validation, max_side, max_pixels))
    finally:
        for f in handles.values():
            f.close()


def _result(e: Entry, c: Checked) -> Image:
    if c.jpeg is None:
        return e, None, c.reason, False
    return e, c.jpeg, (c.width, c.height), c.reencoded


def _decoded_in_threads(entries, max_side, threads, handles, max_pixels) -> Iterator[Image]:
    from concurrent.futures import ThreadPoolExecutor

    # Files are read here, in order; a bounded window of decodes runs ahead of the writer.
    window: deque = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="mfm-decode") as pool:
        for e in entries:
            try:
                window.append((e, pool.submit(check_image, read_entry(e, handles), "decode", max_side, max_pixels)))
            except OSError as err:
                window.append((e, f"unreadable: {err}"))
            if len(window) >= 4 * threads:
                yield _done(*window.popleft())
        while window:
            yield _done(*window.popleft())


def _done(e: Entry, pending) -> Image:
    if isinstance(pending, str):
        return e, None, pending, False
    return _result(e, pending.result())
