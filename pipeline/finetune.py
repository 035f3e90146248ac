"""`mfm finetune`: a classifier from a pretrained encoder (shared/MFM_SPEC.md section 5).

The run is a pretraining run with another `pipeline.training.trainer.Task`: the same launcher,
DeepSpeed engine, loop, `step-N/` checkpoints, resume and logs. What differs is here:
- the model: timm's classifier of the encoder's architecture (ViT: mean-pooled tokens through a
  new norm, `global_pool="avg", fc_norm=True`; drop path `model.drop_path`), with the encoder
  weights of `finetune.init` (an export folder URL or a registry ref `NAME@ALIAS` / `NAME@vN`);
- the data: a resumable labelled loader whose per-sample transform is timm's training transform
  (RandomResizedCrop bicubic, flip, RandAugment, normalise, RandomErasing), then timm's Mixup /
  CutMix with label smoothing on each micro batch and SoftTargetCrossEntropy;
- the optimiser: AdamW with timm's layer-wise lr decay groups (vit recipe), whose lr_scale
  timm's CosineLRScheduler multiplies into every lr it sets;
- the end: the classifier exported to `<run_dir>/export/` (model.safetensors + timm config.json
  with the head) and top-1/top-5 on data.val in `<run_dir>/metrics.json` (and export/metrics.json,
  which `mfm registry register` picks up).

Everything that can be known wrong (init, classes, recipe, val split) fails before a process starts.

Over the ~400-line guide: the fine-tuning Task's parts (model, loader, optimiser, forward,
finish) are read together as the recipe; the loop itself is the shared trainer's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline import storage
from pipeline.config import Config, ConfigError, build_config, load_config
from pipeline.registry import is_registry_ref
from pipeline.training.trainer import compute_dtype

log = logging.getLogger("mfm.finetune")
TASK = "pipeline.finetune:task"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METRICS_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- the init


def _registry(cfg: Config):
    from pipeline.registry import Registry, default_registry

    return Registry(cfg.finetune.registry or default_registry(), cfg.storage)


def started_from(cfg: Config) -> str | None:
    """The pinned init of a run that already has a complete checkpoint in train.run_dir: its
    weights come from there, so its lineage stays what it started from even if an alias moved."""
    import yaml

    fs, path = storage.filesystem(cfg.train.run_dir, cfg.storage)
    config_url = storage.join(cfg.train.run_dir, "config.yaml")
    if not fs.glob(f"{path}/step-*/COMPLETE") or not storage.exists(config_url, cfg.storage):
        return None
    return ((yaml.safe_load(storage.read_bytes(config_url, cfg.storage)) or {}).get("finetune") or {}).get("init")


def resolve_init(cfg: Config) -> tuple[str, dict]:
    """(pinned init, its timm config.json): a ref's alias becomes the version it points at now,
    so that every rank (and a later resume) loads the same weights."""
    from pipeline.registry import CONFIG, WEIGHTS, RegistryError
    from pipeline.registry.architecture import check_buildable, check_model_config

    def checked(url: str) -> dict:  # the init's config.json reaches timm.create_model: untrusted
        config = check_model_config(json.loads(storage.read_bytes(url, cfg.storage)), url)
        check_buildable(config, url)
        return config

    init = cfg.finetune.init
    if not init:
        raise ConfigError("finetune.init is not set: give an export folder URL or a registry ref NAME@ALIAS / NAME@vN")
    try:
        if is_registry_ref(init):
            reg = _registry(cfg)
            ref = reg.resolve(init)
            url = storage.join(reg.version_url(ref.name, ref.version), CONFIG)
            return str(ref), checked(url)
        for fname in (WEIGHTS, CONFIG):
            if not storage.exists(storage.join(init, fname), cfg.storage):
                raise ConfigError(
                    f"finetune.init={init!r}: no {fname} there (expected an export folder "
                    "with model.safetensors + config.json, or a registry ref NAME@ALIAS)"
                )
        return init, checked(storage.join(init, CONFIG))
    except (RegistryError, ValueError) as e:
        raise ConfigError(f"finetune.init={init!r}: {e}") from None


def read_init_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The encoder weights of the (pinned) init; a registry version is verified against its manifest."""
    from pipeline.registry import read_init_weights

    return read_init_weights(cfg.finetune.init, _registry(cfg), cfg.storage)


def train_classes(cfg: Config) -> list[dict]:
    from pipeline.config import single_train_split

    url = storage.join(single_train_split(cfg.data, "fine-tuning"), "manifest.json")
    if not storage.exists(url, cfg.storage):
        raise ConfigError(f"data.train={cfg.data.train!r}: no manifest.json there (shard the data first: mfm shard)")
    return list(json.loads(storage.read_bytes(url, cfg.storage)).get("classes") or [])


