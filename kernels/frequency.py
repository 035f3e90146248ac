"""Frequency masking and the frequency loss of MFM (shared/MFM_SPEC.md sections 1 and 3).

Pure tensor maths: no files, no config. Two formulations of each op:
- `literal_*`: the spec word for word (fft2, fftshift, full complex mask). The reference.
- the public ops: the same numbers with rfft2, masks cached in unshifted half-spectrum layout
  and one FFT of (pred - target).
"""
from __future__ import annotations

import functools

import torch


def circle_mask(height: int, width: int, radius: float, *, high_pass: bool = False,
                radius2: float | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(H, W) float32 keep-mask, 1 = kept, in the centred (fftshift) layout."""
    i = torch.arange(height, device=device, dtype=torch.float32) - height // 2
    j = torch.arange(width, device=device, dtype=torch.float32) - width // 2
    d2 = i[:, None] ** 2 + j[None, :] ** 2
    keep = d2 < radius**2
    if radius2 is not None:
        keep = keep | (d2 >= radius2**2)
    if high_pass:
        keep = ~keep
    return keep.to(torch.float32)


def literal_mask_frequencies(images: torch.Tensor, radius: float, high_pass: torch.Tensor, *,
                             radius2: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: fftshift(fft2(x)) * keep, ifftshift, ifft2, real, clamp."""
    n, _, h, w = images.shape
    low = circle_mask(h, w, radius, radius2=radius2, device=images.device)
    keep = torch.where(high_pass.to(images.device).view(n, 1, 1), 1 - low, low)
    spec = torch.fft.fftshift(torch.fft.fft2(images.float()), dim=(-2, -1))
    out = torch.fft.ifft2(torch.fft.ifftshift(spec * keep[:, None], dim=(-2, -1))).real
    return out.clamp(0, 1).to(images.dtype), keep


def literal_frequency_loss(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None, *,
                           focal_alpha: float | None = None) -> torch.Tensor:
    """Reference: separate ortho fft2 of pred and target, shifted, masked magnitude mean."""
    fp = torch.fft.fftshift(torch.fft.fft2(pred.float(), norm="ortho"), dim=(-2, -1))
    ft = torch.fft.fftshift(torch.fft.fft2(target.float(), norm="ortho"), dim=(-2, -1))
    diff = fp - ft
    d = torch.sqrt(diff.real**2 + diff.imag**2 + 1e-12)
    if focal_alpha is not None:
        w = d.detach() ** focal_alpha
        d = d * w / w.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    if keep is None:
        return d.mean()
    removed = (1 - keep.float())[:, None]
    return (d * removed).sum() / (removed.sum() * pred.shape[1])


@functools.lru_cache(maxsize=64)
def _half_masks(height: int, width: int, radius: float, radius2: float | None, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-pass keep in unshifted rfft layout (H, W//2+1), and the centred full mask."""
    centred = circle_mask(height, width, radius, radius2=radius2, device=device)
    unshifted = torch.fft.ifftshift(centred, dim=(-2, -1))
    return unshifted[:, : width // 2 + 1].contiguous(), centred


def mask_frequencies(images: torch.Tensor, radius: float, high_pass: torch.Tensor, *,
                     radius2: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency-mask a batch (N, C, H, W) in [0, 1]; one mask per sample, shared by channels.

    high_pass: bool (N,). Returns the clamped corrupted images and keep (N, H, W), centred layout.
    The mask is Hermitian-symmetric, so irfft2(rfft2(x) * half_mask) is exact.
    """
    n, _, h, w = images.shape
    half_low, low = _half_masks(h, w, float(radius), None if radius2 is None else float(radius2), str(images.device))
    hp = high_pass.to(images.device).view(n, 1, 1)
    half_keep = torch.where(hp, 1 - half_low, half_low)
    spec = torch.fft.rfft2(images.float())
    out = torch.fft.irfft2(spec * half_keep[:, None], s=(h, w))
    keep = torch.where(hp, 1 - low, low)
    return out.clamp_(0, 1).to(images.dtype), keep


def frequency_loss(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None, *,
                   focal_alpha: float | None = None) -> torch.Tensor:
    """Mean magnitude of the ortho-FFT difference over the masked frequencies (pooled over the batch).

    keep: (N, H, W) centred layout, 1 = kept by the corruption; None = plain mean over all.
    """
    if focal_alpha is not None:
        return literal_frequency_loss(pred, target, keep, focal_alpha=focal_alpha)
    # The FFT is linear: one transform of the difference instead of two.
    diff = torch.fft.fftshift(torch.fft.fft2((pred.float() - target.float()), norm="ortho"), dim=(-2, -1))
    d = torch.sqrt(diff.real**2 + diff.imag**2 + 1e-12)
    if keep is None:
        return d.mean()
    removed = (1 - keep.float())[:, None]
    return (d * removed).sum() / (removed.sum() * pred.shape[1])
