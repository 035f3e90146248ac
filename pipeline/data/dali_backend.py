"""The DALI backend: one graph, built by the same code on a CPU and a GPU (only the devices differ),
with no Python function inside it, on DALI's pipelined asynchronous executor.

Feeding: DALI's parallel external_source in batch mode. Its callable (BatchSource) runs in DALI's
worker processes, `data.workers` of them: call i returns batch start + i of the rank's plan, read
through the shards' .idx and header-checked (augment.image_size) before DALI sees a byte, so the
exactly-once plan, the corrupt-sample replacement and resume are the torch backend's, whichever
worker a batch lands on. DALI returns the batches in call order.

Graph: decoders.image_slice decodes only each sample's crop window ("mixed" on a GPU, with the
hardware JPEG decoder taking `data.dali_hw_decoder_load` of the batch), resize (bicubic,
antialiased) to S x S, crop_mirror_normalize flips and scales to float CHW in [0, 1]. The crop
window, flip and corruption seed are augment.sample_params', as in the torch backend.

The corruption runs beside DALI (Corruption): on a GPU on its own CUDA stream, one batch ahead,
so it overlaps the training step; the consumer's stream waits on an event, never the device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.augment import corrupt_samples
from pipeline.data.reading import raw_batches
from pipeline.data.sampling import Layout, Mix, SamplerState, Segment, rank_plan
from pipeline.data.shards import SampleReader, Split

log = logging.getLogger(__name__)
# what BatchSource returns per sample, in order: encoded bytes, crop anchor (x, y), crop shape
# (w, h), flip, corruption seed, sample id, and the batch's skip messages (on its first sample)
MAX_FAILURES = 3
OUTPUTS = ("encoded", "anchor", "shape", "flip", "seed", "id", "skipped")


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

    def __call__(self, info) -> tuple[list, ...]:
        k, i = (info.epoch_idx, info.iteration) if hasattr(info, "epoch_idx") else (0, info)
        plan, start = self.plan_of(k)
        if start + i >= len(plan):
            raise StopIteration
        raw = self.raw(k, start + i)
        note = "\n".join(raw.skipped).encode()
        return (
            [np.frombuffer(b, dtype=np.uint8) for b in raw.data],
            [np.array([q.left, q.top], np.int32) for q in raw.params],
            [np.array([q.width, q.height], np.int32) for q in raw.params],
            [np.array(int(q.flip), np.int32) for q in raw.params],
            [np.array(q.corruption_seed, np.int64) for q in raw.params],
            [np.array(g, np.int64) for g in raw.ids],
            [np.frombuffer(note if n == 0 else b"", dtype=np.uint8) for n in range(len(raw.ids))],
        )


def views(encoded, anchor, shape, flip, *, size: int, downscale: str, gpu: bool, hw_decoder_load: float):
    """The graph from encoded bytes to float (3, S, S) views in [0, 1]; `gpu` picks the devices."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    decoder = (
        # fancy upsampling: the chroma upsampling of libjpeg-turbo (DALI's CPU decoder and Pillow)
        # paddings: NVIDIA's ResNet-50 example's, so that ImageNet's largest JPEGs cause no
        # reallocation in nvJPEG mid-epoch
        dict(
            device="mixed",
            hw_decoder_load=hw_decoder_load,
            jpeg_fancy_upsampling=True,
            device_memory_padding=211025920,
            host_memory_padding=140544512,
        )
        if gpu
        else dict(device="cpu")
    )
    images = fn.decoders.image_slice(encoded, anchor, shape, axis_names="WH", output_type=types.RGB, **decoder)
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
    """DALI's worker processes fork, unless CUDA is up in this process (a forked child cannot use
    it, and DALI refuses): then they are spawned, which costs an interpreter start each."""
    return "spawn" if torch.cuda.is_initialized() else "fork"


