"""The paper's optimisation (shared/MFM_SPEC.md section 5) from timm's and DeepSpeed's pieces."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from pipeline.config import Config, ConfigError, OptimConfig


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    world_size: int
    grad_accum: int


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    """Split data.batch_size (global) into micro batches; it must divide exactly so that the
    lr scaling and the sample count per step are what the config says."""
    ga = cfg.train.grad_accum
    if cfg.data.batch_size % (world_size * ga):
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) must be divisible by world size ({world_size}) "
            f"x train.grad_accum ({ga}) = {world_size * ga}"
        )
    return BatchPlan(cfg.data.batch_size, cfg.data.batch_size // (world_size * ga), world_size, ga)


@dataclass(frozen=True)
class LearningRates:
    lr: float
    warmup_lr: float
    min_lr: float


def scaled_lrs(optim: OptimConfig, global_batch: int) -> LearningRates:
    """Linear scaling rule: every lr of the recipe is given for lr_base_batch images."""
    scale = global_batch / optim.lr_base_batch
    return LearningRates(optim.base_lr * scale, optim.warmup_lr * scale, optim.min_lr * scale)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names the model asks to exempt (ViT: pos_embed, cls_token)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def build_optimizer(
    model: nn.Module, optim: OptimConfig, lr: float, layer_decay: float | None = None
) -> torch.optim.AdamW:
    """AdamW; no weight decay on 1-D params, biases and the model's no_weight_decay() names.

    With `layer_decay` (fine-tuning), timm's layer-wise groups: group "layer i" of a model with L
    blocks gets lr_scale = layer_decay ** (L + 1 - i) (embeddings i = 0, head L + 1), which
    timm's schedulers multiply into every lr they set; 1.0 gives every group scale 1."""
    if layer_decay is not None:
        groups = param_groups_layer_decay(
            model, optim.weight_decay, sorted(no_weight_decay_names(model)), layer_decay=layer_decay
        )
    else:
        groups = param_groups_weight_decay(model, optim.weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    # fused: one kernel launch for every parameter instead of a few per tensor; CUDA only.
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)


@dataclass(frozen=True)
class StepBudget:
    steps: int  # optimiser steps the run takes
    schedule: int  # steps the cosine spans (>= steps: a run cut short stops inside its schedule)
    warmup: int
    source: str  # what set `steps`: "train.max_steps" or "optim.epochs"


def step_budget(optim: OptimConfig, max_steps: int | None, steps_per_epoch: int) -> StepBudget:
    """The run's length. An explicit train.max_steps wins over optim.epochs x steps_per_epoch:
    shorter, the run stops inside the epochs' schedule (as a resumable cut); longer, the schedule
    is stretched to max_steps and the warmup keeps its share of it."""
    epochs_steps = optim.epochs * steps_per_epoch
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    if not max_steps:
        return StepBudget(epochs_steps, epochs_steps, warmup, "optim.epochs")
    if max_steps <= epochs_steps:
        return StepBudget(max_steps, epochs_steps, warmup, "train.max_steps")
    return StepBudget(max_steps, max_steps, int(max_steps * optim.warmup_epochs / optim.epochs), "train.max_steps")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    optim: OptimConfig,
    lrs: LearningRates,
    steps_per_epoch: int,
    budget: StepBudget | None = None,
) -> CosineLRScheduler:
    """Per-iteration cosine over the budget's schedule (default: all `epochs`) with a linear
    warmup, as the official code (SimMIM's scheduler): step it with step_update(step) after
    every optimiser step."""
    budget = budget or step_budget(optim, None, steps_per_epoch)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=budget.schedule,
        lr_min=lrs.min_lr,
        warmup_lr_init=lrs.warmup_lr,
        warmup_t=budget.warmup,
        cycle_limit=1,
        t_in_epochs=False,
    )
    # Without warmup the constructor leaves the optimizer's lr as given, so step 1 would run
    # without the groups' lr_scale (layer decay); setting step 0 now applies it.
    scheduler.step_update(0)
    return scheduler


def device_clips(zero_stage: int, precision: str) -> bool:
    """Whether the trainer measures and clips the gradient norm itself (DeviceClip) rather than
    DeepSpeed: ZeRO 0-2 in fp32 or bf16. DeepSpeed's own clipping reads the norm on the host
    every step (`is_invalid_grad_norm`, deepspeed/runtime/zero/stage_1_and_2.py:3043 and :3203;
    fp32 ZeRO-0 through runtime/utils.py's clip_grad_norm_). ZeRO-3 keeps DeepSpeed's: it reads
    once a step whatever the config (runtime/zero/stage3.py:2888), and on several ranks its
    parameter-order checks read more (runtime/zero/utils.py:90, :110); fp16 too, whose loss
    scaling has to see every overflow."""
    return zero_stage <= 2 and precision in ("fp32", "bf16")


class DeviceClip:
    """optim.clip_grad as torch's clip_grad_norm_ does it (foreach, non-finite norms passed
    through, never raised), on the device: no host read. `norm()` at the accumulation boundary,
    between the last backward and engine.step(), takes the global norm of the gradients the
    optimizer is about to use; a step pre-hook on the wrapped torch optimizer then scales them.

    ZeRO-0: the module's gradients, already all-reduced. ZeRO-1/2: DeepSpeed's own device-side
    norm of its gradient partitions (`scaled_global_norm`, all-reduced over ranks, no read),
    which steps one parameter group at a time: the hook scales each group as it comes. A
    non-finite norm makes the step non-finite; the trainer stops at the next log step."""

    def __init__(self, engine, optimizer: torch.optim.Optimizer, max_norm: float | None, zero_stage: int):
        self.engine, self.max_norm, self.zero_stage = engine, max_norm, zero_stage
        self.total: torch.Tensor | None = None
        if max_norm:
            optimizer.register_step_pre_hook(self._clip)

    def norm(self) -> torch.Tensor:
        if self.zero_stage == 0:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            total = torch.nn.utils.get_total_norm(grads, foreach=True)
        else:
            zero = self.engine.optimizer
            total = zero.scaled_global_norm() / zero.loss_scale
            # DeepSpeed reports a non-finite group norm as -1
            total = torch.where(total < 0, torch.full_like(total, float("nan")), total)
        self.total = total.float()
        return self.total

    def _clip(self, optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.total is not None and params:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, self.total.to(params[0].device), foreach=True)
