"""`mfm experiment pretext-comparison`: a miniature of the paper's pretext comparison.

On Fashion-MNIST (`mfm sample-data`): the same small ViT is pretrained with each pretext
(mfm, sr, deblur, denoise) on the unlabelled training images, or not at all (random init);
each encoder is then scored frozen (k-NN and linear probe on the largest labelled subset) and
fine-tuned on class-balanced 1% / 10% label subsets, top-1 on the test images. Every stage is
the pipeline's own: sample-data -> shard -> launcher (DeepSpeed) -> registry -> finetune ->
evaluate. The outcome is a table (markdown) and a plot, mean and spread over the seeds.

Resumable: each run leaves `<out>/results/<run>.json`; a rerun skips runs whose file exists,
and an interrupted pretraining or fine-tune resumes from its newest checkpoint.

Over the ~400-line guide: one experiment's recipe, runs, summary table and plot, read
together; every stage it runs is the pipeline's own.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

log = logging.getLogger("mfm.experiment")

PRETEXTS = ("mfm", "sr", "deblur", "denoise")
RANDOM = "random"  # no pretraining: the encoder as the pretraining run would start it
SETTINGS_FILE = "settings.json"
# The paper's corruption strengths (spec section 4) scaled from 224 px to 32 px images:
# MFM radius 16 -> 3 (tiny_cpu's), blur sigma 5 -> 0.75 with the 7..21 px kernels -> 3, 5 px.
# SR's factor 8 and the noise std are scale-free and stay as the paper has them.
CORRUPTION_32PX = {"corruption.radius": 3, "corruption.blur_sigma": 0.75, "corruption.blur_kernel_sizes": [3, 5]}
# Fine-tuning at toy scale: the paper's regularisers (mixup, cutmix, RandAugment, random erasing)
# are tuned for 100 epochs on 1.28M images; in a few hundred steps on 600 images they keep
# every arm near chance (measured: 14-25% top-1 after 30-60 steps). Layer decay, label
# smoothing, drop path and the crop augmentation stay.
FINETUNE_MINIATURE = {"finetune.mixup": 0, "finetune.cutmix": 0, "finetune.randaugment": None, "finetune.reprob": 0}
# The recipes' base lr is per 512 images; scaled down to these batches (1.5e-3 -> 1.9e-4 at 64) it
# barely moves the weights in a few hundred steps, so here the base lr is the lr.


@dataclass
class Settings:
    """Everything that decides the numbers (saved to <out>/settings.json; a rerun must match)."""

    out: str = "demo-out/experiment"
    pretexts: list[str] = field(default_factory=lambda: list(PRETEXTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    # Budget for under an hour on a quiet 2-core machine (54 min measured): 8 pretrainings
    # (~225 s each, ~10 s of it process start and export), 20 fine-tunes (~57 s, ~12 s of it the
    # 10k-image evaluation) and 10 frozen evaluations (~19 s). A trial at 1500/300 steps: MFM
    # +8.6 points over random init at 1% labels; at 600/200 steps, +1.2.
    pretrain_steps: int = 1200
    finetune_steps: int = 250
    per_class: int = 6000  # pretraining images per class (Fashion-MNIST has 6000: all of them)
    per_class_test: int = 1000  # test images per class: all of Fashion-MNIST's 10k
    pretrain_batch: int = 64
    finetune_batch: int = 32
    # a CPU-sized ViT: vit_tiny's layout at 32 px, shallower and narrower; 8 px patches (16 tokens)
    # make a step about 4x cheaper than 4 px ones, which buys the pretraining steps
    model: str = "vit_tiny_patch16_224"
    patch_size: int = 8
    timm_kwargs: dict = field(default_factory=lambda: {"depth": 4, "embed_dim": 128, "num_heads": 4})
    probe_epochs: int = 20
    knn_k: int = 20
    workers: int = 0  # loader workers per run; 0 keeps the two cores for compute
    # config overrides applied last (e.g. optim.base_lr=1e-3, finetune.layer_decay=0.65);
    # part of the settings, so results made with other overrides are never mixed in
    pretrain_set: list[str] = field(default_factory=list)
    finetune_set: list[str] = field(default_factory=list)

    def check(self) -> None:
        bad = [p for p in self.pretexts if p not in PRETEXTS]
        if bad or not self.pretexts:
            raise ValueError(f"pretexts {bad or '[]'}: choose from {', '.join(PRETEXTS)}")
        if not self.seeds or not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError("need at least one seed and label fractions in (0, 1]")
        if min(self.pretrain_steps, self.finetune_steps, self.per_class, self.per_class_test) < 1:
            raise ValueError("steps and per-class counts must be positive")

    def result_keys(self) -> dict:
        """The settings a finished run's numbers depend on (not where they go)."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "pretexts", "seeds", "fractions", "workers")}


