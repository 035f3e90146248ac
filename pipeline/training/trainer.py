"""One training process: a DeepSpeed engine around MFMModel and a short loop.

Started by `pipeline.training.launcher` (never directly by users) as
`python -m pipeline.training.trainer --config-b64 ...` with RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set, locally or by the DeepSpeed launcher on every node.
A "step" is one optimizer step: grad_accum micro batches on every rank.

Over the ~400-line guide (about 700): the Trainer's loop, logging, pictures, validation and
resume share one state, and build_trainer is its start-up; the stage-specific parts already
live in `Task` (pretraining here, fine-tuning in pipeline/finetune.py).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import Config, ConfigError, build_config, dump_config
from pipeline.processes import available_cpus, die_with_parent
from pipeline.training import checkpoint as ckpt
from pipeline.training import flops, speed
from pipeline.training.optim import (
    BatchPlan,
    DeviceClip,
    batch_plan,
    build_optimizer,
    build_scheduler,
    device_clips,
    scaled_lrs,
    step_budget,
)
from pipeline.training.profiling import StepProfiler
from pipeline.training.saver import Saver

log = logging.getLogger("mfm.train")
EXIT_NON_FINITE = 3
EXIT_CHECKPOINT = 4  # the checkpoint to resume from was refused (damaged, altered, unsafe)
EXIT_LOST_PEER = 5  # another rank went away (killed, frozen, unreachable): rerun to resume


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, loss: float, last_good: str | None, seen: int | None = None):
        self.step, self.loss, self.last_good = step, loss, last_good
        late = f" (read at step {seen}: the loss is read on log steps)" if seen and seen != step else ""
        what = f"non-finite loss {loss}" if not math.isfinite(loss) else "non-finite loss or gradient norm"
        super().__init__(
            f"{what} at step {step}{late}; stopped without saving. Last good checkpoint: {last_good or 'none'}"
        )


def resolve_precision(precision: str, cuda: bool) -> str:
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    # DeepSpeed's CPU accelerator has bf16 (slow, but it runs the GPU's configuration), not fp16
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a GPU; use fp32, bf16 or auto on CPU")
    return precision


def deepspeed_config(cfg: Config, plan: BatchPlan, precision: str) -> dict:
    """The engine's config. Ordinary steps read nothing on the host (see device_clips): the
    trainer clips (DeviceClip), ZeRO-1/2 skip their own norm (compute_grad_norm) and bf16 its
    overflow check, which reads a flag every step (stage_1_and_2.py:3248); a non-finite step is
    caught by the trainer's meter at the next log step instead of being skipped. bf16 without
    ZeRO runs under DeepSpeed's torch autocast: its bf16 weights would go to FP16_UnfusedOptimizer,
    which reads an overflow flag per parameter every step (runtime/utils.py:293)."""
    stage = cfg.train.zero_stage
    own_clip = device_clips(stage, precision)
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # export gathers fp32 itself
    if own_clip and stage in (1, 2):
        zero["compute_grad_norm"] = False
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": 0.0 if own_clip else cfg.optim.clip_grad or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16" and stage > 0, "check_grad_overflow": False},
        "torch_autocast": {"enabled": precision == "bf16" and stage == 0, "dtype": "bfloat16"},
        # loss_scale 0: dynamic loss scaling, the only safe fp16 choice for a new model
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def initialize(model, optimizer, cfg: Config, plan: BatchPlan, precision: str) -> tuple[object, DeviceClip | None]:
    """The DeepSpeed engine, and the trainer's clipping where it clips (device_clips)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, plan, precision))
    if not device_clips(cfg.train.zero_stage, precision):
        return engine, None
    return engine, DeviceClip(engine, optimizer, cfg.optim.clip_grad, cfg.train.zero_stage)


def optimizer_step(engine, clip: DeviceClip | None, boundary: bool):
    """engine.step() after a micro batch's backward; at the accumulation boundary, the grad norm
    of the step (a device tensor, or whatever the engine gives: a float, None)."""
    norm = clip.norm() if boundary and clip is not None else None
    engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
    if boundary and clip is None:
        norm = engine.get_global_grad_norm()
    return norm


def import_function(spec: str, key: str):
    module, sep, name = spec.partition(":")
    if not sep:
        raise ConfigError(f"{key}={spec!r} must look like module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}={spec!r}: {e}") from e


