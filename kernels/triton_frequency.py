"""Triton kernels for the GPU path of kernels.frequency. Imports triton at load time, so
kernels.frequency imports this module only for CUDA tensors.

All spectra are rfft2 half spectra (N, C, H, W//2+1) complex64, unshifted, read as float pairs.
Keep masks stay (N, H, W) centred as the public API hands them out; the kernels find the
centred position of each half-spectrum entry, and of its mirror, by index arithmetic, so no
shifted copy is ever written.

Each program takes ROWS whole spectrum rows (flattened (n, c, u)), so divisions and modulos
happen once per row; per element there are only adds and compares. Integer division per
element would make these kernels compute-bound instead of bandwidth-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pairs(rows, v, WH):
    # [ROWS, COLS, 2] offsets of (re, im) in the float view of the half spectrum.
    offs = rows.to(tl.int64)[:, None] * WH + v[None, :]
    return offs[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]


@triton.jit
def _removed_share(keep_ptr, rows, v, valid, C, H, W):
    # 1 - keep averaged over (u, v) and (-u, -v): exact for any keep since |F(-k)| = |F(k)|.
    # Unshifted (u, v) sits at centred ((u + H//2) % H, (v + W//2) % W).
    u = rows % H
    base = (rows // (C * H)).to(tl.int64) * H * W
    i1 = u + H // 2
    i1 = tl.where(i1 >= H, i1 - H, i1)
    i2 = H // 2 - u
    i2 = tl.where(i2 < 0, i2 + H, i2)
    j1 = v + W // 2
    j1 = tl.where(j1 >= W, j1 - W, j1)
    j2 = W // 2 - v
    j2 = tl.where(j2 < 0, j2 + W, j2)
    k1 = tl.load(keep_ptr + (base + i1 * W)[:, None] + j1[None, :], mask=valid, other=1.0)
    k2 = tl.load(keep_ptr + (base + i2 * W)[:, None] + j2[None, :], mask=valid, other=1.0)
    return 1.0 - 0.5 * (k1.to(tl.float32) + k2.to(tl.float32))


@triton.jit
def _masked_magnitude_sum_kernel(
    z_ptr, keep_ptr, partial_ptr, n_rows, C, H, W, WH, HAS_KEEP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    v = tl.arange(0, COLS)
    valid = (rows < n_rows)[:, None] & (v < WH)[None, :]
    x = tl.load(z_ptr + _pairs(rows, v, WH), mask=valid[:, :, None], other=0.0)
    d = tl.sqrt(tl.sum(x * x, axis=2) + 1e-12)
    # Half-spectrum columns other than DC and (even W) Nyquist also stand for column W - v.
    weight = tl.where((v == 0) | (2 * v == W), 1.0, 2.0)[None, :]
    if HAS_KEEP:
        weight = weight * _removed_share(keep_ptr, rows, v, valid, C, H, W)
    part = tl.sum(tl.where(valid, d * weight, 0.0), axis=1)
    tl.store(partial_ptr + pid, tl.sum(part, axis=0))


@triton.jit
def _loss_grad_kernel(
    z_ptr,
    keep_ptr,
    scale_ptr,
    g_ptr,
    n_rows,
    C,
    H,
    W,
    WH,
    HAS_KEEP: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    v = tl.arange(0, COLS)
    valid = (rows < n_rows)[:, None] & (v < WH)[None, :]
    pairs = _pairs(rows, v, WH)
    x = tl.load(z_ptr + pairs, mask=valid[:, :, None], other=0.0)
    d = tl.sqrt(tl.sum(x * x, axis=2) + 1e-12)
    factor = tl.load(scale_ptr) / d
    if HAS_KEEP:
        factor = factor * _removed_share(keep_ptr, rows, v, valid, C, H, W)
    tl.store(g_ptr + pairs, x * factor[:, :, None], mask=valid[:, :, None])


@triton.jit
def _mask_spectrum_kernel(z_ptr, low_ptr, which_ptr, n_rows, C, H, WH, ROWS: tl.constexpr, COLS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    v = tl.arange(0, COLS)
    in_rows = rows < n_rows
    valid = in_rows[:, None] & (v < WH)[None, :]
    low = tl.load(low_ptr + ((rows % H) * WH)[:, None] + v[None, :], mask=valid, other=0.0)
    high = tl.load(which_ptr + rows // (C * H), mask=in_rows, other=0)
    keep = tl.where((high != 0)[:, None], 1.0 - low, low)
    pairs = _pairs(rows, v, WH)
    x = tl.load(z_ptr + pairs, mask=valid[:, :, None], other=0.0)
    tl.store(z_ptr + pairs, x * keep[:, :, None], mask=valid[:, :, None])


def _tile(cols: int) -> tuple[int, int]:
    """(ROWS, num_warps) for a row of `cols` (a power of two) entries: about 512 per program.
    A sweep on an H200 at 256x3x224x224 (docs/kernels-gpu.md) put 4x128 tiles with 4 warps at
    or near the top for all three kernels; 8x128 was 10-40% slower."""
    return max(1, 512 // cols), 4


def _layout(z: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """Float view of z, the row count, a (ROWS, COLS) tile and the warps per program."""
    if z.dtype != torch.complex64 or not z.is_contiguous():
        raise ValueError("expected a contiguous complex64 half spectrum")
    cols = triton.next_power_of_2(z.shape[-1])
    rows, warps = _tile(cols)
    return torch.view_as_real(z), z.numel() // z.shape[-1], rows, cols, warps


def _keep_arg(keep: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """keep as the kernels read it: float32 or uint8 as given (bool as uint8), anything else as
    float32; without keep, any pointer (HAS_KEEP=False never reads it)."""
    if keep is None:
        return placeholder
    if keep.dtype == torch.bool:
        keep = keep.view(torch.uint8)
    elif keep.dtype not in (torch.float32, torch.uint8):
        keep = keep.float()
    return keep.contiguous()


def mask_spectrum_(z: torch.Tensor, low_half: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """In place: z (N, C, H, Wh) *= low_half (H, Wh) where which[n] == 0, else 1 - low_half."""
    _, c, h, wh = z.shape
    zf, n_rows, rows, cols, warps = _layout(z)
    _mask_spectrum_kernel[(triton.cdiv(n_rows, rows),)](
        zf, low_half.contiguous(), which.contiguous(), n_rows, c, h, wh, ROWS=rows, COLS=cols, num_warps=warps
    )
    return z


def masked_magnitude_sum(z: torch.Tensor, keep: torch.Tensor | None, width: int) -> torch.Tensor:
    """Full-spectrum sum of |Z| * (1 - keep) (all ones when keep is None), from the half spectrum."""
    _, c, h, wh = z.shape
    zf, n_rows, rows, cols, warps = _layout(z)
    grid = triton.cdiv(n_rows, rows)
    partial = torch.empty(grid, device=z.device, dtype=torch.float32)
    keep_arg = _keep_arg(keep, zf)
    _masked_magnitude_sum_kernel[(grid,)](
        zf, keep_arg, partial, n_rows, c, h, width, wh, HAS_KEEP=keep is not None, ROWS=rows, COLS=cols, num_warps=warps
    )
    return partial.sum()


def loss_grad(z: torch.Tensor, keep: torch.Tensor | None, width: int, scale: torch.Tensor) -> torch.Tensor:
    """Half spectrum of the loss gradient: Z / |Z| * (1 - keep, mirror-averaged) * scale."""
    _, c, h, wh = z.shape
    zf, n_rows, rows, cols, warps = _layout(z)
    g = torch.empty_like(z)
    keep_arg = _keep_arg(keep, zf)
    _loss_grad_kernel[(triton.cdiv(n_rows, rows),)](
        zf,
        keep_arg,
        scale.reshape(1).float().contiguous(),
        torch.view_as_real(g),
        n_rows,
        c,
        h,
        width,
        wh,
        HAS_KEEP=keep is not None,
        ROWS=rows,
        COLS=cols,
        num_warps=warps,
    )
    return g
