"""Triton kernels for the GPU path of kernels.frequency. Imports triton at load time, so
kernels.frequency imports this module only for CUDA tensors.

All spectra are rfft2 half spectra (N, C, H, W//2+1) complex64, unshifted, read as float pairs.
Keep masks stay (N, H, W) centred as the public API hands them out; the kernels find the
centred position of each half-spectrum entry, and of its mirror, by index arithmetic, so no
shifted copy is ever written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _removed_share(keep_ptr, offs, valid, C, H, W, WH):
    # 1 - keep averaged over (u, v) and (-u, -v): exact for any keep since |F(-k)| = |F(k)|.
    v = offs % WH
    u = (offs // WH) % H
    n = offs // (C * H * WH)
    base = n * H * W
    k1 = tl.load(keep_ptr + base + ((u + H // 2) % H) * W + (v + W // 2) % W, mask=valid, other=1.0)
    k2 = tl.load(keep_ptr + base + ((H - u + H // 2) % H) * W + (W - v + W // 2) % W, mask=valid, other=1.0)
    return 1.0 - 0.5 * (k1 + k2)


@triton.jit
def _masked_magnitude_sum_kernel(z_ptr, keep_ptr, partial_ptr, total, C, H, W, WH,
                                 HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    pairs = offs[:, None] * 2 + tl.arange(0, 2)[None, :]
    x = tl.load(z_ptr + pairs, mask=valid[:, None], other=0.0)
    d = tl.sqrt(tl.sum(x * x, axis=1) + 1e-12)
    v = offs % WH
    # Half-spectrum columns other than DC and (even W) Nyquist also stand for column W - v.
    weight = tl.where((v == 0) | (2 * v == W), 1.0, 2.0)
    if HAS_KEEP:
        weight = weight * _removed_share(keep_ptr, offs, valid, C, H, W, WH)
    tl.store(partial_ptr + pid, tl.sum(tl.where(valid, d * weight, 0.0), axis=0))


@triton.jit
def _loss_grad_kernel(z_ptr, keep_ptr, scale_ptr, g_ptr, total, C, H, W, WH,
                      HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    pairs = offs[:, None] * 2 + tl.arange(0, 2)[None, :]
    x = tl.load(z_ptr + pairs, mask=valid[:, None], other=0.0)
    d = tl.sqrt(tl.sum(x * x, axis=1) + 1e-12)
    factor = tl.load(scale_ptr) / d
    if HAS_KEEP:
        factor = factor * _removed_share(keep_ptr, offs, valid, C, H, W, WH)
    tl.store(g_ptr + pairs, x * factor[:, None], mask=valid[:, None])


@triton.jit
def _mask_spectrum_kernel(z_ptr, low_ptr, which_ptr, total, C, HWH, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    low = tl.load(low_ptr + offs % HWH, mask=valid, other=0.0)
    high = tl.load(which_ptr + offs // (C * HWH), mask=valid, other=0)
    keep = tl.where(high != 0, 1.0 - low, low)
    pairs = offs[:, None] * 2 + tl.arange(0, 2)[None, :]
    x = tl.load(z_ptr + pairs, mask=valid[:, None], other=0.0)
    tl.store(z_ptr + pairs, x * keep[:, None], mask=valid[:, None])


def _check(z: torch.Tensor) -> torch.Tensor:
    if z.dtype != torch.complex64 or not z.is_contiguous():
        raise ValueError("expected a contiguous complex64 half spectrum")
    return torch.view_as_real(z)


def mask_spectrum_(z: torch.Tensor, low_half: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """In place: z (N, C, H, Wh) *= low_half (H, Wh) for which[n] == 0, else 1 - low_half."""
    n, c, h, wh = z.shape
    total = z.numel()
    _mask_spectrum_kernel[(triton.cdiv(total, BLOCK),)](
        _check(z), low_half.contiguous(), which.contiguous(), total, c, h * wh, BLOCK=BLOCK)
    return z


def masked_magnitude_sum(z: torch.Tensor, keep: torch.Tensor | None, width: int) -> torch.Tensor:
    """Full-spectrum sum of |Z| * (1 - keep) (all ones when keep is None), from the half spectrum."""
    n, c, h, wh = z.shape
    total = z.numel()
    grid = triton.cdiv(total, BLOCK)
    partial = torch.empty(grid, device=z.device, dtype=torch.float32)
    keep_arg = torch.view_as_real(z) if keep is None else keep.float().contiguous()  # never read when HAS_KEEP is False
    _masked_magnitude_sum_kernel[(grid,)](_check(z), keep_arg, partial, total, c, h, width, wh,
                                          HAS_KEEP=keep is not None, BLOCK=BLOCK)
    return partial.sum()


def loss_grad(z: torch.Tensor, keep: torch.Tensor | None, width: int, scale: torch.Tensor) -> torch.Tensor:
    """Half spectrum of the loss gradient: Z / |Z| * (1 - keep, mirror-averaged) * scale."""
    n, c, h, wh = z.shape
    total = z.numel()
    g = torch.empty_like(z)
    keep_arg = torch.view_as_real(z) if keep is None else keep.float().contiguous()
    _loss_grad_kernel[(triton.cdiv(total, BLOCK),)](
        _check(z), keep_arg, scale.reshape(1).float().contiguous(), torch.view_as_real(g), total, c, h, width, wh,
        HAS_KEEP=keep is not None, BLOCK=BLOCK)
    return g
