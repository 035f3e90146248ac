"""Evaluation: top-1/top-5, ImageNet-C-style corruption robustness, k-NN and linear probe.

Everything takes iterables of `(images, labels)` batches, so tests feed tensors directly and
the CLI feeds `pipeline.data.build_eval_loader`. Images may be uint8 `(N, 3, H, W)` or float
normalised with the model's mean/std (the batch contract); corruptions always act on uint8 HWC
pixels before normalisation, as in ImageNet-C. Results go to `metrics.json` beside the checkpoint.

Over the ~400-line guide (about 600): the four measures share the batch plumbing, the feature
extraction and one metrics.json; the seam to split along, when it grows, is k-NN / linear probe
(frozen features) apart from classifier accuracy and robustness.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Classifier = Callable[[torch.Tensor], torch.Tensor]  # normalised images -> logits (or scores)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet-C's 15 benchmark corruptions by family (imagecorruptions' "common" set).
CORRUPTION_FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
ALL_CORRUPTIONS = tuple(c for family in CORRUPTION_FAMILIES.values() for c in family)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # ImageNet-C's held-out set
METRICS_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- accuracy (pure)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the k highest scores, per k (k capped at #classes)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # ties broken by topk, as every ImageNet script does
    hits = top == labels.to(top.device).view(-1, 1)
    return {k: int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    correct = topk_correct(logits, labels, ks)
    n = max(len(labels), 1)
    return {f"top{k}": c / n for k, c in correct.items()}


@dataclasses.dataclass
class Tally:
    """Running top-k counts over batches."""

    ks: tuple[int, ...] = (1, 5)
    correct: dict[int, int] = dataclasses.field(default_factory=dict)
    n: int = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for k, c in topk_correct(logits, labels, self.ks).items():
            self.correct[k] = self.correct.get(k, 0) + c
        self.n += len(labels)

    def result(self) -> dict[str, float]:
        if not self.n:
            raise ValueError("no samples were evaluated (empty data)")
        return {**{f"top{k}": self.correct.get(k, 0) / self.n for k in self.ks}, "num_samples": self.n}


# ---------------------------------------------------------------------------- pixels


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float normalised."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def as_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) on the CPU; float input is taken as normalised and un-normalised
    (the pixels came from 8-bit JPEGs, so only sub-level resampling detail is rounded away)."""
    if images.dtype == torch.uint8:
        return images.cpu()
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return ((images.float() * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()


def parse_corruptions(spec: str | Sequence[str] | None) -> list[str]:
    """`all` (the 15 benchmark corruptions), `none`, family names, or corruption names, comma-separated."""
    if spec is None:
        return []
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[str] = []
    for item in items:
        if item == "none":
            continue
        names = ALL_CORRUPTIONS if item == "all" else CORRUPTION_FAMILIES.get(item, (item,))
        for name in names:
            if name not in ALL_CORRUPTIONS + EXTRA_CORRUPTIONS:
                raise ValueError(
                    f"unknown corruption {name!r}; use all, none, "
                    f"{', '.join(CORRUPTION_FAMILIES)} or one of {', '.join(ALL_CORRUPTIONS + EXTRA_CORRUPTIONS)}"
                )
            if name not in out:
                out.append(name)
    return out


def parse_severities(spec: str | Sequence[int]) -> list[int]:
    values = [int(s) for s in spec.split(",") if s.strip()] if isinstance(spec, str) else [int(s) for s in spec]
    bad = [s for s in values if s not in range(1, 6)]
    if bad or not values:
        raise ValueError(f"severities must be integers 1-5, got {spec!r}")
    return sorted(set(values))


def corrupt_images(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply one imagecorruptions corruption to uint8 (N, 3, H, W) images (H, W >= 32).

    The package draws from numpy's global generator; it is seeded here so a run is repeatable."""
    from imagecorruptions import corrupt

    if images.dtype != torch.uint8:
        raise ValueError(f"corruptions act on uint8 pixels, got {images.dtype}")
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        out = np.stack([corrupt(img, corruption_name=name, severity=severity) for img in hwc])
    finally:
        np.random.set_state(state)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------- evaluation loops


def _batches_on(batches: Batches, desc: str = "evaluate") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from tqdm import tqdm

    # a progress bar with an ETA on a terminal only (disable=None); loaders know their length
    total = len(batches) if hasattr(batches, "__len__") else None
    for images, labels in tqdm(batches, desc=desc, total=total, unit="batch", leave=False, disable=None):
        yield images, torch.as_tensor(labels).long()


@torch.no_grad()
def evaluate_classifier(
    classify: Classifier,
    batches: Batches,
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    device: str | torch.device = "cpu",
    ks=(1, 5),
) -> dict:
    """Top-k accuracy of `classify` (normalised images -> logits) over labelled batches."""
    tally = Tally(tuple(ks))
    for images, labels in _batches_on(batches):
        x = normalize(images.to(device), mean, std) if images.dtype == torch.uint8 else images.to(device).float()
        tally.update(classify(x).float().cpu(), labels)
    return tally.result()


@torch.no_grad()
def evaluate_robustness(
    classify: Classifier,
    batches: Batches,
    corruptions: Sequence[str],
    severities: Sequence[int],
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    device: str | torch.device = "cpu",
    seed: int = 0,
    ks=(1, 5),
) -> dict:
    """Clean accuracy and accuracy under each corruption and severity, in one pass over the data
    (the data is read once; every corrupted copy is made from the batch in memory)."""
    clean = Tally(tuple(ks))
    tallies = {(c, s): Tally(tuple(ks)) for c in corruptions for s in severities}
    for b, (images, labels) in enumerate(_batches_on(batches, "evaluate (clean + corrupted)")):
        pixels = as_uint8(images, mean, std)
        clean.update(classify(normalize(pixels.to(device), mean, std)).float().cpu(), labels)
        for i, (c, s) in enumerate(tallies):
            corrupted = corrupt_images(pixels, c, s, seed=seed + 1_000_003 * b + 7919 * i)
            tallies[(c, s)].update(classify(normalize(corrupted.to(device), mean, std)).float().cpu(), labels)
    result = {"clean": clean.result()}
    if tallies:
        result["robustness"] = summarize_robustness({k: t.result() for k, t in tallies.items()}, result["clean"])
    return result


def summarize_robustness(results: dict[tuple[str, int], dict], clean: dict | None = None) -> dict:
    """Per corruption and severity, per corruption (mean over severities), per family, the
    means: `mean_top1` over every (corruption, severity) cell (a mean accuracy, not mCE; its
    complement is `mean_error`) and `mean_over_corruptions` (mean of the per-corruption means),
    and ImageNet-C's CE / mCE / relative mCE (pipeline.robustness) where the grid allows them."""
    from pipeline.robustness import corruption_errors

    table: dict[str, dict[str, dict]] = {}
    for (c, s), r in sorted(results.items()):
        table.setdefault(c, {})[str(s)] = {k: v for k, v in r.items() if k.startswith("top")}
    per_corruption = {c: _mean(v["top1"] for v in sev.values()) for c, sev in table.items()}
    per_family = {
        f: _mean(per_corruption[c] for c in names if c in per_corruption)
        for f, names in CORRUPTION_FAMILIES.items()
        if any(c in per_corruption for c in names)
    }
    mean_top1 = _mean(r["top1"] for r in results.values())
    out = {
        "severities": sorted({s for _, s in results}),
        "corruptions": table,
        "per_corruption_top1": per_corruption,
        "per_family_top1": per_family,
        "mean_top1": mean_top1,
        "mean_top5": _mean(r["top5"] for r in results.values()) if all("top5" in r for r in results.values()) else None,
        "mean_over_corruptions_top1": _mean(per_corruption.values()),
        "mean_error": 1.0 - mean_top1,
    }
    if clean is not None:
        out["drop_top1"] = clean["top1"] - mean_top1
    out.update(corruption_errors(results, clean["top1"] if clean is not None else None))
    return {k: v for k, v in out.items() if v is not None}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------- frozen features


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, D) pooled pre-logit features of a timm model (the encoder's output without the head)."""
    if hasattr(model, "forward_head") and hasattr(model, "forward_features"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return model(x)


@torch.no_grad()
def extract_features(
    model: nn.Module | Callable,
    batches: Batches,
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 CPU, labels (N,)) of a frozen feature extractor.

    A batch of 2-D float tensors is taken as features already (tests, cached features)."""
    feats, labels_out = [], []
    for images, labels in _batches_on(batches, "features"):
        if images.ndim == 2:
            f = images.float()
        else:
            x = normalize(images.to(device), mean, std) if images.dtype == torch.uint8 else images.to(device).float()
            f = pooled_features(model, x) if isinstance(model, nn.Module) else model(x)
        feats.append(f.float().cpu())
        labels_out.append(labels)
    if not feats:
        raise ValueError("no samples to extract features from (empty data)")
    return torch.cat(feats), torch.cat(labels_out)


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """(Nq, C) class votes: cosine similarity to the k nearest training features, each neighbour
    voting exp(sim / T) for its class (DINO's weighted k-NN)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train = nn.functional.normalize(train_feats.float(), dim=1)
    k = min(k, len(train))
    out = []
    for start in range(0, len(query), chunk):
        q = nn.functional.normalize(query[start : start + chunk].float(), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_labels[idx].long(), weights)
        out.append(votes)
    return torch.cat(out)


def knn_eval(
    train_feats,
    train_labels,
    val_feats,
    val_labels,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict:
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    scores = knn_scores(train_feats, train_labels, val_feats, k=k, temperature=temperature, num_classes=num_classes)
    return {**accuracy(scores, val_labels), "k": k, "temperature": temperature, "num_samples": len(val_labels)}


class LinearProbe(nn.Module):
    """Logistic regression on standardised frozen features (the standardisation is MAE's
    affine-free BatchNorm, frozen at the training set's statistics)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(len(mean), num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear((feats - self.mean) / self.std)


def train_linear_probe(
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 20,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> LinearProbe:
    num_classes = num_classes or int(labels.max()) + 1
    feats, labels = feats.float(), labels.long()
    probe = LinearProbe(feats.mean(0), feats.std(0).clamp_min(1e-6), num_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(feats) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(feats), generator=gen)
        for start in range(0, len(feats), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(probe(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


def linear_probe_eval(
    train_feats, train_labels, val_feats, val_labels, *, num_classes: int | None = None, epochs: int = 20, **kwargs
) -> tuple[dict, LinearProbe]:
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    probe = train_linear_probe(train_feats, train_labels, num_classes=num_classes, epochs=epochs, **kwargs)
    with torch.no_grad():
        result = accuracy(probe(val_feats.float()), val_labels)
    return {**result, "epochs": epochs, "num_samples": len(val_labels)}, probe


# ---------------------------------------------------------------------------- whole evaluation


@dataclasses.dataclass
class EvalOptions:
    corruptions: list[str] = dataclasses.field(default_factory=list)
    severities: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3, 4, 5])
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_epochs: int = 20
    seed: int = 0
    # scores the classifier (the head, or the probe on the frozen features) on out-of-distribution sets
    ood: Callable[[Classifier], dict] | None = None


def evaluate_model(
    model: nn.Module,
    val: Callable[[], Batches],
    train: Callable[[], Batches] | None = None,
    options: EvalOptions | None = None,
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    device: str | torch.device = "cpu",
) -> dict:
    """All metrics of a model. `val`/`train` are callables returning a fresh iterable (the val
    data is read once, or twice for an encoder scored under corruptions). A classifier
    (num_classes > 0) is scored with its head; an encoder needs `train` and is scored with a
    linear probe on its frozen features, and k-NN."""
    options = options or EvalOptions()
    model = model.to(device).eval()
    metrics: dict = {}
    classify: Classifier = model
    has_head = int(getattr(model, "num_classes", 0) or 0) > 0
    if train is not None:
        train_f, train_y = extract_features(model, train(), mean=mean, std=std, device=device)
        val_f, val_y = extract_features(model, val(), mean=mean, std=std, device=device)
        num_classes = int(max(train_y.max(), val_y.max())) + 1
        metrics["knn"] = knn_eval(
            train_f,
            train_y,
            val_f,
            val_y,
            k=options.knn_k,
            temperature=options.knn_temperature,
            num_classes=num_classes,
        )
        metrics["linear_probe"], probe = linear_probe_eval(
            train_f, train_y, val_f, val_y, num_classes=num_classes, epochs=options.probe_epochs, seed=options.seed
        )
        if not has_head:
            probe = probe.to(device)
            classify = lambda x: probe(pooled_features(model, x))  # noqa: E731
    elif not has_head:
        raise ValueError(
            "the model has no classifier head (an encoder export): give training data for "
            "k-NN and a linear probe, which then also scores clean and corrupted accuracy"
        )
    metrics["classifier"] = "head" if has_head else "linear_probe"
    if train is not None and not has_head and not options.corruptions:
        # clean accuracy of the probe is the probe's score on the features already extracted
        result = {"clean": {k: metrics["linear_probe"][k] for k in ("top1", "top5", "num_samples")}}
    else:
        result = evaluate_robustness(
            classify,
            val(),
            options.corruptions,
            options.severities,
            mean=mean,
            std=std,
            device=device,
            seed=options.seed,
        )
    clean = result.pop("clean")
    metrics.update(top1=clean["top1"], top5=clean["top5"], num_samples=clean["num_samples"], **result)
    if options.ood is not None:
        metrics["ood"] = options.ood(classify)
    return metrics


def metrics_table(metrics: dict) -> list[dict]:
    """Rows {metric, value} for display (a Prefect table artifact, a log)."""
    from pipeline.registry import flatten_metrics

    skip = ("robustness.corruptions.",)
    return [
        {"metric": k, "value": round(v, 6)} for k, v in flatten_metrics(metrics).items() if not k.startswith(skip)
    ] + [
        {"metric": f"{c}@{s}", "value": round(r["top1"], 6)}
        for c, sev in metrics.get("robustness", {}).get("corruptions", {}).items()
        for s, r in sev.items()
    ]


# ---------------------------------------------------------------------------- CLI


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _limited(make: Callable[[], Batches], max_batches: int | None) -> Callable[[], Batches]:
    if not max_batches:
        return make

    def limited():
        for i, batch in enumerate(make()):
            if i >= max_batches:
                return
            yield batch

    return limited


def run(
    model: str,
    data: str,
    *,
    train_data: str | None = None,
    corruptions: str = "all",
    severities: str = "1,2,3,4,5",
    out: str | None = None,
    registry: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    max_batches: int | None = None,
    knn_k: int = 20,
    probe_epochs: int = 20,
    seed: int = 0,
    ood: Sequence[str] | dict[str, str] | None = None,
) -> tuple[dict, str]:
    """What `mfm evaluate` and the `mfm-evaluate` flow do: (metrics, URL written). `ood` names
    out-of-distribution folders, `NAME=URL` items or {name: url} (pipeline.robustness)."""
    import tempfile
    from pathlib import Path

    from pipeline import storage
    from pipeline.config import load_config
    from pipeline.registry import (
        CONFIG,
        Registry,
        code_version,
        default_registry,
        load_export,
        model_from_folder,
        pull_version,
    )
    from pipeline.robustness import evaluate_ood, parse_ood

    ood_sets = parse_ood(ood)  # a wrong --ood is refused before any model is loaded
    device = device or _default_device()
    store = load_config(preset, list(overrides)).storage  # endpoint/region for every URL below
    if "@" in model:
        reg = Registry(registry or default_registry(), store)
        with tempfile.TemporaryDirectory(prefix="mfm-eval-") as tmp:
            ref, folder = pull_version(reg, model, tmp)  # every file verified against the manifest
            net, config = model_from_folder(folder), json.loads((Path(folder) / CONFIG).read_text())
        source, out = str(ref), out or "metrics.json"
    else:
        net, config = load_export(model, storage_cfg=store)
        source, out = model, out or storage.join(model, "metrics.json")
    pcfg = config.get("pretrained_cfg") or {}
    mean, std = pcfg.get("mean", IMAGENET_MEAN), pcfg.get("std", IMAGENET_STD)
    size = (pcfg.get("input_size") or [3, 224, 224])[-1]
    model_keys = [f"model.name={config['architecture']}", f"model.img_size={size}"]
    if (config.get("model_args") or {}).get("patch_size"):
        model_keys.append(f"model.patch_size={config['model_args']['patch_size']}")
    cfg = load_config(preset, [*model_keys, *overrides])
    try:
        from pipeline.data import build_eval_loader
    except ImportError as e:
        raise RuntimeError(
            f"pipeline.data.build_eval_loader is not available ({e}); "
            "evaluate from Python with pipeline.evaluation.evaluate_model and your own batches"
        ) from None

    def loader(url: str) -> Callable[[], Batches]:
        return _limited(
            lambda: build_eval_loader(cfg, url, rank=0, world_size=1, batch_size=batch_size, device=device), max_batches
        )

    def score_ood(classify: Classifier) -> dict:
        has_head = int(config.get("num_classes") or 0) > 0
        labels = config.get("label_names") if has_head else None
        classes = labels if isinstance(labels, list) else split_classes(train_data if not has_head else data, store)
        return {
            name: evaluate_ood(
                classify,
                name,
                url,
                classes,
                size=cfg.model.img_size,
                mean=mean,
                std=std,
                batch_size=batch_size,
                device=device,
                storage_cfg=store,
                max_batches=max_batches,
            )
            for name, url in ood_sets.items()
        }

    options = EvalOptions(
        corruptions=parse_corruptions(corruptions),
        severities=parse_severities(severities),
        knn_k=knn_k,
        probe_epochs=probe_epochs,
        seed=seed,
        ood=score_ood if ood_sets else None,
    )
    metrics = evaluate_model(
        net, loader(data), loader(train_data) if train_data else None, options, mean=mean, std=std, device=device
    )
    metrics = {
        "format_version": METRICS_FORMAT_VERSION,
        "model": source,
        "data": data,
        "train_data": train_data,
        "ood_sets": ood_sets,
        **metrics,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code": code_version(),
    }
    storage.write_bytes(out, (json.dumps(metrics, indent=2) + "\n").encode(), store)
    return metrics, out


def split_classes(url: str, storage_cfg=None) -> list[str]:
    """The class names (wnids) of a sharded split by label index, from its manifest."""
    from pipeline import storage
    from pipeline.split_manifest import MANIFEST, read_manifest

    manifest_url = storage.join(url, MANIFEST)
    try:  # read_manifest checks each class entry: an index and a wnid
        classes = read_manifest(url, storage_cfg).get("classes")
        if classes is None:
            raise KeyError("classes")
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{manifest_url}: no class table to map OOD classes onto ({type(e).__name__}: {e})") from None
    table = {c["index"]: c["wnid"] or str(c.get("name")) for c in classes}
    if sorted(table) != list(range(len(table))):
        raise ValueError(f"{manifest_url}: class indices are not 0..{len(table) - 1}")
    return [table[i] for i in range(len(table))]


def summary(metrics: dict) -> dict:
    """The headline figures `mfm evaluate` prints (and the flow returns)."""
    out = {k: metrics[k] for k in ("top1", "top5") if k in metrics}
    rob = metrics.get("robustness") or {}
    if rob:
        out["corrupted_mean_top1"] = rob["mean_top1"]
        if "mCE" in rob:
            out.update(mCE=rob["mCE"], relative_mCE=rob.get("relative_mCE"))
        else:
            out["mCE"] = rob.get("mCE_note")
    for key in ("knn", "linear_probe"):
        if key in metrics:
            out[f"{key}_top1"] = metrics[key]["top1"]
    for name, r in (metrics.get("ood") or {}).items():
        out[f"{name}_top1"] = r["top1"]
    return out


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="NAME@ALIAS / NAME@vN from the registry, or an export folder URL")
    p.add_argument("--data", required=True, help="sharded validation split URL")
    p.add_argument("--train-data", help="sharded training split URL: enables k-NN and the linear probe")
    p.add_argument("--corruptions", default="all", help="all | none | families (noise,blur,weather,digital) | names")
    p.add_argument("--severities", default="1,2,3,4,5")
    p.add_argument("--out", help="metrics.json URL (default: beside the export, or ./metrics.json for a registry ref)")
    p.add_argument("--registry", help="registry URL (default: $MFM_REGISTRY or demo-out/registry)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--config", dest="preset", help="preset or YAML for the data settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-batches", type=int, help="stop each pass after this many batches (smoke runs)")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--probe-epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="an out-of-distribution set as <class wnid>/<image> folders: imagenet-a and imagenet-r are scored "
        "on their 200 classes' logits, other names (imagenet-sketch) on all; repeatable",
    )
    args = p.parse_args(argv)
    from pipeline.registry import RegistryError

    try:
        metrics, out = run(
            args.model,
            args.data,
            train_data=args.train_data,
            corruptions=args.corruptions,
            severities=args.severities,
            out=args.out,
            registry=args.registry,
            batch_size=args.batch_size,
            device=args.device,
            preset=args.preset,
            overrides=args.overrides,
            max_batches=args.max_batches,
            knn_k=args.knn_k,
            probe_epochs=args.probe_epochs,
            seed=args.seed,
            ood=args.ood,
        )
    except (RegistryError, ValueError, RuntimeError) as e:
        print(f"mfm evaluate: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary(metrics)), f"-> {out}")
    return 0