def _pretrain_model(cfg: Config):
    from pipeline.models import build_model

    model = build_model(cfg.model, cfg.corruption)
    if cfg.pretrain.init:
        from pipeline.training.warm_start import warm_start

        warm_start(model, cfg)  # pinned by the launcher; a resumed run's checkpoint then overrides it
    return model


def _pretrain_loader(cfg: Config, **kw):
    return import_function(cfg.train.loader, "train.loader")(cfg, **kw)


def _pretrain_optimizer(model, cfg: Config, lr: float):
    return build_optimizer(model, cfg.optim, lr)


def compute_dtype(engine) -> torch.dtype:
    """The dtype of the engine's weights: bf16 / fp16 engines hold half-precision weights, and
    the loaders yield float32."""
    return next(engine.module.parameters()).dtype


def _pretrain_forward(engine, batch):
    return engine(batch.encoder_input.to(compute_dtype(engine)), batch.target, batch.keep)


def _pretrain_val_batch(cfg: Config, ranks: Ranks, size: int):
    """One batch of data.val per rank (evaluation views), corrupted once with a fixed seed."""
    from pipeline import storage
    from pipeline.corruptions import corrupt, denormalize
    from pipeline.data import Batch, build_eval_loader

    if not cfg.data.val or not storage.exists(storage.join(cfg.data.val, "manifest.json"), cfg.storage):
        return None
    loader = build_eval_loader(
        cfg, cfg.data.val, rank=ranks.rank, world_size=ranks.world_size, batch_size=size, device="cpu"
    )
    images = next(iter(loader), (None,))[0]
    if images is None or len(images) == 0:
        return None
    g = torch.Generator().manual_seed(cfg.train.seed * 7919 + ranks.rank)
    # The eval loader hands out normalised images; the corruptions work on [0, 1] pixels.
    views = denormalize(images).clamp_(0, 1)
    return Batch(*(None if t is None else t.to(ranks.device) for t in corrupt(views, cfg.corruption, g)))


def _pretrain_finish(trainer: Trainer) -> dict:
    return {"export": ckpt.export(trainer.engine, trainer.cfg, trainer.folder, rank=trainer.ranks.rank)}


@dataclass(frozen=True)
class Task:
    """What a run trains, as the few pieces that differ between stages; the defaults are MFM
    pretraining, `pipeline.finetune.task` gives fine-tuning. The loop, DeepSpeed, checkpoints,
    resume and logs are the same for every task."""

    build_model: Callable = _pretrain_model  # (cfg) -> nn.Module
    build_loader: Callable = _pretrain_loader  # (cfg, *, rank, world_size, micro_batch, device) -> resumable loader
    build_optimizer: Callable = _pretrain_optimizer  # (model, cfg, lr) -> torch optimizer
    forward: Callable = _pretrain_forward  # (engine, batch) -> (loss, prediction)
    finish: Callable = _pretrain_finish  # (trainer) -> dict merged into fit()'s result (collective)
    pictures: bool = True  # the pretext pictures (input / corrupted / prediction)
    val_batch: Callable | None = None  # (cfg, ranks, micro_batch) -> a fixed batch for `forward`, or None


PRETRAIN = Task(val_batch=_pretrain_val_batch)


@dataclass
class Ranks:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed(timeout_s: float | None = None) -> Ranks:
    """Join the process group. `timeout_s` bounds every collective and barrier: a rank whose
    peer froze (a hung node keeps its sockets open) fails after it instead of waiting forever."""
    import deepspeed

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    # DeepSpeed picks the backend of its accelerator: NCCL on GPUs, gloo on CPU.
    kw = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(verbose=False, **kw)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Ranks(dist.get_rank(), local_rank, dist.get_world_size(), device)


def bound_group_timeouts(timeout_s: float) -> None:
    """Give every process group the default group's timeout. DeepSpeed's own groups (ZeRO's
    data-parallel group carries the gradient all-reduce) are created without one, and torch then
    gives them its 30-minute default: a frozen peer would hold the survivors that long."""
    timeout = timedelta(seconds=timeout_s)
    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # torch < 2.10
    for group in list(dist.distributed_c10d._world.pg_map):
        set_timeout(timeout, group)


def lost_peer(e: BaseException) -> bool:
    """A collective failed because another rank went away (killed: its sockets closed; frozen:
    the timeout ran out), not because of this rank's own code."""
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("gloo/transport", "NCCL communicator was aborted"))
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class StepStats:
    """Accumulates timing between two log lines."""

    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    waiting: float = 0.0

    def reset(self):
        self.steps = self.images = 0
        self.seconds = self.waiting = 0.0


