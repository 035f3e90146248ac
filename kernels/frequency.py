"""Frequency masking and the frequency loss of MFM (shared/MFM_SPEC.md sections 1 and 3).

Pure tensor maths: no files, no config. Two formulations of each op:
- `literal_*`: the spec word for word (fft2, fftshift, full complex mask). The reference.
- the public ops: the same numbers with rfft2, masks cached in unshifted half-spectrum layout
  and one FFT of (pred - target). CUDA tensors go through the Triton kernels of
  `kernels.triton_frequency`; everything else through vectorised torch ops.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

EPS = 1e-12  # inside the sqrt of the spec's magnitude


def circle_mask(
    height: int,
    width: int,
    radius: float,
    *,
    high_pass: bool = False,
    radius2: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
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


def literal_mask_frequencies(
    images: torch.Tensor, radius: float, high_pass: torch.Tensor, *, radius2: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: fftshift(fft2(x)) * keep, ifftshift, ifft2, real, clamp."""
    n, _, h, w = images.shape
    low = circle_mask(h, w, radius, radius2=radius2, device=images.device)
    keep = torch.where(high_pass.to(images.device).view(n, 1, 1), 1 - low, low)
    spec = torch.fft.fftshift(torch.fft.fft2(images.float()), dim=(-2, -1))
    out = torch.fft.ifft2(torch.fft.ifftshift(spec * keep[:, None], dim=(-2, -1))).real
    return out.clamp(0, 1).to(images.dtype), keep


def literal_frequency_loss(
    pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None, *, focal_alpha: float | None = None
) -> torch.Tensor:
    """Reference: separate ortho fft2 of pred and target, shifted, masked magnitude mean."""
    fp = torch.fft.fftshift(torch.fft.fft2(pred.float(), norm="ortho"), dim=(-2, -1))
    ft = torch.fft.fftshift(torch.fft.fft2(target.float(), norm="ortho"), dim=(-2, -1))
    diff = fp - ft
    d = torch.sqrt(diff.real**2 + diff.imag**2 + EPS)
    if focal_alpha is not None:
        w = d.detach() ** focal_alpha
        d = d * w / w.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    if keep is None:
        return d.mean()
    removed = (1 - keep.float())[:, None]
    return (d * removed).sum() / (removed.sum() * pred.shape[1])


