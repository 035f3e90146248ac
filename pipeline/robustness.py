"""The paper's robustness protocol: ImageNet-C mCE, and the out-of-distribution sets.

mCE (Hendrycks & Dietterich 2019): a corruption's error summed over severities 1-5, divided by
AlexNet's, averaged over the 15 benchmark corruptions; relative mCE does the same with each error
less the clean error. ImageNet-A and ImageNet-R hold 200 of the 1,000 classes: their authors
score a 1,000-class model on the logits of those 200 classes only; ImageNet-Sketch (and any other
set named here) is scored on every class. A set is a folder `<root>/<wnid>/<image>`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

# AlexNet's top-1 error on ImageNet-C, mean over severities 1-5 (Hendrycks & Dietterich, "Benchmarking
# Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019; the values their
# repository github.com/hendrycks/robustness publishes for the mCE normalisation).
ALEXNET_ERR = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
# AlexNet's clean top-1 error for relative mCE: 43.5% in the paper's Table 1 (torchvision's AlexNet,
# 56.522% top-1, the network their code evaluates).
ALEXNET_CLEAN_ERR = 0.43478
SEVERITIES = (1, 2, 3, 4, 5)
MCE_NOTE = "not mCE: mCE needs all 15 ImageNet-C corruptions at severities 1-5 (--corruptions all)"

# The sets whose authors restrict the logits to the classes the set holds.
SUBSET_SETS = ("imagenet-a", "imagenet-r")
SET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MAX_IMAGE_BYTES = 64 << 20


# ---------------------------------------------------------------------------- mCE (pure)


def corruption_errors(results: dict[tuple[str, int], dict], clean_top1: float | None = None) -> dict:
    """CE (and relative CE given the clean top-1) of every benchmark corruption scored at all five
    severities, and mCE / relative mCE when all 15 are there; otherwise a note saying it is not mCE."""
    errors: dict[str, dict[int, float]] = {}
    for (c, s), r in results.items():
        errors.setdefault(c, {})[s] = 1.0 - r["top1"]
    complete = {c: sev for c, sev in errors.items() if c in ALEXNET_ERR and set(sev) >= set(SEVERITIES)}
    out: dict = {}
    if complete:
        out["corruption_errors"] = {
            c: sum(sev[s] for s in SEVERITIES) / (len(SEVERITIES) * ALEXNET_ERR[c]) for c, sev in complete.items()
        }
        if clean_top1 is not None:
            clean_err = 1.0 - clean_top1
            out["relative_corruption_errors"] = {
                c: sum(sev[s] - clean_err for s in SEVERITIES)
                / (len(SEVERITIES) * (ALEXNET_ERR[c] - ALEXNET_CLEAN_ERR))
                for c, sev in complete.items()
            }
    if set(complete) == set(ALEXNET_ERR):
        out["mCE"] = sum(out["corruption_errors"].values()) / len(ALEXNET_ERR)
        if "relative_corruption_errors" in out:
            out["relative_mCE"] = sum(out["relative_corruption_errors"].values()) / len(ALEXNET_ERR)
    else:
        out["mCE_note"] = MCE_NOTE
    return out


# ---------------------------------------------------------------------------- OOD sets


def parse_ood(spec: Sequence[str] | dict[str, str] | None) -> dict[str, str]:
    """`NAME=URL` items (or a dict) -> {name: url}; names are lower-case (imagenet-a, imagenet-r,
    imagenet-sketch, ...)."""
    if not spec:
        return {}
    items = spec.items() if isinstance(spec, dict) else (_split_item(s) for s in spec)
    out: dict[str, str] = {}
    for name, url in items:
        if not isinstance(name, str) or not SET_NAME_RE.fullmatch(name):
            raise ValueError(f"OOD set name {name!r}: use lower-case letters, digits, '-' and '_' (e.g. imagenet-r)")
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"OOD set {name!r}: no folder URL given")
        if name in out:
            raise ValueError(f"OOD set {name!r} given twice")
        out[name] = url.strip()
    return out


def _split_item(item: str) -> tuple[str, str]:
    name, sep, url = str(item).partition("=")
    if not sep:
        raise ValueError(f"--ood {item!r}: use NAME=FOLDER, e.g. imagenet-r=s3://bucket/imagenet-r")
    return name.strip(), url


def class_subset(folder_classes: Sequence[str], model_classes: Sequence[str], name: str) -> list[int]:
    """The model's head indices of a set's classes (in the set's sorted order). A class the model
    does not know is an error naming it."""
    index = {wnid: i for i, wnid in enumerate(model_classes)}
    unknown = sorted(set(folder_classes) - set(index))
    if unknown:
        raise ValueError(
            f"OOD set {name!r}: classes {unknown[:5]}{'...' if len(unknown) > 5 else ''} are not among the "
            f"model's {len(model_classes)} classes"
        )
    return [index[c] for c in sorted(folder_classes)]


def restrict(logits: torch.Tensor, subset: Sequence[int]) -> torch.Tensor:
    """The logits of the subset's classes only, column j for subset[j] (Hendrycks et al.'s
    `output[:, indices_in_1k]`)."""
    return logits[:, torch.as_tensor(list(subset), dtype=torch.long, device=logits.device)]


def list_folder(url: str, storage_cfg=None) -> tuple[list[tuple[str, str]], list[str]]:
    """([(file URL, class folder)], skipped) of `<url>/<class>/<image>`: regular files inside the
    folder only, one level of class folders; anything else is skipped and named."""
    from pipeline import storage

    fs, root = storage.filesystem(url, storage_cfg)
    root = root.rstrip("/")
    try:
        found = fs.find(root, maxdepth=2, detail=True)
    except FileNotFoundError:
        raise ValueError(f"OOD folder {url} does not exist") from None
    inside = os.path.realpath(root) + os.sep if storage.is_local(url) else None
    samples, skipped = [], []
    for path, info in sorted(found.items()):
        rel = path[len(root) :].lstrip("/")
        parts = rel.split("/")
        if len(parts) != 2 or not parts[1].lower().endswith(IMAGE_EXTS) or parts[0].startswith("."):
            skipped.append(rel)
            continue
        # a link (to a file, or a class folder linked elsewhere) is never followed out of the set
        if info.get("type") != "file" or (inside and not os.path.realpath(path).startswith(inside)):
            skipped.append(rel)
            continue
        samples.append((storage.join(url, parts[0], parts[1]), parts[0]))
    if not samples:
        raise ValueError(f"OOD folder {url}: no images in <class>/<image> layout (found {len(found)} entries)")
    return samples, skipped


def _decode(url: str, size: int, storage_cfg) -> torch.Tensor | str:
    """(3, S, S) float in [0, 1] (pipeline.data's evaluation view), or why it was skipped."""
    from pipeline import storage
    from pipeline.data.augment import CorruptSample, eval_view, image_size

    try:
        data = storage.read_capped(url, storage_cfg, max_bytes=MAX_IMAGE_BYTES)  # UnsafeFile is an OSError
        image_size(data)  # refuses a truncated file or a header claiming too many pixels before decoding
        return eval_view(data, size)
    except (CorruptSample, OSError) as e:
        return str(e) or type(e).__name__


def folder_batches(
    samples: list[tuple[str, int]], size: int, batch_size: int, storage_cfg=None, skipped: list | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images float [0, 1], labels) batches; an image that cannot be read is skipped and appended
    to `skipped` with its reason."""
    with ThreadPoolExecutor(max_workers=4) as pool:  # decoding releases the GIL
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            views = list(pool.map(lambda s: _decode(s[0], size, storage_cfg), chunk))
            good = [(v, label) for v, (url, label) in zip(views, chunk) if isinstance(v, torch.Tensor)]
            if skipped is not None:
                skipped += [f"{url}: {v}" for v, (url, _) in zip(views, chunk) if not isinstance(v, torch.Tensor)]
            if good:
                yield torch.stack([v for v, _ in good]), torch.tensor([label for _, label in good])


def evaluate_ood(
    classify: Callable[[torch.Tensor], torch.Tensor],
    name: str,
    url: str,
    model_classes: Sequence[str],
    *,
    size: int,
    mean,
    std,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    storage_cfg=None,
    max_batches: int | None = None,
) -> dict:
    """Top-1/top-5 of `classify` on an OOD folder; for ImageNet-A/-R on the logits of the set's
    classes only."""
    from pipeline.evaluation import Tally

    samples, not_images = list_folder(url, storage_cfg)
    classes = sorted({c for _, c in samples})
    subset = class_subset(classes, model_classes, name)
    restricted = name in SUBSET_SETS
    position = {c: i for i, c in enumerate(classes)} if restricted else dict(zip(classes, subset))
    labelled = [(u, position[c]) for u, c in samples]
    tally, skipped = Tally((1, 5)), []
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    with torch.no_grad():
        for b, (images, labels) in enumerate(folder_batches(labelled, size, batch_size, storage_cfg, skipped)):
            if max_batches and b >= max_batches:
                break
            logits = classify((images.to(device) - m) / s).float().cpu()
            tally.update(restrict(logits, subset) if restricted else logits, labels)
    result = tally.result()
    return {
        **result,
        "url": url,
        "num_classes": len(classes),
        "logits": f"restricted to the set's {len(classes)} classes" if restricted else "all classes",
        "skipped": len(skipped) + len(not_images),
        "skipped_examples": (skipped + not_images)[:10],
    }