@dataclass
class Trainer:
    cfg: Config
    ranks: Ranks
    plan: BatchPlan
    engine: object
    scheduler: object
    loader: object
    folder: ckpt.RunFolder
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    last_checkpoint: str | None = None
    writer: object = None
    val_batch: object = None  # fixed inputs (and masks): its loss moves only with the model
    stats: StepStats = field(default_factory=StepStats)
    task: Task = PRETRAIN
    compiled: bool = False
    meter: speed.StepMeter | None = None  # device-side sums, read on log steps
    reading: speed.Reading | None = None  # the latest read
    flop_model: object = None  # meta copy of the model until the first batch gives FLOPs per image
    peak: flops.Peak | None = None  # rank 0: the measured matmul peak
    speed: flops.Speed | None = None
    profiler: StepProfiler | None = None
    saver: Saver | None = None  # checkpoints; the upload of the latest may still be in flight
    clip: DeviceClip | None = None  # the trainer's gradient clipping (None: DeepSpeed's)

    @property
    def is_main(self) -> bool:
        return self.ranks.rank == 0

    def _batches(self):
        # The loader yields the rest of its current epoch per iteration, then moves on.
        while True:
            yield from self.loader

    def client_state(self) -> dict:
        return {
            "step": self.step,
            "loader": self.loader.state_dict(),
            "rng": ckpt.rng_state(),
            "scheduler": self.scheduler.state_dict(),
        }

    def restore(self, step: int) -> None:
        client = ckpt.load(
            self.engine,
            self.folder,
            step,
            rank=self.ranks.rank,
            local_rank=self.ranks.local_rank,
            allow_unverified=self.cfg.train.allow_unverified_checkpoints,
        )
        self.step = int(client["step"])
        self.loader.load_state_dict(client["loader"])
        self.scheduler.load_state_dict(client["scheduler"])
        self.scheduler.step_update(self.step)
        if client["rng"] is None:  # saved by another number of ranks: a fresh stream per (rank, step)
            from pipeline.data.sampling import mix_seed

            seed_everything(mix_seed(self.cfg.train.seed, self.step, self.ranks.rank))
        else:
            ckpt.set_rng_state(client["rng"])
        self.last_checkpoint = self.folder.step_url(step)

    def save(self) -> None:
        """Collective; returns once step-N is written locally, its upload goes on meanwhile."""
        url = self.saver.save(
            self.engine,
            self.step,
            self.client_state(),
            extra={"zero_stage": self.cfg.train.zero_stage, "model": self.cfg.model.name},
        )
        if self.is_main:
            log.info("checkpoint %s written locally, completing in the background", url)

    def wait_checkpoints(self) -> None:
        """Collective: the checkpoint in flight is complete."""
        self.last_checkpoint = self.saver.wait() or self.last_checkpoint

    def is_log_step(self, step: int) -> bool:
        """The steps that read the device: logs, checkpoints (so that a non-finite loss is seen
        before one is written) and the last."""
        cfg = self.cfg.train
        return step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step == self.total_steps

    def train_step(self, batches) -> tuple[float | None, object]:
        """grad_accum micro batches and one optimizer step; returns (on log steps the mean loss
        over ranks and the steps since the last log step, else None; the last batch and
        prediction, for pictures). Ordinary steps neither sync with the device nor talk to
        the other ranks beyond DeepSpeed's own gradient reduction."""
        engine, losses, waited, norm = self.engine, [], 0.0, None
        start = time.perf_counter()
        for i in range(self.plan.grad_accum):
            t = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t
            if self.flop_model is not None:
                self.count_flops(batch)
            with speed.compile_errors(self.compiled):
                loss, pred = self.task.forward(engine, batch)
                engine.backward(loss)
            norm = optimizer_step(engine, self.clip, boundary=i == self.plan.grad_accum - 1)
            losses.append(loss.detach())
        self.step += 1
        self.meter.add(torch.stack(losses).float().mean(), norm, self.step)
        self.scheduler.step_update(self.step)
        self.profiler.after_step(self.step)
        self.stats.steps += 1
        self.stats.images += self.plan.global_batch
        self.stats.seconds += time.perf_counter() - start
        self.stats.waiting += waited
        if not self.is_log_step(self.step):
            return None, (batch, pred)
        self.reading = self.meter.read()
        return self.reading.loss, (batch, pred)

    def count_flops(self, batch) -> None:
        """Rank 0, first batch: FLOPs per image on the meta copy, then the run's speed row."""
        meta, self.flop_model = self.flop_model, None
        if not self.is_main:
            return
        try:
            step_flops = flops.count_step_flops(meta, batch, self.task.forward)
        except Exception as e:  # a model the meta device cannot run: train on, without MFU
            log.warning("FLOPs per image could not be counted, so no TFLOP/s or MFU is logged: %r", e)
            return
        self.speed = flops.Speed.of(step_flops / len(batch[0]), self.peak, self.ranks.device)
        self.log_row({"step": self.step, **self.speed.row(), "time": time.time()})
        self.writer.add_text("perf/speed", json.dumps(self.speed.row()), self.step)
        log.info(
            "%.1f GFLOP per image (forward + backward); MFU against the datasheet's %s TFLOP/s, "
            "matmul utilization against the measured %.1f TFLOP/s (%s)",
            self.speed.flops_per_image / 1e9,
            self.speed.datasheet_tflops or "(unknown device: no MFU)",
            self.speed.peak_tflops,
            self.speed.peak_source,
        )

    @torch.no_grad()
    def validate(self) -> float | None:
        """Collective: loss on the fixed val batch, pooled over ranks (None without one)."""
        total = torch.zeros(2, dtype=torch.float64, device=self.ranks.device)
        if self.val_batch is not None:
            self.engine.eval()
            loss, _ = self.task.forward(self.engine, self.val_batch)
            self.engine.train()
            n = len(self.val_batch[0])
            total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=total.device)
        dist.all_reduce(total)
        return (total[0] / total[1]).item() if total[1] > 0 else None

    def log_row(self, row: dict) -> None:
        with open(self.folder.local / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def log_step(self, loss: float, val_loss: float | None = None) -> None:
        s = self.stats
        grad_norm = self.reading.grad_norm if self.reading else None
        row = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "loss": loss,
            "lr": self.engine.optimizer.param_groups[-1]["lr"],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "images_per_s": s.images / s.seconds if s.seconds else None,
            "data_wait": s.waiting / s.seconds if s.seconds else None,
            "time": time.time(),
        }
        row.update(self.perf_figures(row["images_per_s"]))
        if val_loss is not None:
            row["val_loss"] = val_loss
        s.reset()
        self.log_row(row)
        for key, tag in (
            ("loss", "train/loss"),
            ("val_loss", "val/loss"),
            ("lr", "train/lr"),
            ("grad_norm", "train/grad_norm"),
            ("images_per_s", "perf/images_per_s"),
            ("data_wait", "perf/data_wait_share"),
            ("tflops", "perf/tflops_per_device"),
            ("mfu", "perf/mfu"),
            ("matmul_utilization", "perf/matmul_utilization"),
            ("peak_memory_gib", "perf/peak_memory_gib"),
        ):
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], self.step)
        log.info(
            "step %d/%d loss %.4f lr %.3g grad_norm %s %.1f img/s data wait %.0f%%",
            self.step,
            self.total_steps,
            loss,
            row["lr"],
            "-" if row["grad_norm"] is None else f"{row['grad_norm']:.3f}",
            row["images_per_s"] or 0,
            100 * (row["data_wait"] or 0),
        )

    def perf_figures(self, images_per_s: float | None) -> dict:
        """Achieved TFLOP/s per device, MFU (datasheet peak), matmul utilization (measured peak)
        and peak memory (see pipeline.training.flops)."""
        if self.speed is None:
            return {}
        per_device = images_per_s / self.ranks.world_size if images_per_s else None
        return {
            **self.speed.figures(per_device),
            "peak_memory_gib": flops.peak_memory_gib(self.ranks.device),
        }

    def picture(self, batch, pred) -> None:
        from pipeline.pictures import save_picture

        path = self.folder.local / "pictures" / f"step-{self.step}.png"
        fig = save_picture(path, batch.target, batch.encoder_input, pred, step=self.step, keep=batch.keep)
        self.writer.add_figure("pictures", fig, self.step, close=True)

    def fit(self) -> dict:
        from tqdm import tqdm

        from pipeline import logs

        cfg = self.cfg.train
        batches = self._batches()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            file=logs.console(),
            disable=not (self.is_main and logs.console().isatty()),
        )
        try:
            if self.step == 0:
                val_loss = self.validate()
                if self.is_main and val_loss is not None:
                    self.log_row({"step": 0, "val_loss": val_loss, "time": time.time()})
                    self.writer.add_scalar("val/loss", val_loss, 0)
            while self.step < self.total_steps:
                loss, (batch, pred) = self.train_step(batches)
                # a non-finite grad norm too: DeviceClip passes it on to the weights
                if loss is not None and (not math.isfinite(loss) or self.reading.first_non_finite is not None):
                    self.wait_checkpoints()  # the last good one
                    bad = self.reading.first_non_finite or self.step
                    raise NonFiniteLoss(bad, loss, self.last_checkpoint, seen=self.step)
                bar.update(1)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                checkpoint = self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps
                val_loss = self.validate() if checkpoint else None
                if self.is_main:
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps or val_loss is not None:
                        self.log_step(loss, val_loss)
                    if self.task.pictures and self.step % cfg.picture_every == 0:
                        self.picture(batch, pred)
                    if loss is not None:  # a log step: TensorBoard's file is written then, not every step
                        self.writer.flush()
                if checkpoint:
                    self.save()
            self.wait_checkpoints()
        finally:
            bar.close()
            self.profiler.close()
        return {"step": self.step, "checkpoint": self.last_checkpoint, **self.task.finish(self)}