@functools.lru_cache(maxsize=64)
def _masks(
    height: int, width: int, radius: float, radius2: float | None, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """[low, high] keep masks: (2, H, W//2+1) unshifted half layout, and (2, H, W) centred."""
    low = circle_mask(height, width, radius, radius2=radius2, device=device)
    centred = torch.stack([low, 1 - low])
    half = torch.fft.ifftshift(centred, dim=(-2, -1))[..., : width // 2 + 1].contiguous()
    return half, centred


@functools.lru_cache(maxsize=64)
def _half_layout(height: int, width: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather indices from a flat centred (H*W) map to the half spectrum at (u, v) and at its
    mirror (-u, -v); and the Hermitian column weights (W//2+1,)."""
    wh = width // 2 + 1
    u = torch.arange(height, device=device)[:, None]
    v = torch.arange(wh, device=device)[None, :]
    at = (u + height // 2) % height * width + (v + width // 2) % width
    mirror = (height - u + height // 2) % height * width + (width - v + width // 2) % width
    # Column v of the half spectrum also stands for column W - v, except DC and (even W) Nyquist.
    cols = torch.full((wh,), 2.0, device=device)
    cols[0] = 1.0
    if width % 2 == 0:
        cols[-1] = 1.0
    return at.flatten(), mirror.flatten(), cols


def _half_removed(keep: torch.Tensor, width: int) -> torch.Tensor:
    """(N, H, W//2+1) share of each half-spectrum entry that the loss counts: 1 - keep averaged
    with its mirror frequency. |F(-k)| = |F(k)| for a real signal, so this is exact for any keep,
    Hermitian-symmetric or not."""
    n, h, _ = keep.shape
    at, mirror, _ = _half_layout(h, width, str(keep.device))
    flat = keep.reshape(n, -1).float()
    return (1 - 0.5 * (flat[:, at] + flat[:, mirror])).view(n, h, -1)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without a host sync: through pinned memory (torch's caching
    host allocator keeps the block until the copy is done), where a copy from pageable memory
    would wait for the device."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def mask_frequencies(
    images: torch.Tensor, radius: float, high_pass: torch.Tensor, *, radius2: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency-mask a batch (N, C, H, W) in [0, 1]; one mask per sample, shared by channels.

    high_pass: bool (N,). Returns the clamped corrupted images and keep (N, H, W), centred layout.
    """
    return _mask_frequencies(
        images, radius, high_pass, radius2=radius2, backend="triton" if _use_triton(images) else "torch"
    )


def _mask_frequencies(images, radius, high_pass, *, radius2=None, backend="torch"):
    n, _, h, w = images.shape
    half, centred = _masks(h, w, float(radius), None if radius2 is None else float(radius2), str(images.device))
    which = _to_device(high_pass.reshape(n), images.device).long()
    spec = torch.fft.rfft2(images.float())
    if backend == "triton":
        from kernels import triton_frequency

        # The kernel indexes a dense (N, C, H, W//2+1) layout; channels_last input breaks that.
        spec = spec.contiguous()
        triton_frequency.mask_spectrum_(spec, half[0], which)
    else:
        # The mask is Hermitian-symmetric, so irfft2(rfft2(x) * half mask) is exact. Multiplying
        # the real view avoids promoting the mask to complex and a complex multiply.
        torch.view_as_real(spec).mul_(half[which][:, None, :, :, None])
    out = torch.fft.irfft2(spec, s=(h, w)).clamp_(0, 1)
    return out.to(images.dtype), centred[which]


def frequency_loss(
    pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None, *, focal_alpha: float | None = None
) -> torch.Tensor:
    """Mean magnitude of the ortho-FFT difference over the masked frequencies (pooled over the batch).

    keep: (N, H, W) centred layout, 1 = kept by the corruption; None = plain mean over all.
    focal_alpha: focal-frequency-loss weighting |dF|^alpha / max (detached); off by default.
    """
    backend = "triton" if focal_alpha is None and _use_triton(pred) else "torch"
    return _FrequencyLoss.apply(pred, target, keep, focal_alpha, backend)


def _magnitude(z: torch.Tensor) -> torch.Tensor:
    """sqrt(re^2 + im^2 + EPS) with in-place ops; abs() has no EPS and square().sum(-1) is slow."""
    re, im = z.real, z.imag
    return (re * re).addcmul_(im, im).add_(EPS).sqrt_()


class _FrequencyLoss(torch.autograd.Function):
    """loss = sum_k m_k |Z_k| / D with Z = rfft2(pred - target, ortho) over the half spectrum.

    Gradient: dL/dpred = irfft2(m * Z / |Z| / D, ortho); irfft2 supplies the mirrored half,
    so m carries no column weights there.
    """

    @staticmethod
    def forward(ctx, pred, target, keep, focal_alpha, backend):
        n, c, h, w = pred.shape
        # The FFT is linear: one transform of the difference instead of two.
        z = torch.fft.rfft2(pred.float() - target.float(), norm="ortho")
        if keep is None:
            denom = float(n * c * h * w)  # a Python number: no tensor to copy to the device per call
        else:
            keep = keep.float()
            denom = (keep.numel() - keep.sum()) * c
        if backend == "triton":
            from kernels import triton_frequency

            z = z.contiguous()
            total = triton_frequency.masked_magnitude_sum(z, keep, w)
            ctx.save_for_backward(z, keep)
        else:
            _, _, cols = _half_layout(h, w, str(pred.device))
            d = _magnitude(z)
            m = None if keep is None else _half_removed(keep, w)[:, None]
            if focal_alpha is not None:
                f = d**focal_alpha
                f.div_(f.amax(dim=(-2, -1), keepdim=True).clamp_min_(1e-12))
                m = f if m is None else f.mul_(m)
            if m is None:
                total = d.sum(dim=(0, 1, 2)) @ cols
            elif focal_alpha is None:
                # Channels share the mask: sum them first, then one dot product.
                total = torch.vdot(d.sum(1).flatten(), (m[:, 0] * cols).flatten())
            else:
                total = torch.vdot(d.flatten(), (m * cols).flatten())
            ctx.save_for_backward(z, d, m)
        ctx.denom = denom
        ctx.meta = (backend, pred.dtype, target.dtype, h, w)
        return total / denom

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        backend, pdtype, tdtype, h, w = ctx.meta
        if backend == "triton":
            from kernels import triton_frequency

            z, keep = ctx.saved_tensors
            g = triton_frequency.loss_grad(z, keep, w, grad.float() / ctx.denom)
        else:
            z, d, m = ctx.saved_tensors
            scale = grad.float() / ctx.denom
            factor = torch.div(scale if m is None else m * scale, d)
            g = torch.view_as_complex(torch.view_as_real(z) * factor[..., None])
        ge = torch.fft.irfft2(g, s=(h, w), norm="ortho")
        gp = ge.to(pdtype) if ctx.needs_input_grad[0] else None
        gt = (-ge).to(tdtype) if ctx.needs_input_grad[1] else None
        return gp, gt, None, None, None
