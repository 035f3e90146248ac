"""A progress picture: input, corrupted input and prediction with their log-magnitude spectra."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline.corruptions import denormalize  # noqa: E402


def log_spectrum(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) centred log(1 + |F|) of the grey image, the view in which MFM masks."""
    grey = images.mean(dim=1)
    return torch.log1p(torch.fft.fftshift(torch.fft.fft2(grey), dim=(-2, -1)).abs())


def save_picture(path: Path, target: torch.Tensor, encoder_input: torch.Tensor, pred: torch.Tensor, *,
                 step: int, samples: int = 4):
    """Write a PNG (rows: samples; columns: the three images, then their spectra); returns the
    figure for TensorBoard."""
    n = min(samples, target.shape[0])
    images = [denormalize(t[:n].detach().float().cpu()).clamp(0, 1) for t in (target, encoder_input, pred)]
    spectra = [log_spectrum(im) for im in images]
    titles = ["input", "corrupted", "prediction", "|F| input", "|F| corrupted", "|F| prediction"]
    fig, axes = plt.subplots(n, 6, figsize=(12, 2.1 * n), squeeze=False)
    for i in range(n):
        for j in range(3):
            axes[i, j].imshow(images[j][i].permute(1, 2, 0).numpy())
            axes[i, j + 3].imshow(spectra[j][i].numpy(), cmap="magma")
    for j, title in enumerate(titles):
        axes[0, j].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(f"step {step}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    tmp.replace(path)  # the flow reads this folder: never show it half a file
    return fig