def _truncate_metrics(path, step: int) -> None:
    """A killed run may have logged past its last checkpoint; those rows are redone."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def build_trainer(cfg: Config, ranks: Ranks, task: Task = PRETRAIN) -> Trainer:
    from torch.utils.tensorboard import SummaryWriter

    plan = batch_plan(cfg, ranks.world_size)
    precision = resolve_precision(cfg.train.precision, ranks.device.type == "cuda")
    folder = ckpt.run_folder(cfg.train.run_dir, cfg.storage)
    if ranks.rank == 0:
        ckpt.remove_incomplete(folder)
    dist.barrier()
    resume_step = ckpt.latest_complete(folder)
    if resume_step is None and ranks.local_rank == 0:
        ckpt.reset_mirror(folder)
    dist.barrier()

    # The same seed everywhere so that every rank builds the same initial model (ZeRO-3
    # partitions it without a broadcast), then a per-rank seed for everything after.
    seed_everything(cfg.train.seed)
    model = task.build_model(cfg).to(ranks.device)
    seed_everything(cfg.train.seed + 1000 * ranks.rank + 1)
    flop_model = flops.meta_copy(model)  # before compile and DeepSpeed change the model
    compiled = speed.prepare_model(model, cfg, ranks.device)

    loader = task.build_loader(
        cfg, rank=ranks.rank, world_size=ranks.world_size, micro_batch=plan.micro_batch, device=ranks.device
    )
    steps_per_epoch = loader.steps_per_epoch // plan.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"data.train yields {loader.steps_per_epoch} micro batches per rank per epoch, fewer "
            f"than train.grad_accum ({plan.grad_accum}): use a smaller data.batch_size"
        )
    budget = step_budget(cfg.optim, cfg.train.max_steps, steps_per_epoch)
    total = budget.steps

    lrs = scaled_lrs(cfg.optim, plan.global_batch)
    optimizer = task.build_optimizer(model, cfg, lrs.lr)
    scheduler = build_scheduler(optimizer, cfg.optim, lrs, steps_per_epoch, budget)
    engine, clip = initialize(model, optimizer, cfg, plan, precision)
    bound_group_timeouts(cfg.train.dist_timeout_s)

    trainer = Trainer(
        cfg,
        ranks,
        plan,
        engine,
        scheduler,
        loader,
        folder,
        steps_per_epoch,
        total,
        task=task,
        val_batch=task.val_batch(cfg, ranks, plan.micro_batch) if task.val_batch else None,
        compiled=compiled,
        meter=speed.StepMeter(ranks.device),
        flop_model=flop_model,
        peak=flops.measure_peak(ranks.device) if ranks.rank == 0 else None,
        saver=Saver(folder, rank=ranks.rank, local_rank=ranks.local_rank, keep_last=cfg.train.keep_last),
        clip=clip,
    )
    if resume_step is not None:
        if ranks.rank == 0:
            ckpt.sync_logs_down(folder)
            _truncate_metrics(folder.local / "metrics.jsonl", resume_step)
        trainer.restore(resume_step)
    trainer.profiler = StepProfiler(
        cfg.train.profile_steps,
        folder.local / "profile",
        start_step=trainer.step,
        rank=ranks.rank,
        cuda=ranks.device.type == "cuda",
    )
    if ranks.rank == 0:
        from pipeline import storage

        storage.write_bytes(storage.join(folder.url, "config.yaml"), dump_config(cfg).encode(), cfg.storage)
        # purge_step drops events a killed run wrote after its last checkpoint.
        trainer.writer = SummaryWriter(
            str(folder.local / "tensorboard"), purge_step=trainer.step + 1 if resume_step is not None else None
        )
        log.info(
            "%s: %d ranks, micro batch %d x grad_accum %d = %d, zero %d, %s, %s, lr %.3g, %d steps/epoch, "
            "%s at step %d of %d (set by %s)",
            cfg.train.run_dir,
            ranks.world_size,
            plan.micro_batch,
            plan.grad_accum,
            plan.global_batch,
            cfg.train.zero_stage,
            precision,
            "compiled" if compiled else "eager",
            lrs.lr,
            steps_per_epoch,
            "resuming" if resume_step is not None else "starting",
            trainer.step,
            total,
            budget.source,
        )
    return trainer


def run(cfg: Config, task: Task = PRETRAIN) -> dict:
    ranks = init_distributed(cfg.train.dist_timeout_s)
    trainer = build_trainer(cfg, ranks, task)
    try:
        result = trainer.fit()
    finally:
        if trainer.writer is not None:
            trainer.writer.close()
    if ranks.local_rank == 0:  # fit() ends in collectives: every rank of this node is done with it
        ckpt.remove_mirror(trainer.folder)
    if ranks.rank == 0:
        log.info("done: %s", json.dumps(result))
    return result


def threads_per_rank() -> None:
    """Without OMP_NUM_THREADS, share this node's cores among its ranks (its hostfile slots), as
    `mfm pretrain` does on one machine: the DeepSpeed launcher sets nothing on remote hosts and
    torch would give every rank all the cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = available_cpus()
    # torchrun sets LOCAL_WORLD_SIZE, DeepSpeed's launch.py LOCAL_SIZE
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    threads = max(1, cores // local)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for processes started later (loader workers)
    torch.set_num_threads(threads)
    log.info("OMP_NUM_THREADS unset: %d threads per rank (%d cores / %d ranks on this node)", threads, cores, local)


def encode_config(cfg: Config) -> str:
    return base64.urlsafe_b64encode(json.dumps(cfg.model_dump(mode="json")).encode()).decode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pipeline.training.trainer")
    p.add_argument("--config-b64", required=True, help="the resolved config (launcher-made)")
    p.add_argument("--local_rank", type=int, help="set by the DeepSpeed launcher; LOCAL_RANK wins")
    p.add_argument("--task", help="module:function, (cfg) -> Task (default: MFM pretraining)")
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    from pipeline import logs

    logs.setup_rank(rank)  # the pipeline's lines to the terminal, third-party output to the log file
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    threads_per_rank()
    cfg = build_config(json.loads(base64.urlsafe_b64decode(args.config_b64)))
    try:
        run(cfg, import_function(args.task, "--task")(cfg) if args.task else PRETRAIN)
    except NonFiniteLoss as e:
        if rank == 0:
            log.error("%s", e)
        return EXIT_NON_FINITE
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except ckpt.CheckpointError as e:
        if rank == 0:
            log.error("%s", e)
        return EXIT_CHECKPOINT
    except Exception as e:
        if not lost_peer(e):
            raise
        log.error(
            "lost contact with another rank (%s): a node died, froze or lost its network, so the run "
            "stops on every node. Rerun the same command(s) to resume from the newest complete "
            "checkpoint in %s (a frozen peer is given up on after train.dist_timeout_s=%g s)",
            str(e).splitlines()[0][:400],
            cfg.train.run_dir,
            cfg.train.dist_timeout_s,
        )
        # Exit now: the group is broken and nothing is left to save, while the interpreter's
        # teardown (a full GC of the model, engine and traceback frames) took ~8 s here.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EXIT_LOST_PEER)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # torchrun and DeepSpeed's launcher start ranks in sessions of their own: killing a node's
    # launcher (or its process group) would leave the rank alive, holding its peers in a
    # collective. Killing is safe: a checkpoint only counts once its COMPLETE marker is written.
    die_with_parent()
    sys.exit(main())