def prepare(cfg: Config, world_size: int | None = None) -> Config:
    """The config the ranks run: init pinned, model.* from the init's export, num_classes set.
    Raises ConfigError naming the key for anything that cannot work."""
    from pipeline.models import is_vit
    from pipeline.training.optim import batch_plan

    ft = cfg.finetune
    before = started_from(cfg)
    if before and before != ft.init:
        log.warning(
            "%s continues from finetune.init=%s (recorded at its start), not %s", cfg.train.run_dir, before, ft.init
        )
        cfg = cfg.model_copy(update={"finetune": ft.model_copy(update={"init": before})})
        ft = cfg.finetune
    init, export = resolve_init(cfg)
    arch = export.get("architecture")
    if not arch:
        raise ConfigError(f"finetune.init={ft.init!r}: its config.json names no architecture")
    args = export.get("model_args") or {}
    size = args.get("img_size") or ((export.get("pretrained_cfg") or {}).get("input_size") or [3, 224, 224])[-1]
    if ft.recipe == "vit" and not is_vit(arch):
        raise ConfigError(
            f"finetune.recipe='vit' but finetune.init={ft.init!r} is a {arch}: "
            "use finetune.recipe=resnet finetune.layer_decay=null (preset finetune_resnet50)"
        )
    if ft.recipe == "resnet" and is_vit(arch):
        raise ConfigError(
            f"finetune.recipe='resnet' but finetune.init={ft.init!r} is a ViT ({arch}): use finetune.recipe=vit"
        )
    num_classes = ft.num_classes or len(train_classes(cfg))
    if not num_classes:
        raise ConfigError(f"finetune.num_classes is not set and data.train={cfg.data.train!r} lists no classes")
    if not cfg.data.val:
        raise ConfigError("data.val is not set: fine-tuning ends with top-1/top-5 on the validation split")
    if not storage.exists(storage.join(cfg.data.val, "manifest.json"), cfg.storage):
        raise ConfigError(f"data.val={cfg.data.val!r}: no manifest.json there (shard the data first: mfm shard)")
    data = cfg.model_dump(mode="json")
    data["model"].update(
        name=arch,
        img_size=int(size),
        patch_size=args.get("patch_size"),
        timm_kwargs={k: v for k, v in args.items() if k not in ("img_size", "patch_size", "global_pool", "fc_norm")},
    )
    data["finetune"].update(init=init, num_classes=num_classes)
    out = build_config(data)
    plan = batch_plan(out, world_size or out.train.nprocs)
    if (ft.mixup > 0 or ft.cutmix > 0) and plan.micro_batch % 2:
        raise ConfigError(
            f"mixup/cutmix pair each sample with another of its micro batch: the micro batch "
            f"(data.batch_size {out.data.batch_size} / {plan.world_size} ranks / {plan.grad_accum}) "
            f"= {plan.micro_batch} must be even"
        )
    return out


# ---------------------------------------------------------------------------- the model


def classifier_args(cfg: Config) -> dict:
    """timm create_model keyword arguments of the classifier (exported as model_args)."""
    from pipeline.models import encoder_args, is_vit

    args = {k: v for k, v in encoder_args(cfg.model).items() if k not in ("num_classes", "drop_path_rate")}
    args["global_pool"] = cfg.finetune.global_pool
    if is_vit(cfg.model.name):
        args["fc_norm"] = cfg.finetune.fc_norm
    return args


def build_classifier(cfg: Config) -> nn.Module:
    import timm

    return timm.create_model(
        cfg.model.name,
        pretrained=False,
        num_classes=cfg.finetune.num_classes,
        drop_path_rate=cfg.model.drop_path,
        **classifier_args(cfg),
    )