def labels_per_class(s: Settings, fraction: float) -> int:
    return max(1, round(fraction * s.per_class))


def arms(s: Settings) -> list[str]:
    return [RANDOM, *s.pretexts]


# ---------------------------------------------------------------------------- data


def prepare_data(s: Settings) -> dict:
    """Shard the pretraining/test split and one labelled subset per fraction; returns URLs.

    A subset of n per class is `mfm sample-data --per-class n`: the first n images of each class
    in file order, so it is class-balanced, deterministic and contained in the pretraining split."""
    from pipeline import sample_data, storage
    from pipeline.sharding import shard_dataset

    root = Path(s.out)

    def build(name: str, per_class: int, per_class_val: int, splits: str) -> str:
        shards = root / "shards" / name
        if all(storage.exists(str(shards / sp / "manifest.json")) for sp in splits.split(",")):
            return str(shards)  # sample data is deterministic: a committed manifest is current
        src = root / "data" / name
        summary = sample_data.build(
            str(src), per_class=per_class, per_class_val=per_class_val, size=32, source="fashion-mnist"
        )
        shard_dataset(summary["folder"], str(shards), splits=splits, progress=False)
        return str(shards)

    full = build("full", s.per_class, s.per_class_test, "train,val")
    urls = {"train": f"{full}/train", "test": f"{full}/val", "labelled": {}}
    for frac in s.fractions:
        n = labels_per_class(s, frac)
        urls["labelled"][frac] = f"{build(f'labels-{n}', n, 1, 'train')}/train"
    return urls


# ---------------------------------------------------------------------------- runs


def _model_overrides(s: Settings) -> list[str]:
    return [
        f"model.name={s.model}",
        "model.img_size=32",
        f"model.patch_size={s.patch_size}",
        f"model.timm_kwargs={json.dumps(s.timm_kwargs)}",
    ]


