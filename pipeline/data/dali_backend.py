"""The DALI backend: reader threads feed encoded bytes and per-sample params through
fn.external_source; DALI decodes only the crop window (decoders.image_slice, "mixed" on a GPU).
On a GPU DALI resizes it bicubic, flips, scales to float CHW [0, 1] and runs the pretext
corruption as a torch python function over pipeline.corruptions.corrupt; on a CPU a python
function resizes (torch's uint8 kernels) and flips (_views_cpu), and the corruption runs as
each batch is taken (_corrupt_cpu) while DALI decodes ahead.

The crop windows, flips and corruption seeds are the ones the torch backend uses
(pipeline.data.augment.sample_params), so both backends agree up to decoder/resize rounding
and a resumed run reproduces its batches exactly.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.augment import corrupt_samples, resize_uint8
from pipeline.data.reading import RawBatch, raw_batches
from pipeline.data.sampling import reader_batches
from pipeline.data.shards import SampleReader, Split

_DONE = object()


def _views_cpu(windows, flips, *, size: int, downscale: str):
    """python_function body (CPU): the decoded crop windows (HWC uint8, ragged) -> resized and
    flipped uint8 (3, S, S). torch's antialiased uint8 resize (augment.resize_uint8) costs a third
    of Pillow's CPU time (DALI's float CPU resize costs twice Pillow's) and matches the torch
    backend's Pillow resize to +-2 levels. The corruption runs on the consumer's side
    (_corrupt_cpu): DALI copies what a python function returns, and uint8 views are a ninth of the
    bytes of the float encoder input, target and mask, and a python function runs one batch at a
    time."""
    views = torch.empty((len(windows), 3, size, size), dtype=torch.uint8)
    with _torch_threads(1):  # one image is too little to share out: more threads would only spin
        for i, (window, flip) in enumerate(zip(windows, flips)):
            view = resize_uint8(torch.from_numpy(np.asarray(window)), size, downscale)
            views[i] = view.flip(-1) if int(flip) else view
    return list(views.numpy())


@contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads for the calling thread (the setting is per thread, and the default
    of threads started later: restored on exit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _corrupt_cpu(views: torch.Tensor, seeds: list[int], cfg: Config, threads: int):
    """The corruption of a CPU batch, on `threads` torch threads: the cores DALI's decoding threads,
    which run on meanwhile, leave (more only wait for each other on a busy CPU)."""
    with _torch_threads(threads):
        return corrupt_samples(views.float().div_(255), cfg.corruption, seeds)


def _corrupt_gpu(images, seeds, *, cfg):
    """torch_python_function body (GPU): lists of CUDA tensors in and out."""
    seeds = torch.stack(list(seeds)).cpu().tolist()  # one device sync for the batch
    enc, target, keep = corrupt_samples(torch.stack(list(images)), cfg.corruption, [int(s) for s in seeds])
    keep = keep if keep is not None else torch.zeros(len(images), 1, 1, device=enc.device)
    return list(enc), list(target), list(keep)


def build_pipeline(cfg: Config, batch_size: int, source, *, num_threads: int, device: torch.device):
    """source() -> the next batch as lists (encoded, anchor, shape, flip, and on a GPU seed); StopIteration
    ends it."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device.type == "cuda"
    size = cfg.model.img_size
    if gpu:
        # torch_python_function runs in the pipeline's thread: the classic synchronous executor
        index = device.index if device.index is not None else torch.cuda.current_device()
        executor = dict(device_id=index, exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
    else:
        # the dynamic executor runs python functions too, and overlaps the corruption of one batch
        # with the decoding of the next
        executor = dict(device_id=None, exec_dynamic=True, prefetch_queue_depth=2)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, **executor)
    def pipe():
        # the CPU path corrupts outside DALI: its source has no seeds
        dtypes = [types.UINT8, types.INT32, types.INT32, types.INT32] + ([types.INT64] if gpu else [])
        inputs = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, dtype=dtypes)
        encoded, anchor, shape, flip = inputs[:4]
        images = fn.decoders.image_slice(
            encoded, anchor, shape, device="mixed" if gpu else "cpu", output_type=types.RGB, axis_names="WH"
        )
        if not gpu:
            return fn.python_function(
                images,
                flip,
                batch_processing=True,
                function=partial(_views_cpu, size=size, downscale=cfg.data.downscale),
            )
        images = fn.resize(
            images,
            resize_x=size,
            resize_y=size,
            antialias=True,
            mag_filter=types.INTERP_CUBIC,
            min_filter=types.INTERP_LINEAR if cfg.data.downscale == "bilinear" else types.INTERP_CUBIC,
        )
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3, std=[255.0] * 3, mirror=flip
        )
        from nvidia.dali.plugin.pytorch.fn import torch_python_function

        # a GPU function takes GPU inputs only: the seeds go up too
        return tuple(
            torch_python_function(
                images,
                inputs[4].gpu(),
                function=partial(_corrupt_gpu, cfg=cfg),
                num_outputs=3,
                batch_processing=True,
                device="gpu",
            )
        )

    p = pipe()
    p.build()
    return p


