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


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, lrs: LearningRates, steps_per_epoch: int
) -> CosineLRScheduler:
    """Per-iteration cosine over all `epochs` with a linear warmup, as the official code
    (SimMIM's scheduler): step it with step_update(step) after every optimiser step."""
    total = optim.epochs * steps_per_epoch
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total,
        lr_min=lrs.min_lr,
        warmup_lr_init=lrs.warmup_lr,
        warmup_t=int(optim.warmup_epochs * steps_per_epoch),
        cycle_limit=1,
        t_in_epochs=False,
    )
    # Without warmup the constructor leaves the optimizer's lr as given, so step 1 would run
    # without the groups' lr_scale (layer decay); setting step 0 now applies it.
    scheduler.step_update(0)
    return scheduler