def build_pipeline(cfg: Config, batch_size: int, source, *, workers: int, device: torch.device):
    """The pipeline over `source` (a BatchSource): outputs the views (on the GPU for a CUDA
    device), then the seeds, ids and skip notes (CPU)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    d = cfg.data
    dtypes = [types.UINT8, types.INT32, types.INT32, types.INT32, types.INT64, types.INT64, types.UINT8]

    @pipeline_def(
        batch_size=batch_size,
        num_threads=max(1, workers),
        device_id=index,
        exec_pipelined=True,
        exec_async=True,
        prefetch_queue_depth=2,
        py_num_workers=max(1, workers),
        py_start_method=start_method(),
    )
    def pipe():
        encoded, anchor, shape, flip, seed, ids, skipped = fn.external_source(
            source=source,
            num_outputs=len(OUTPUTS),
            batch=True,
            batch_info=True,
            parallel=True,
            # batches read ahead by the workers: enough to keep them all busy
            prefetch_queue_depth=max(2, workers),
            dtype=dtypes,
        )
        out = views(
            encoded,
            anchor,
            shape,
            flip,
            size=cfg.model.img_size,
            downscale=d.downscale,
            gpu=gpu,
            hw_decoder_load=d.dali_hw_decoder_load,
        )
        return out, seed, ids, skipped

    p = pipe()
    p.build()
    return p


class Corruption:
    """The hand-over of each batch: DALI's views into torch, then corrupt_samples.

    On a CUDA device, off the consumer's stream: receive() copies the views out of DALI's buffer
    on a copy stream, submit() queues the corruption on a stream of its own behind that copy and
    returns at once, take() makes the consumer's current stream wait on the batch's event (no
    host or device-wide sync) and hands the tensors to that stream. release() waits on the host
    for the last copy alone (one device-to-device copy): DALI may overwrite its buffer once run
    again, and it cannot see our streams. On a CPU the same calls, without streams."""

    def __init__(self, cfg: Config, device: torch.device, workers: int = 1):
        self.cfg, self.device = cfg, device
        gpu = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if gpu else None
        self.copy_stream = torch.cuda.Stream(device) if gpu else None
        self.copied = None  # the event of the copy the next submit() waits on
        self.last_copy = None  # the event of the last copy out of DALI, until release()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = max(1, cores - max(1, workers))

    def receive(self, tl) -> torch.Tensor:
        if self.stream is None:
            # a copy: the corruption of a CPU batch may outlive the next run's buffers
            return torch.from_numpy(np.array(tl.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        with torch.cuda.stream(self.copy_stream):
            out = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(t, out, cuda_stream=self.copy_stream)  # ordered after DALI's work on it
            self.copied = self.last_copy = self.copy_stream.record_event()
        return out

    def release(self) -> None:
        if self.last_copy is not None:
            self.last_copy.synchronize()
            self.last_copy = None

    def submit(self, views: torch.Tensor, seeds: list[int]):
        if self.stream is None:
            # on the cores DALI's workers and threads leave: more torch threads only spin at
            # barriers on a busy CPU (2 threads: 2.3 -> 5.4 CPU ms per 224 px image, measured)
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                return corrupt_samples(views, self.cfg.corruption, seeds), None
            finally:
                torch.set_num_threads(before)
        ready, self.copied = self.copied or torch.cuda.current_stream(self.device).record_event(), None
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            out = corrupt_samples(views, self.cfg.corruption, seeds)
            done = self.stream.record_event()
        views.record_stream(self.stream)  # not reused before the corruption has read it
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


def _column(tl) -> list[int]:
    return [int(np.asarray(tl[k])) for k in range(len(tl))]


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
        self.source = source
        self.pipe = build_pipeline(self.cfg, source.plan.shape[1], source, workers=self.workers, device=self.device)
        self.k, self.next = 0, source.start  # DALI epoch, next batch of it

    def expects(self, epoch: int, start: int) -> bool:
        return self.pipe is not None and self.source.epoch + self.k == epoch and self.next == start

    def close(self) -> None:
        self.pipe = None

    def _run(self, j: int):
        """The pipeline's outputs for batch j, or None when DALI failed on it."""
        self.corruption.release()
        try:
            out = self.pipe.run()
        except StopIteration:
            raise RuntimeError(f"{self.source.split.url}: DALI stopped before batch {j}") from None
        except RuntimeError as e:
            url = self.source.split.url
            self.failures += 1
            # fresh pipelines failing again and again: not a bad sample (an error may surface one
            # batch early, on the batch before the bad one: two in a row are still samples)
            if self.failures >= MAX_FAILURES:
                raise RuntimeError(
                    f"{url}: DALI failed on {self.failures} batches in a row, up to batch {j}: {e}"
                ) from e
            log.warning("%s: DALI failed on batch %d (%s); decoding it with Pillow", url, j, e)
            return None
        self.next, self.failures = j + 1, 0
        return out

    def _fallback(self, plan, j: int) -> dict:
        """Batch j through the torch backend's path (Pillow decodes, each sample that fails is
        skipped and counted); the pipeline is rebuilt after a failure, at the next batch."""
        from pipeline.data.torch_backend import PretextBatches

        raw = self.source.raw(self.k, j)
        out = PretextBatches(self.cfg)(raw)
        views = out["views"].to(self.device, non_blocking=True).float().div_(255)
        return {"index": j, "skipped": raw.skipped, "ids": torch.tensor(raw.ids), "views": views, "seeds": raw.params}

    def batches(self, plan: np.ndarray, epoch: int, start: int) -> Iterator[dict]:
        """Batches start.. of `plan` (epoch `epoch`), each corrupted as it is handed over; on a
        GPU the next batch's corruption is queued before this one is yielded (it runs during the
        training step)."""
        url = self.source.split.url
        ahead = 1 if self.device.type == "cuda" else self.cpu_ahead
        pending: list[dict] = []
        for j in range(start, len(plan) + ahead):
            if j < len(plan):
                out = self._run(j)
                if out is None:
                    b = self._fallback(plan, j)
                    seeds = [q.corruption_seed for q in b.pop("seeds")]
                    self.close()  # a failed pipeline is not run again
                    b["corrupted"] = self.corruption.submit(b.pop("views"), seeds)
                else:
                    views, seeds, ids, notes = out
                    ids = _column(ids)
                    if ids != plan[j].tolist():  # DALI hands batches back in call order: a guard
                        raise RuntimeError(f"{url}: DALI returned samples {ids} for batch {j}")
                    note = bytes(np.asarray(notes[0])).decode()
                    b = {
                        "index": j,
                        "skipped": note.split("\n") if note else [],
                        "ids": torch.tensor(ids),
                        "corrupted": self.corruption.submit(self.corruption.receive(views), _column(seeds)),
                    }
                pending.append(b)
            if len(pending) > ahead or (j >= len(plan) and pending):
                b = pending.pop(0)
                enc, target, keep = self.corruption.take(b.pop("corrupted"))
                yield {**b, "encoder_input": enc, "target": target, "keep": keep}
            if self.pipe is None:
                if j + 1 < len(plan):
                    # the rest of the epoch on a fresh pipeline, from batch j + 1
                    src = self.source
                    self._build(BatchSource(src.split, src.cfg, plan, j + 1, epoch, src.later))
        # the epoch is over: DALI's next run reports it, and a reset starts the next one
        if self.pipe is not None and self.next == len(plan):
            self.corruption.release()
            try:
                self.pipe.run()
                raise RuntimeError(f"{url}: DALI ran past the end of epoch {epoch}")
            except StopIteration:
                self.pipe.reset()
                self.k, self.next = self.k + 1, 0
