"""`mfm demo`: the main job on the embedded defaults, on a CPU, with everything under one folder."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from kernels.frequency import mask_frequencies


def demo_photos(size: int = 224) -> torch.Tensor:
    """A few real photos shipped with scikit-image, centre-cropped to (N, 3, size, size) in [0, 1]."""
    from skimage import data
    from skimage.transform import resize

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = getattr(data, name)().astype(np.float32) / 255
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        photos.append(resize(img, (size, size), anti_aliasing=True))
    return torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float()


def save_masking_figure(path: Path, images: torch.Tensor, radius: int = 16) -> None:
    """Rows: each photo low-passed, then high-passed. Columns: image, spectrum, masked spectrum,
    corrupted image, as the encoder would see it before normalisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.training.pictures import log_spectrum

    rows = []
    for high in (False, True):
        corrupted, keep = mask_frequencies(images, radius, torch.full((len(images),), high))
        rows += [(img, cor, k, "high-pass" if high else "low-pass") for img, cor, k in zip(images, corrupted, keep)]
    fig, axes = plt.subplots(len(rows), 4, figsize=(9, 2.3 * len(rows)), squeeze=False)
    for i, (img, cor, keep, kind) in enumerate(rows):
        spec = log_spectrum(img[None])[0]
        panels = [(img.permute(1, 2, 0), None), (spec, "magma"), (spec * keep, "magma"), (cor.permute(1, 2, 0), None)]
        for ax, (panel, cmap) in zip(axes[i], panels):
            ax.imshow(panel.numpy(), cmap=cmap)
            ax.set_axis_off()
        axes[i, 0].set_title(kind, fontsize=9, loc="left")
    for j, title in enumerate(["image", "spectrum (log |F|)", f"masked, r = {radius}", "corrupted"]):
        axes[0, j].set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm demo", description=__doc__)
    p.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    args = p.parse_args(argv)
    out = Path(args.out)
    figure = out / "masking.png"
    save_masking_figure(figure, demo_photos())
    print(f"frequency masking of real photos: {figure}")
    return 0
