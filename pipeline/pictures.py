"""Pictures: what the encoder sees (frequency masking of real photos), and training progress
(input, corrupted input and prediction with their log-magnitude spectra)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kernels.frequency import mask_frequencies  # noqa: E402
from pipeline.corruptions import denormalize  # noqa: E402


def log_spectrum(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) centred log(1 + |F|) of the grey image, the view in which MFM masks."""
    grey = images.mean(dim=1)
    return torch.log1p(torch.fft.fftshift(torch.fft.fft2(grey), dim=(-2, -1)).abs())


def reconstruction(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The image MFM recovers: the frequencies the encoder was given (keep, centred layout) from
    the target, the masked ones from the prediction. The loss scores only the masked ones, so
    the prediction's others are unconstrained and the raw prediction is not a picture of them."""
    spec = lambda x: torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))  # noqa: E731
    k = keep[:, None].float()
    mixed = spec(target) * k + spec(pred) * (1 - k)
    return torch.fft.ifft2(torch.fft.ifftshift(mixed, dim=(-2, -1))).real


def save_picture(
    path: Path,
    target: torch.Tensor,
    encoder_input: torch.Tensor,
    pred: torch.Tensor,
    *,
    step: int,
    samples: int = 4,
    keep: torch.Tensor | None = None,
):
    """Write a PNG (rows: samples; columns: the three images, then their spectra); returns the
    figure for TensorBoard. With `keep` (MFM), the third image is the reconstruction."""
    n = min(samples, target.shape[0])
    pred = pred[:n].detach().float().cpu()
    if keep is not None:
        pred = reconstruction(pred, target[:n].detach().float().cpu(), keep[:n].detach().cpu())
    images = [denormalize(t[:n].detach().float().cpu()).clamp(0, 1) for t in (target, encoder_input, pred)]
    spectra = [log_spectrum(im) for im in images]
    third = "reconstruction" if keep is not None else "prediction"
    titles = ["input", "corrupted", third, "|F| input", "|F| corrupted", f"|F| {third}"]
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


def demo_photos(size: int = 224) -> torch.Tensor:
    """A few real photos shipped with scikit-image, centre-cropped to (N, 3, size, size) in [0, 1]."""
    from skimage import data
    from skimage.transform import resize

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = getattr(data, name)().astype(np.float32) / 255
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        photos.append(resize(img, (size, size), anti_aliasing=True))
    return torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float()


def save_masking_figure(path: Path, images: torch.Tensor, radius: int = 16) -> None:
    """Rows: each photo low-passed, then high-passed. Columns: image, spectrum, masked spectrum,
    corrupted image, as the encoder would see it before normalisation."""
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
