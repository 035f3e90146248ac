"""The DALI backend: one graph, built by the same code on a CPU and a GPU (only the devices differ),
with no Python function inside it, on DALI's dynamic executor.

Feeding: DALI's parallel external_source in batch mode. Its callable (BatchSource) runs in DALI's
worker processes, `data.workers` of them (each dies with the process that built the pipeline):
call i returns batch start + i of the rank's plan, read through the shards' .idx and
header-checked (augment.image_size) before DALI sees a byte, so the exactly-once plan, the
corrupt-sample replacement and resume are the torch backend's, whichever worker a batch lands
on. DALI returns the batches in call order.

Graph: decoders.image_slice decodes only each sample's crop window ("mixed" on a GPU, with the
hardware JPEG decoder taking `data.dali_hw_decoder_load` of the batch; EXIF ignored), resize
(bicubic, antialiased) to S x S, crop_mirror_normalize flips and scales to float CHW in [0, 1].
The crop window, flip and corruption seed are augment.sample_params', as in the torch backend.

Hand-over (HandOver): a thread of its own runs the pipeline one batch ahead and takes its outputs
without a copy, so the training thread only takes finished batches. The corruption runs beside
DALI (Corruption): on a GPU on its own CUDA stream, one batch ahead, so it overlaps the training
step; the consumer's stream waits on an event, never the device. Design: docs/data-gpu.md.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.util
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.augment import corrupt_samples, corruption_threads, sample_draws, torch_threads
from pipeline.data.reading import raw_batches
from pipeline.data.sampling import Layout, Mix, SamplerState, Segment, rank_plan
from pipeline.data.shards import SampleReader, Split
from pipeline.processes import die_with_parent

log = logging.getLogger(__name__)
MAX_FAILURES = 3
# what BatchSource returns per batch: the encoded bytes (one array per sample), then the per-sample
# parameters as one (B, 7) int64 array with these columns, then the skip messages (pack_notes)
PARAMS = ("left", "top", "width", "height", "flip", "seed", "id")
OUTPUTS = ("encoded", "params", "skipped")


@dataclass(frozen=True)
class LaterEpochs:
    """The rank's plan of a later epoch (a fresh one on `layout`), computed where it is needed:
    in each DALI worker process, once per epoch."""

    counts: tuple[int, ...]
    seed: int
    layout: Layout
    rank: int
    shuffle_buffer: int
    mix: Mix | None = None  # data.train as a list of sources

    def __call__(self, epoch: int) -> np.ndarray:
        state = SamplerState(seed=self.seed, epoch=epoch, segments=[Segment(self.layout)])
        return rank_plan(list(self.counts), state, self.rank, shuffle_buffer=self.shuffle_buffer, mix=self.mix)


@dataclass
class BatchSource:
    """DALI's parallel external_source callable: (DALI epoch k, iteration i) -> batch start + i of
    epoch `epoch + k` as per-sample lists; StopIteration past the plan's end. DALI epoch 0 is
    `plan` from `start` (a resumed epoch may be on an earlier layout's remainder), later ones
    `later(epoch + k)` from 0. Any worker process can take any batch (see `raw`); each batch is
    header-checked before DALI sees it."""

    split: Split
    cfg: Config
    plan: np.ndarray
    start: int
    epoch: int
    later: LaterEpochs | None = None

    def plan_of(self, k: int) -> tuple[np.ndarray, int]:
        if k == 0:
            return self.plan, self.start
        if getattr(self, "_cached", (None,))[0] != k:
            self._cached = (k, self.later(self.epoch + k))
        return self._cached[1], 0

    def raw(self, k: int, j: int):
        """Batch j of DALI epoch k, read and header-checked (reading.RawBatch), from this process's
        stream of reader j % W's batches (the torch backend's reader, kept across calls): DALI
        hands its workers the next batch whichever is free, so a process keeps a stream per
        reader and skips ahead in it over batches another process took. Remote shards go
        through the local shard cache (the loader sees to one), downloaded there once per
        machine whichever process asks first, so the store serves each shard once per epoch."""
        plan, _ = self.plan_of(k)
        w = self.later.layout.workers if self.later is not None else max(1, self.cfg.data.workers)
        streams = self.__dict__.setdefault("_streams", {})
        if any(s[0] != k for s in streams.values()):  # a new DALI epoch: the old streams are done
            for s in streams.values():
                s[2].close()
            streams.clear()
        stream = streams.get(j % w)
        if stream is None or stream[1] > j:
            if stream is not None:
                stream[2].close()
            d = self.cfg.data
            if "_reader" not in self.__dict__:
                self._reader = SampleReader(
                    self.split,
                    self.cfg.storage,
                    prefetch=d.prefetch_shards,
                    cache_dir=d.cache_dir,
                    cache_limit_gb=d.cache_limit_gb,
                )
            batches = raw_batches(
                self.split,
                plan,
                range(j, len(plan), w),
                self._reader,
                seed=self.cfg.train.seed,
                epoch=self.epoch + k,
                scale=tuple(d.crop_scale),
                max_pixels=d.max_pixels,
            )
            stream = streams[j % w] = [k, j, batches]
        while True:
            raw = next(stream[2])
            stream[1] = raw.index + w
            if raw.index == j:
                return raw

    def __getstate__(self) -> dict:
        # a spawned worker gets the source without this process's streams
        return {key: v for key, v in self.__dict__.items() if key not in ("_streams", "_reader")}

    def __call__(self, info) -> tuple:
        k, i = (info.epoch_idx, info.iteration) if hasattr(info, "epoch_idx") else (0, info)
        plan, start = self.plan_of(k)
        if start + i >= len(plan):
            raise StopIteration
        raw = self.raw(k, start + i)
        return (
            [np.frombuffer(b, dtype=np.uint8) for b in raw.data],
            np.array(
                [
                    [q.left, q.top, q.width, q.height, int(q.flip), q.corruption_seed, g]
                    for q, g in zip(raw.params, raw.ids)
                ],
                np.int64,
            ),
            pack_notes(raw.skipped, len(raw.ids)),
        )


def pack_notes(notes: list[str], batch: int) -> np.ndarray:
    """A batch's skip messages (which hold shard and sample names: any text) as one dense (batch, k)
    uint8 array of ASCII JSON, NUL-padded: DALI takes a dense array as one piece, where a list
    costs a feed per sample."""
    data = json.dumps(notes).encode() if notes else b""
    k = -(-len(data) // batch)
    return np.frombuffer(data.ljust(batch * k, b"\0"), np.uint8).reshape(batch, k)


def unpack_notes(packed: np.ndarray) -> list[str]:
    data = packed.tobytes().rstrip(b"\0")
    return json.loads(data) if data else []


# nvJPEG's buffers for ImageNet's largest JPEGs (NVIDIA's ResNet-50 example): a budget for the whole
# decoder, shared among its threads. DALI preallocates the paddings per thread (one device buffer,
# two pinned host ones), so passing these as they are would take 2.4 GiB of device and 3.1 GiB of
# pinned host memory per rank at 12 threads; a thread whose image needs more grows its buffer once.
DEVICE_PADDING = 211025920
HOST_PADDING = 140544512


def decoder_paddings(threads: int) -> dict:
    """The mixed decoder's per-thread paddings: the budget divided among `threads`, at least
    DALI's own per-thread defaults (16 MiB device, 8 MiB host)."""
    n = max(1, threads)
    return dict(
        device_memory_padding=max(16 << 20, DEVICE_PADDING // n), host_memory_padding=max(8 << 20, HOST_PADDING // n)
    )


def views(
    encoded,
    anchor,
    shape,
    flip,
    *,
    size: int,
    downscale: str,
    gpu: bool,
    hw_decoder_load: float,
    threads: int = 1,
    fancy_upsampling: bool = True,
):
    """The graph from encoded bytes to float (3, S, S) views in [0, 1]; `gpu` picks the devices,
    `threads` is the pipeline's (the decoder's buffers are per thread)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    decoder = (
        # fancy upsampling: the chroma upsampling of libjpeg-turbo (DALI's CPU decoder and Pillow)
        dict(
            device="mixed",
            hw_decoder_load=hw_decoder_load,
            jpeg_fancy_upsampling=fancy_upsampling,
            **decoder_paddings(threads),
        )
        if gpu
        else dict(device="cpu")
    )
    # EXIF orientation ignored, as Pillow and the torch backend do: the crop window is drawn from
    # the stored size (augment.sample_params), and ImageNet-style training has always read the
    # stored pixels (torchvision, timm); honouring it here alone would rotate the window
    images = fn.decoders.image_slice(
        encoded, anchor, shape, axis_names="WH", output_type=types.RGB, adjust_orientation=False, **decoder
    )
    images = fn.resize(
        images,
        resize_x=size,
        resize_y=size,
        antialias=True,
        mag_filter=types.INTERP_CUBIC,
        min_filter=types.INTERP_LINEAR if downscale == "bilinear" else types.INTERP_CUBIC,
    )
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3, std=[255.0] * 3, mirror=flip
    )


def start_method() -> str:
    """DALI's worker processes fork, unless the CUDA driver is up in this process: DALI refuses to
    fork then (its own check, `_multiproc/pool.py`), and the driver is up long before torch's
    CUDA state is (`torch.cuda.is_available()` alone runs cuInit). Spawned workers cost an
    interpreter start and the imports each, once per pipeline."""
    from nvidia.dali import backend

    return "spawn" if backend.IsDriverInitialized() else "fork"


class InWorkers:
    """`source` as DALI's worker processes hold it: each worker dies with the process (the thread)
    that built the pipeline. A forked worker sets that up right after the fork (multiprocessing's
    after-fork hook, run before DALI's worker loop), a spawned one when it unpickles the source."""

    def __init__(self, source):
        self.source, self.parent, self.thread = source, os.getpid(), threading.get_ident()
        multiprocessing.util.register_after_fork(self, InWorkers._forked)

    def _forked(self) -> None:
        # the hook runs in every multiprocessing child forked while this lives: act only in those
        # this process forked from the pipeline's thread (DALI's workers), not in one forked by a
        # thread that may end sooner, nor in a grandchild
        parent = multiprocessing.parent_process()
        if parent is not None and parent.pid == self.parent and threading.get_ident() == self.thread:
            die_with_parent(self.parent)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        die_with_parent(self.parent)

    def __call__(self, info):
        return self.source(info)


def build_pipeline(cfg: Config, batch_size: int, source, *, workers: int, device: torch.device):
    """The pipeline over `source` (a BatchSource): outputs the views (on the GPU for a CUDA
    device), the (B, 7) parameters and the packed skip notes (CPU). Build it on a thread that
    lives as long as it: its workers die with that thread."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    d = cfg.data
    threads = max(1, workers)

    # exec_pipelined + exec_async with an int prefetch depth: DALI 2.4's dynamic executor, whose
    # outputs stay valid while referenced (Corruption.receive takes them without a copy)
    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=index,
        exec_pipelined=True,
        exec_async=True,
        prefetch_queue_depth=2,
        py_num_workers=threads,
        py_start_method=start_method(),
    )
    def pipe():
        encoded, params, skipped = fn.external_source(
            source=InWorkers(source),
            num_outputs=len(OUTPUTS),
            batch=True,
            batch_info=True,
            parallel=True,
            # batches read ahead by the workers: enough to keep them all busy
            prefetch_queue_depth=max(2, workers),
            dtype=[types.UINT8, types.INT64, types.UINT8],
        )
        col = {name: i for i, name in enumerate(PARAMS)}
        out = views(
            encoded,
            fn.cast(params[col["left"] : col["top"] + 1], dtype=types.INT32),
            fn.cast(params[col["width"] : col["height"] + 1], dtype=types.INT32),
            fn.cast(params[col["flip"]], dtype=types.INT32),
            size=cfg.model.img_size,
            downscale=d.downscale,
            gpu=gpu,
            hw_decoder_load=d.dali_hw_decoder_load,
            threads=threads,
            fancy_upsampling=d.dali_fancy_upsampling,
        )
        return out, params, skipped

    p = pipe()
    p.build()
    return p


class Corruption:
    """The hand-over of each batch: DALI's views into torch, then corrupt_samples.

    receive() takes the views without a copy (DLPack, as DALI's own PyTorch iterator does on the
    dynamic executor, whose outputs are not recycled while referenced). On a CUDA device submit()
    queues the corruption on a stream of its own, behind the consumer's current stream, and
    returns at once; take() makes the consumer's stream wait on the batch's event (no host or
    device-wide sync). The views stay referenced until that corruption has run (an event query,
    never a wait): DALI's output buffers, and torch's caching allocator, may reuse freed memory
    before a side stream has read it. On a CPU the same calls, without streams."""

    def __init__(self, cfg: Config, device: torch.device, workers: int = 1):
        self.cfg, self.device = cfg, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.reading: list[tuple] = []  # (event, views) of corruptions that may still read DALI's views
        self.threads = corruption_threads(max(1, workers))  # DALI's workers and threads: max(1, workers) each

    def receive(self, tl) -> torch.Tensor:
        return torch.from_dlpack(tl.as_tensor())

    def submit(self, views: torch.Tensor, seeds: list[int], draws: torch.Tensor | None = None, *, synced=False):
        """The corruption of `views`, queued; `synced`: the views are complete as seen from the host
        (DALI's outputs, run() without a stream), else made on the consumer's current stream."""
        if self.stream is None:
            with torch_threads(self.threads):
                return corrupt_samples(views, self.cfg.corruption, seeds, draws), None
        self.reading = [(e, v) for e, v in self.reading if not e.query()]
        # waiting on the consumer's stream would wait for the training step queued there
        ready = None if synced else torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.stream):
            if ready is not None:
                self.stream.wait_event(ready)
            out = corrupt_samples(views, self.cfg.corruption, seeds, draws)
            done = self.stream.record_event()
        self.reading.append((done, views))
        return out, done

    def take(self, pending) -> tuple:
        out, done = pending
        if done is None:
            return out
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(done)
        for t in out:
            if t is not None:
                t.record_stream(consumer)  # made on the side stream, freed after the consumer's use
        return out


@dataclass
class Ready:
    """A batch of DALI's as the hand-over thread passes it on."""

    index: int
    views: torch.Tensor
    params: np.ndarray  # (B, 7): PARAMS
    skipped: list[str]
    draws: torch.Tensor | None


class HandOver:
    """Runs the pipeline on a thread of its own, one batch ahead of the consumer: DALI's run (which
    feeds its external source from the workers' shared memory, and on a GPU waits for the batch),
    the outputs into torch and numpy, the corruption's per-sample draws; then, after the epoch's
    last batch, the run that reports its end and the reset. The training thread only takes the
    results. get() returns a Ready, an Exception that DALI raised on that batch, "stopped" (DALI
    ended early) or, after the last batch, "end" or "past" (DALI ran past the plan)."""

    def __init__(self, pipe, corruption: Corruption, first: int, end: int):
        self.pipe, self.corruption, self.first, self.end = pipe, corruption, first, end
        self.results: queue.Queue = queue.Queue(maxsize=1)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dali-hand-over", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.results.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        try:
            if self.corruption.device.type == "cuda":  # a new thread starts on device 0
                torch.cuda.set_device(self.corruption.device)
            for j in range(self.first, self.end):
                try:
                    views, params, notes = self.pipe.run()
                except StopIteration:
                    self._put("stopped")
                    return
                except RuntimeError as e:
                    self._put(e)  # a failed pipeline is not run again
                    return
                p = np.array(params.as_tensor())
                draws = sample_draws(self.corruption.cfg.corruption, p[:, PARAMS.index("seed")])
                item = Ready(j, self.corruption.receive(views), p, unpack_notes(np.array(notes.as_tensor())), draws)
                if not self._put(item):
                    return
            try:
                self.pipe.run()
                self._put("past")
            except StopIteration:
                self.pipe.reset()
                self._put("end")
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(e)

    def get(self):
        return self.results.get()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


class Runner:
    """A built pipeline and the (epoch, batch) its next run returns. The loader keeps it across
    epochs: the next epoch continues on the same worker processes (DALI's epoch k + 1, after a
    reset), so neither the pipeline nor its workers are started again. A consumer that stops
    mid-epoch leaves it elsewhere than the loader's state: the loader then builds a new one."""

    # batches corrupted ahead of the one handed over on a CPU: none (nothing to overlap there);
    # a test sets 1 to run the GPU's hand-over order on a CPU
    cpu_ahead = 0

    def __init__(self, source: BatchSource, cfg: Config, *, workers: int, device: torch.device):
        self.cfg, self.workers, self.device = cfg, workers, device
        self.corruption = Corruption(cfg, device, workers)
        self.failures = 0  # DALI failures in a row
        self._build(source)

    def _build(self, source: BatchSource) -> None:
        # on the consumer's thread, never the hand-over thread: the workers die with the thread
        # that starts them
        self.source = source
        self.pipe = build_pipeline(self.cfg, source.plan.shape[1], source, workers=self.workers, device=self.device)
        self.k, self.next = 0, source.start  # DALI epoch, next batch of it

    def expects(self, epoch: int, start: int) -> bool:
        return self.pipe is not None and self.source.epoch + self.k == epoch and self.next == start

    def close(self) -> None:
        self.pipe = None

    def _fallback(self, plan, j: int) -> dict:
        """Batch j through the torch backend's path (Pillow decodes, each sample that fails is
        skipped and counted); the pipeline is rebuilt after a failure, at the next batch."""
        from pipeline.data.torch_backend import PretextBatches

        raw = self.source.raw(self.k, j)
        out = PretextBatches(self.cfg)(raw)
        views = out["views"].to(self.device, non_blocking=True).float().div_(255)
        seeds = [q.corruption_seed for q in raw.params]
        return {
            "index": j,
            "skipped": raw.skipped,
            "ids": torch.tensor(raw.ids),
            "corrupted": self.corruption.submit(views, seeds),
        }

    def _next(self, feed: HandOver, plan, j: int) -> dict:
        """Batch j from the hand-over thread, or from the fallback when DALI failed on it."""
        url = self.source.split.url
        got = feed.get()
        if isinstance(got, Ready):
            ids = got.params[:, PARAMS.index("id")]
            if got.index != j or not np.array_equal(ids, plan[j]):  # DALI returns call order: a guard
                raise RuntimeError(f"{url}: DALI returned samples {ids.tolist()} for batch {j}")
            self.next, self.failures = j + 1, 0
            seeds = got.params[:, PARAMS.index("seed")].tolist()
            return {
                "index": j,
                "skipped": got.skipped,
                "ids": torch.from_numpy(ids),
                "corrupted": self.corruption.submit(got.views, seeds, got.draws, synced=True),
            }
        if got == "stopped":
            raise RuntimeError(f"{url}: DALI stopped before batch {j}")
        if not isinstance(got, RuntimeError):
            raise got
        self.failures += 1
        # fresh pipelines failing again and again: not a bad sample (an error may surface one
        # batch early, on the batch before the bad one: two in a row are still samples)
        if self.failures >= MAX_FAILURES:
            raise RuntimeError(
                f"{url}: DALI failed on {self.failures} batches in a row, up to batch {j}: {got}"
            ) from got
        log.warning("%s: DALI failed on batch %d (%s); decoding it with Pillow", url, j, got)
        b = self._fallback(plan, j)
        self.close()  # a failed pipeline is not run again
        return b

    def batches(self, plan: np.ndarray, epoch: int, start: int) -> Iterator[dict]:
        """Batches start.. of `plan` (epoch `epoch`), each corrupted as it is handed over; on a
        GPU the next batch's corruption is queued before this one is yielded (it runs during the
        training step)."""
        ahead = 1 if self.device.type == "cuda" else self.cpu_ahead
        feed = HandOver(self.pipe, self.corruption, start, len(plan))
        pending: list[dict] = []
        done = False
        try:
            for j in range(start, len(plan) + ahead):
                if j < len(plan):
                    pending.append(self._next(feed, plan, j))
                if len(pending) > ahead or (j >= len(plan) and pending):
                    b = pending.pop(0)
                    enc, target, keep = self.corruption.take(b.pop("corrupted"))
                    yield {**b, "encoder_input": enc, "target": target, "keep": keep}
                if self.pipe is None and j + 1 < len(plan):
                    # the rest of the epoch on a fresh pipeline, from batch j + 1
                    feed.stop()
                    src = self.source
                    self._build(BatchSource(src.split, src.cfg, plan, j + 1, epoch, src.later))
                    feed = HandOver(self.pipe, self.corruption, j + 1, len(plan))
            # the epoch is over: DALI's next run has reported it, and a reset started the next one
            if self.pipe is not None and self.next == len(plan):
                end = feed.get()
                if end == "past":
                    raise RuntimeError(f"{self.source.split.url}: DALI ran past the end of epoch {epoch}")
                if isinstance(end, BaseException):
                    raise end
                self.k, self.next = self.k + 1, 0
            done = True
        finally:
            feed.stop()
            if not done:  # the hand-over thread may have run ahead of what was taken
                self.close()