def _schedule(steps: int, samples: int, batch: int) -> list[str]:
    """Epochs that a cosine schedule ending at about `steps` spans (max_steps cuts the rest)."""
    per_epoch = max(1, samples // batch)
    epochs = max(1, math.ceil(steps / per_epoch))
    return [f"optim.epochs={epochs}", f"optim.warmup_epochs={round(0.1 * epochs, 3)}", f"train.max_steps={steps}"]


def _registry(s: Settings):
    from pipeline.registry import Registry

    return Registry(str(Path(s.out).resolve() / "registry"))


def pretrain(s: Settings, data: dict, pretext: str, seed: int) -> dict:
    """Pretrain (or, for `random`, only initialise) an encoder and register it."""
    from pipeline import storage
    from pipeline.config import load_config

    run_dir = str(Path(s.out).resolve() / "runs" / f"pretrain-{pretext}-s{seed}")
    kind = "mfm" if pretext == RANDOM else pretext
    overrides = [
        *_model_overrides(s),
        f"corruption.kind={kind}",
        *[f"{k}={json.dumps(v)}" for k, v in CORRUPTION_32PX.items()],
        f"data.train={data['train']}",
        f"data.val={data['test']}",
        "data.backend=torch",
        f"data.workers={s.workers}",
        f"data.batch_size={s.pretrain_batch}",
        f"train.run_dir={run_dir}",
        f"train.seed={seed}",
        f"train.checkpoint_every={max(50, s.pretrain_steps // 3)}",
        "train.keep_last=1",
        f"train.picture_every={s.pretrain_steps}",
        "train.log_every=25",
        f"optim.lr_base_batch={s.pretrain_batch}",
        *_schedule(s.pretrain_steps, 10 * s.per_class, s.pretrain_batch),
        *s.pretrain_set,
    ]
    cfg = load_config("tiny_cpu", overrides)
    if pretext == RANDOM:
        export = random_init_export(cfg, run_dir)
    else:
        from pipeline.training.launcher import launch

        export = launch(cfg).export
        if not export:
            raise RuntimeError(f"{run_dir}: pretraining finished without an export")
    ref = _registry(s).register(
        f"pretext-comparison-{pretext}-s{seed}", export, data_manifest_url=storage.join(data["train"], "manifest.json")
    )
    return {
        "ref": str(ref),
        "export": export,
        "steps": 0 if pretext == RANDOM else s.pretrain_steps,
        "registry": _registry(s).url,
        "run_dir": run_dir,
    }


def random_init_export(cfg, run_dir: str) -> str:
    """The export a pretraining run would start from: the same model and (paper) init, seeded."""
    import torch

    from pipeline.models import build_model, export_encoder, export_weights

    torch.manual_seed(cfg.train.seed)
    state, config = export_encoder(build_model(cfg.model, cfg.corruption), cfg.model)
    export = Path(run_dir) / "export"
    export.mkdir(parents=True, exist_ok=True)
    (export / "model.safetensors").write_bytes(export_weights(state))
    (export / "config.json").write_text(json.dumps(config, indent=1))
    return str(export)


def frozen_eval(s: Settings, data: dict, ref: str, out: str) -> dict:
    """k-NN and linear probe of the frozen encoder (trained on the largest labelled subset)."""
    from pipeline.evaluation import run

    train = data["labelled"][max(s.fractions)]
    metrics, _ = run(
        ref,
        data["test"],
        train_data=train,
        corruptions="none",
        out=out,
        registry=_registry(s).url,
        batch_size=128,
        device="cpu",
        preset="tiny_cpu",
        overrides=["data.backend=torch", "data.workers=0"],
        knn_k=s.knn_k,
        probe_epochs=s.probe_epochs,
        seed=0,
    )
    return metrics


def finetune(s: Settings, data: dict, pretext: str, seed: int, ref: str, fraction: float) -> dict:
    from pipeline.config import load_config
    from pipeline.finetune import launch

    n = labels_per_class(s, fraction)
    run_dir = str(Path(s.out).resolve() / "runs" / f"finetune-{pretext}-s{seed}-{_pct(fraction)}")
    batch = min(s.finetune_batch, 2 * (10 * n // 2))  # mixup pairs samples: an even batch the subset fills
    overrides = [
        f"finetune.init={ref}",
        f"finetune.registry={_registry(s).url}",
        f"data.train={data['labelled'][fraction]}",
        f"data.val={data['test']}",
        "data.backend=torch",
        f"data.workers={s.workers}",
        f"data.batch_size={batch}",
        f"train.run_dir={run_dir}",
        f"train.seed={seed}",
        f"train.checkpoint_every={max(50, s.finetune_steps // 2)}",
        "train.keep_last=1",
        "train.log_every=25",
        f"optim.lr_base_batch={batch}",
        *_schedule(s.finetune_steps, 10 * n, batch),
        *[f"{k}={json.dumps(v)}" for k, v in FINETUNE_MINIATURE.items()],
        *s.finetune_set,
    ]
    result = launch(load_config("finetune_tiny_cpu", overrides))
    return {k: result.metrics[k] for k in ("top1", "top5", "num_samples")} | {
        "run_dir": run_dir,
        "labels_per_class": n,
        "batch_size": batch,
    }


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}pct"


def _results_dir(s: Settings) -> Path:
    return Path(s.out) / "results"


def _once(path: Path, make) -> dict:
    """The run's result file if it exists (a finished run), else run it and write the file."""
    if path.exists():
        log.info("skip %s (done)", path.stem)
        return json.loads(path.read_text())
    log.info("run %s", path.stem)
    t0 = time.monotonic()
    result = make()
    result["seconds"] = round(time.monotonic() - t0, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)  # the file appears whole or not at all: a crash never leaves a "finished" run
    return result


def _check_settings(s: Settings) -> None:
    path = Path(s.out) / SETTINGS_FILE
    want = s.result_keys()
    if path.exists():
        have = json.loads(path.read_text())
        default = Settings().result_keys()  # a setting added later counts as its default in older results
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k, default.get(k)))
        if diff:
            raise ValueError(
                f"{s.out} holds results made with other settings ({', '.join(diff)}): use another --out or remove it"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(want, indent=1) + "\n")