def _inputs(raw: RawBatch) -> tuple[list, ...]:
    return (
        [np.frombuffer(d, dtype=np.uint8) for d in raw.data],
        [np.array([q.left, q.top], np.int32) for q in raw.params],
        [np.array([q.width, q.height], np.int32) for q in raw.params],
        [np.array(int(q.flip), np.int32) for q in raw.params],
        [np.array(q.corruption_seed, np.int64) for q in raw.params],
    )


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    # no copy: the CPU views are made float before the next run (and the dynamic executor gives each
    # run fresh buffers, owned by the returned objects, in any case)
    return torch.from_numpy(np.asarray(tl.as_tensor()))


def _reader_thread(out: queue.Queue, stop: threading.Event, batches) -> None:
    try:
        for raw in batches:
            while not stop.is_set():
                try:
                    out.put(raw, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        out.put(_DONE)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
        out.put(e)


def iterate(
    split: Split, cfg: Config, plan, start: int, readers: int, epoch: int, *, device: torch.device
) -> Iterator[dict]:
    """Batches start.. of the plan; reader thread r reads the batches of reader r."""
    if start >= len(plan):
        return
    d = cfg.data
    queues = [queue.Queue(maxsize=2) for _ in range(readers)]
    stop = threading.Event()
    threads = []
    for r in range(readers):
        sr = SampleReader(split, cfg.storage, prefetch=d.prefetch_shards, cache_dir=d.cache_dir)
        batches = raw_batches(
            split,
            plan,
            reader_batches(len(plan), start, readers, r),
            sr,
            seed=cfg.train.seed,
            epoch=epoch,
            scale=tuple(d.crop_scale),
            max_pixels=d.max_pixels,
        )
        t = threading.Thread(
            target=_reader_thread, args=(queues[r], stop, batches), daemon=True, name=f"dali-reader-{r}"
        )
        t.start()
        threads.append(t)
    fed: deque[RawBatch] = deque()  # batches handed to DALI, in order, awaiting their outputs
    nxt = [start]

    def source():
        if nxt[0] >= len(plan):
            raise StopIteration
        raw = queues[(nxt[0] - start) % readers].get()
        if isinstance(raw, BaseException):
            raise raw
        if raw is _DONE:
            raise RuntimeError(f"{split.url}: a reader ended before batch {nxt[0]}")
        nxt[0] += 1
        fed.append(raw)
        return _inputs(raw) if device.type == "cuda" else _inputs(raw)[:4]

    p = build_pipeline(cfg, plan.shape[1], source, num_threads=max(1, d.workers), device=device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores - max(1, d.workers))
    try:
        for j in range(start, len(plan)):
            try:
                outs = p.run()
            except StopIteration:
                raise RuntimeError(f"{split.url}: DALI stopped before batch {j}") from None
            except RuntimeError as e:
                ids = fed[0].ids if fed else "?"
                raise RuntimeError(f"{split.url}: DALI failed on batch {j} (sample ids {ids}): {e}") from e
            raw = fed.popleft()
            if device.type == "cuda":
                enc, target, keep = (_to_torch(o, device) for o in outs)
            else:
                enc, target, keep = _corrupt_cpu(
                    _to_torch(outs[0], device), [q.corruption_seed for q in raw.params], cfg, threads
                )
            yield {
                "encoder_input": enc,
                "target": target,
                "keep": keep if cfg.corruption.kind == "mfm" else None,
                "index": raw.index,
                "skipped": raw.skipped,
                "ids": torch.tensor(raw.ids),
            }
    finally:
        stop.set()
        del p