def load_encoder(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load encoder weights into a classifier. Only the new head (and, with fc_norm, the new norm
    that replaces the encoder's final one) may be left out; anything else is an error."""
    head = model.pretrained_cfg.get("classifier") or "head"
    fresh = tuple(head) if isinstance(head, (list, tuple)) else (head,)
    replaced: tuple = ()
    if getattr(model, "fc_norm", None) is not None and not isinstance(model.fc_norm, nn.Identity):
        fresh += ("fc_norm",)
        replaced = ("norm",)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ (another patch size, width, image size)
        raise ValueError(f"encoder weights do not fit {type(model).__name__}: {e}") from None
    missing = [k for k in result.missing_keys if k.split(".")[0] not in fresh]
    unexpected = [k for k in result.unexpected_keys if k.split(".")[0] not in replaced]
    if missing or unexpected:
        raise ValueError(
            f"encoder weights do not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return {"new": list(result.missing_keys), "dropped": list(result.unexpected_keys)}


def _model(cfg: Config) -> nn.Module:
    model = build_classifier(cfg)
    keys = load_encoder(model, read_init_state(cfg))
    log.info(
        "init %s: encoder loaded; new %s; dropped %s",
        cfg.finetune.init,
        sorted({k.rsplit(".", 1)[0] for k in keys["new"]}),
        sorted({k.rsplit(".", 1)[0] for k in keys["dropped"]}),
    )
    return model


# ---------------------------------------------------------------------------- data, loss, optimiser


def train_transform(cfg: Config):
    """timm's training transform: PIL RGB -> normalised (3, S, S), random erasing last."""
    from timm.data import create_transform

    ft = cfg.finetune
    return create_transform(
        input_size=cfg.model.img_size,
        is_training=True,
        scale=tuple(ft.crop_scale),
        hflip=0.5,
        color_jitter=0.0 if ft.randaugment else 0.4,
        auto_augment=ft.randaugment,
        interpolation="bicubic",
        mean=MEAN,
        std=STD,
        re_prob=ft.reprob,
        re_mode=ft.remode,
        re_count=1,
    )


def _loader(cfg: Config, *, rank: int, world_size: int, micro_batch: int, device):
    from pipeline.data import build_labelled_train_loader

    return build_labelled_train_loader(
        cfg, rank=rank, world_size=world_size, micro_batch=micro_batch, device=device, transform=train_transform(cfg)
    )


def _optimizer(model: nn.Module, cfg: Config, lr: float):
    from pipeline.training.optim import build_optimizer

    ft = cfg.finetune
    # No layer decay is layer_decay 1.0, not None: build_optimizer's plain path hands the no-decay
    # names to timm 1.0's weight_decay_exclude_1d argument, so it decays biases and norms of a
    # ResNet and pos_embed / cls_token of a ViT; the layer-decay groups exclude them as specified.
    decay = ft.layer_decay if ft.recipe == "vit" and ft.layer_decay else 1.0
    return build_optimizer(model, cfg.optim, lr, layer_decay=decay)


@dataclass
class ClassifierStep:
    """(engine, LabelledBatch) -> (loss, logits): Mixup / CutMix with label smoothing (timm) on
    the micro batch, then soft-target cross entropy; without mixing, smoothed cross entropy."""

    num_classes: int
    mixup: object = None
    loss: nn.Module = None

    @classmethod
    def from_config(cls, cfg: Config) -> ClassifierStep:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        ft, n = cfg.finetune, cfg.finetune.num_classes
        if ft.mixup > 0 or ft.cutmix > 0:
            mix = Mixup(
                mixup_alpha=ft.mixup,
                cutmix_alpha=ft.cutmix,
                prob=ft.mixup_prob,
                switch_prob=ft.mixup_switch_prob,
                mode="batch",
                label_smoothing=ft.label_smoothing,
                num_classes=n,
            )
            return cls(n, mix, SoftTargetCrossEntropy())
        if ft.label_smoothing > 0:
            return cls(n, None, LabelSmoothingCrossEntropy(ft.label_smoothing))
        return cls(n, None, nn.CrossEntropyLoss())

    def __call__(self, engine, batch):
        images, labels = batch
        if not engine.module.training:  # the trainer's fixed val batch: hard labels, nothing mixed
            logits = engine(images.to(compute_dtype(engine)))
            return nn.functional.cross_entropy(logits.float(), labels), logits
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)  # draws from NumPy's RNG, saved with each checkpoint
        logits = engine(images.to(compute_dtype(engine)))
        return self.loss(logits.float(), labels), logits


def _val_batch(cfg: Config, ranks, size: int):
    """One fixed batch of data.val per rank (evaluation views): its loss, logged at every
    checkpoint, moves only with the model."""
    from pipeline.data import LabelledBatch, build_eval_loader

    loader = build_eval_loader(
        cfg, cfg.data.val, rank=ranks.rank, world_size=ranks.world_size, batch_size=size, device="cpu"
    )
    images, labels = next(iter(loader), (None, None))
    if images is None or not len(images):
        return None
    return LabelledBatch(images.to(ranks.device), labels.to(ranks.device))


# ---------------------------------------------------------------------------- the end of a run


def export_config(cfg: Config, net: nn.Module, label_names: list[str] | None) -> dict:
    """timm config.json of the fine-tuned classifier (head included; see pipeline.models.timm_config)."""
    from pipeline.models import timm_config

    labels = label_names if label_names and len(label_names) == cfg.finetune.num_classes else None
    return timm_config(
        net, cfg.model.name, classifier_args(cfg), cfg.model.img_size, labels, finetuned_from=cfg.finetune.init
    )


@torch.no_grad()
def evaluate(trainer) -> dict:
    """Collective: top-1/top-5 of the engine's model on data.val, every sample once across ranks
    (resize S*256/224 then centre crop, bicubic: pipeline.data's evaluation view)."""
    import torch.distributed as dist

    from pipeline.data import build_eval_loader
    from pipeline.evaluation import Tally

    cfg, ranks, engine = trainer.cfg, trainer.ranks, trainer.engine
    loader = build_eval_loader(
        cfg,
        cfg.data.val,
        rank=ranks.rank,
        world_size=ranks.world_size,
        batch_size=trainer.plan.micro_batch,
        device=ranks.device,
    )
    engine.module.eval()
    tally = Tally((1, 5))
    for images, labels in loader:
        tally.update(engine.module(images.to(compute_dtype(engine))).float().cpu(), labels.cpu())
    engine.module.train()
    counts = torch.tensor([tally.correct.get(1, 0), tally.correct.get(5, 0), tally.n], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    c1, c5, n = counts.tolist()
    if not n:
        raise ValueError(f"data.val={cfg.data.val!r}: no samples were evaluated")
    return {"top1": c1 / n, "top5": c5 / n, "num_samples": int(n)}


def _finish(trainer) -> dict:
    """Collective: export the classifier, evaluate it, write metrics.json (rank 0)."""
    from pipeline.models import export_weights
    from pipeline.registry import code_version
    from pipeline.training import checkpoint as ckpt

    cfg, folder = trainer.cfg, trainer.folder
    state = ckpt.gather_fp32_state(trainer.engine)
    metrics = evaluate(trainer)
    export = storage.join(folder.url, "export")
    metrics_url = storage.join(folder.url, "metrics.json")
    if trainer.is_main:
        labels = [c.get("wnid") or c.get("name") or str(c.get("index")) for c in train_classes(cfg)]
        config = export_config(cfg, trainer.engine.module, labels)
        storage.write_bytes(storage.join(export, "model.safetensors"), export_weights(state), cfg.storage)
        storage.write_bytes(storage.join(export, "config.json"), json.dumps(config, indent=1).encode(), cfg.storage)
        metrics = {
            "format_version": METRICS_FORMAT_VERSION,
            **metrics,
            "model": export,
            "init": cfg.finetune.init,
            "data": cfg.data.val,
            "step": trainer.step,
            "checkpoint": trainer.last_checkpoint,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "code": code_version(),
        }
        body = (json.dumps(metrics, indent=2) + "\n").encode()
        storage.write_bytes(storage.join(export, "metrics.json"), body, cfg.storage)
        storage.write_bytes(metrics_url, body, cfg.storage)
        log.info(
            "val top1 %.4f top5 %.4f on %d images -> %s",
            metrics["top1"],
            metrics["top5"],
            metrics["num_samples"],
            metrics_url,
        )
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # the export and metrics exist before any rank returns
    return {"export": export, "metrics": metrics_url}


def task(cfg: Config):
    """The fine-tuning Task for pipeline.training.trainer (run in every rank)."""
    from pipeline.training.trainer import Task

    return Task(
        build_model=_model,
        build_loader=_loader,
        build_optimizer=_optimizer,
        forward=ClassifierStep.from_config(cfg),
        finish=_finish,
        pictures=False,
        val_batch=_val_batch,
    )


# ---------------------------------------------------------------------------- launch and CLI


@dataclass
class FinetuneResult:
    run_dir: str
    checkpoint: str | None
    export: str | None
    metrics_url: str
    metrics: dict


def launch(
    cfg: Config, *, hostfile: str | None = None, master_addr: str | None = None, master_port: int | None = None
) -> FinetuneResult:
    """Check and pin the config, fine-tune (or resume) through the training launcher, and say
    where the results are."""
    from pipeline.training import launcher

    world = sum(launcher.parse_hostfile(hostfile).values()) if hostfile else None
    cfg = prepare(cfg, world)
    run = launcher.launch(cfg, hostfile=hostfile, master_addr=master_addr, master_port=master_port, task=TASK)
    metrics_url = storage.join(cfg.train.run_dir, "metrics.json")
    metrics = json.loads(storage.read_bytes(metrics_url, cfg.storage))
    return FinetuneResult(cfg.train.run_dir, run.latest, run.export, metrics_url, metrics)


def cli(argv: list[str]) -> int:
    from pipeline.training.launcher import LaunchError, add_launch_arguments

    p = argparse.ArgumentParser(
        prog="mfm finetune",
        description=__doc__.split("\n\n")[0],
        epilog="e.g. mfm finetune --config finetune_vit_b16 --set finetune.init=vit_b16_mfm@production",
    )
    add_launch_arguments(p, config_help="preset name or YAML file (finetune_*)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        result = launch(cfg, hostfile=args.hostfile, master_addr=args.master_addr, master_port=args.master_port)
    except LaunchError as e:
        print(f"mfm finetune: {e}", file=sys.stderr)
        return e.code
    out = asdict(result)
    out["metrics"] = {k: result.metrics[k] for k in ("top1", "top5", "num_samples")}
    print(json.dumps(out, indent=1))
    return 0