def run_experiment(s: Settings, command: str | None = None) -> dict:
    """All runs (skipping finished ones), then the table and plot; returns the summary."""
    s.check()
    _check_settings(s)
    res = _results_dir(s)
    res.mkdir(parents=True, exist_ok=True)
    data = prepare_data(s)
    for seed in s.seeds:
        for arm in arms(s):
            pre = _once(res / f"pretrain-{arm}-s{seed}.json", lambda: pretrain(s, data, arm, seed))
            _once(
                res / f"frozen-{arm}-s{seed}.json",
                lambda: frozen_eval(
                    s, data, pre["ref"], str(Path(s.out).resolve() / "runs" / f"frozen-{arm}-s{seed}.json")
                ),
            )
            for frac in s.fractions:
                _once(
                    res / f"finetune-{arm}-s{seed}-{_pct(frac)}.json",
                    lambda: finetune(s, data, arm, seed, pre["ref"], frac),
                )
    summary = summarize(s)
    write_report(s, summary, command)
    return summary


# ---------------------------------------------------------------------------- report


def _mean_sd(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def summarize(s: Settings) -> dict:
    """arm -> metric -> {mean, sd, n, values}, from the result files (percent)."""
    res = _results_dir(s)
    out: dict = {}
    for arm in arms(s):
        row: dict = {}
        for frac in s.fractions:
            vals = [
                100 * json.loads((res / f"finetune-{arm}-s{seed}-{_pct(frac)}.json").read_text())["top1"]
                for seed in s.seeds
            ]
            row[f"finetune_{_pct(frac)}"] = _mean_sd(vals)
        frozen = [json.loads((res / f"frozen-{arm}-s{seed}.json").read_text()) for seed in s.seeds]
        row["knn"] = _mean_sd([100 * m["knn"]["top1"] for m in frozen])
        row["linear_probe"] = _mean_sd([100 * m["linear_probe"]["top1"] for m in frozen])
        out[arm] = row
    return out


def _columns(s: Settings) -> list[tuple[str, str]]:
    cols = [(f"finetune_{_pct(f)}", f"fine-tune, {f * 100:g}% labels") for f in s.fractions]
    big = max(s.fractions)
    return cols + [
        ("knn", f"k-NN (k={s.knn_k}, {big * 100:g}% labels)"),
        ("linear_probe", f"linear probe ({big * 100:g}% labels)"),
    ]


def markdown(s: Settings, summary: dict, command: str | None) -> str:
    cols = _columns(s)
    lines = [
        "# Pretext comparison (miniature of the MFM paper's Table 2)",
        "",
        f"Test top-1 (%) on {10 * s.per_class_test:,} Fashion-MNIST test images, mean ± standard deviation over "
        f"seeds {', '.join(map(str, s.seeds))} (n = {len(s.seeds)}).",
        "",
        "| pretraining | " + " | ".join(label for _, label in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for arm, row in summary.items():
        name = "none (random init)" if arm == RANDOM else arm
        lines.append(f"| {name} | " + " | ".join(f"{row[k]['mean']:.1f} ± {row[k]['sd']:.1f}" for k, _ in cols) + " |")
    tk = s.timm_kwargs
    lines += [
        "",
        "## How it was made",
        "",
        "```bash",
        command or command_line(s),
        "```",
        "",
        f"- data: Fashion-MNIST via `mfm sample-data` at 32 px; pretraining on {10 * s.per_class} unlabelled "
        f"training images, evaluation on {10 * s.per_class_test} test images; label subsets = the first "
        + ", ".join(f"{labels_per_class(s, f)}" for f in s.fractions)
        + " images per class (class-balanced, deterministic, contained in the pretraining set).",
        f"- encoder: `{s.model}` with img_size 32, patch {s.patch_size}, "
        f"{', '.join(f'{k} {v}' for k, v in tk.items())}.",
        f"- pretraining: preset `tiny_cpu`, {s.pretrain_steps} steps at batch {s.pretrain_batch} per pretext "
        f"and seed (DeepSpeed, `mfm pretrain`'s launcher); corruptions at 32 px: {json.dumps(CORRUPTION_32PX)}.",
        f"- fine-tuning: preset `finetune_tiny_cpu` (layer decay, label smoothing, drop path) with "
        f"{json.dumps(FINETUNE_MINIATURE)}, "
        f"{s.finetune_steps} steps at batch ≤ {s.finetune_batch}, from the registered encoder (`NAME@vN`).",
        f"- frozen encoder: `mfm evaluate` k-NN (k={s.knn_k}) and a linear probe ({s.probe_epochs} epochs) "
        "on mean-pooled features.",
        "- seeds: the seed sets pretraining init, data order and corruption draws, and fine-tuning's "
        "head init, augmentation and order; the label subsets are the same for every seed.",
        "- per-run numbers: `results/*.json` under the output folder.",
        "",
    ]
    return "\n".join(lines)


def plot(s: Settings, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _columns(s)
    fig, ax = plt.subplots(figsize=(2.2 + 1.9 * len(cols), 3.8))
    width = 0.8 / len(summary)
    for i, (arm, row) in enumerate(summary.items()):
        xs = [c + (i - (len(summary) - 1) / 2) * width for c in range(len(cols))]
        ax.bar(
            xs,
            [row[k]["mean"] for k, _ in cols],
            width,
            yerr=[row[k]["sd"] for k, _ in cols],
            capsize=2,
            label="random init" if arm == RANDOM else arm,
            color="0.6" if arm == RANDOM else None,
        )
    ax.set_xticks(range(len(cols)), [label for _, label in cols], fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    lows = [row[k]["mean"] - row[k]["sd"] for row in summary.values() for k, _ in cols]
    ax.set_ylim(max(0, min(lows) - 5), 100)
    ax.set_title(
        f"Fashion-MNIST, {s.pretrain_steps} pretraining steps, mean ± sd over {len(s.seeds)} seed(s)", fontsize=9
    )
    ax.legend(fontsize=8, ncol=len(summary), loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(s: Settings, summary: dict, command: str | None) -> None:
    out = Path(s.out)
    (out / "pretext-comparison.md").write_text(markdown(s, summary, command))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(s, summary, out / "pretext-comparison.png")


# ---------------------------------------------------------------------------- CLI


def command_line(s: Settings) -> str:
    d = Settings()
    parts = ["mfm experiment pretext-comparison"]
    for f in fields(Settings):
        v = getattr(s, f.name)
        if v != getattr(d, f.name):
            flag = "--" + f.name.replace("_", "-")
            if f.name in ("pretrain_set", "finetune_set"):
                parts += [f"{flag} {item}" for item in v]
                continue
            value = ",".join(map(str, v)) if isinstance(v, list) else json.dumps(v) if isinstance(v, dict) else v
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _list(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="mfm experiment pretext-comparison", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--pretexts", type=_list(str), default=d.pretexts, help="comma-separated (default all four)")
    p.add_argument("--seeds", type=_list(int), default=d.seeds, help="comma-separated (default 0,1)")
    p.add_argument("--fractions", type=_list(float), default=d.fractions, help="label fractions (default 0.01,0.1)")
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps)
    p.add_argument("--per-class", type=int, default=d.per_class, help="pretraining images per class (max 6000)")
    p.add_argument("--per-class-test", type=int, default=d.per_class_test, help="test images per class (max 1000)")
    p.add_argument("--pretrain-batch", type=int, default=d.pretrain_batch)
    p.add_argument("--finetune-batch", type=int, default=d.finetune_batch)
    p.add_argument("--model", default=d.model, help="timm ViT name")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="ViT patch size (4 or 8 at 32 px)")
    p.add_argument("--timm-kwargs", type=json.loads, default=d.timm_kwargs, help="JSON: extra timm model arguments")
    p.add_argument("--probe-epochs", type=int, default=d.probe_epochs)
    p.add_argument("--knn-k", type=int, default=d.knn_k)
    p.add_argument("--workers", type=int, default=d.workers, help="loader workers per run")
    p.add_argument(
        "--pretrain-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every pretraining run (repeatable)",
    )
    p.add_argument(
        "--finetune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every fine-tuning run (repeatable)",
    )
    return p


def cli(argv: list[str]) -> int:
    if argv[:1] != ["pretext-comparison"]:
        print("usage: mfm experiment pretext-comparison [--help]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = Settings(**vars(parser().parse_args(argv[1:])))
    try:
        summary = run_experiment(s)
    except ValueError as e:
        print(f"mfm experiment: {e}", file=sys.stderr)
        return 2
    print((Path(s.out) / "pretext-comparison.md").read_text())
    print(json.dumps({arm: {k: round(v["mean"], 2) for k, v in row.items()} for arm, row in summary.items()}))
    return 0
