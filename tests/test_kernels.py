"""kernels.frequency against numpy formulas of shared/MFM_SPEC.md written out here, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import frequency as F

SIZES = [(8, 8), (9, 7), (16, 15), (15, 16), (32, 32)]
TOL = 1e-4


def np_keep(h, w, r, high_pass, r2=None):
    i, j = np.ogrid[:h, :w]
    d2 = (i - h // 2) ** 2 + (j - w // 2) ** 2
    keep = d2 < r * r
    if r2 is not None:
        keep |= d2 >= r2 * r2
    return (~keep if high_pass else keep).astype(np.float64)


def np_corrupt(x, keep):
    spec = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1)) * keep[:, None]
    return np.clip(np.fft.ifft2(np.fft.ifftshift(spec, axes=(-2, -1))).real, 0, 1)


def np_loss_and_grad(pred, target, keep, alpha=None):
    """Loss of spec section 3 and its gradient w.r.t. pred: Re(ifft2(m * dF / d, ortho)) / D."""
    df = np.fft.fft2(pred - target, norm="ortho")
    d = np.sqrt(df.real**2 + df.imag**2 + 1e-12)
    n, c, h, w = pred.shape
    if keep is None:
        m, denom = np.ones((n, 1, h, w)), n * c * h * w
    else:
        removed = np.fft.ifftshift(1 - keep, axes=(-2, -1))[:, None]
        m, denom = removed, removed.sum() * c
    if alpha is not None:
        f = d**alpha
        m = m * f / f.max(axis=(-2, -1), keepdims=True)
    loss = (d * m).sum() / denom
    grad = np.fft.ifft2(m * df / d, norm="ortho").real / denom
    return loss, grad


def _batch(n, h, w, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g, dtype=torch.float64).to(dtype)
    hp = torch.rand(n, generator=g) < 0.5
    hp[0], hp[-1] = False, True  # both kinds in every batch of two or more
    return x, hp


def test_np_gradient_formula_matches_finite_differences():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 2, 5, 6)), rng.normal(size=(2, 2, 5, 6))
    keep = np.stack([np_keep(5, 6, 2, False), np_keep(5, 6, 2, True)])
    _, grad = np_loss_and_grad(pred, target, keep)
    for idx in [(0, 0, 0, 0), (1, 1, 4, 5), (0, 1, 2, 3)]:
        step = np.zeros_like(pred)
        step[idx] = 1e-6
        numeric = (
            np_loss_and_grad(pred + step, target, keep)[0] - np_loss_and_grad(pred - step, target, keep)[0]
        ) / 2e-6
        assert abs(numeric - grad[idx]) < 1e-6


def test_paper_counts_at_224_r16():
    low = F.circle_mask(224, 224, 16)
    high = F.circle_mask(224, 224, 16, high_pass=True)
    assert low.dtype == torch.float32 and low.shape == (224, 224)
    assert int(low.sum()) == 793 and int((1 - low).sum()) == 49_383
    assert int((1 - high).sum()) == 793
    assert low[112, 112] == 1 and high[112, 112] == 0  # DC sits at (H//2, W//2)
    _, keep = F.mask_frequencies(torch.rand(2, 3, 224, 224), 16, torch.tensor([False, True]))
    assert int((1 - keep[0]).sum()) == 49_383 and int((1 - keep[1]).sum()) == 793


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("r,r2", [(2, None), (3.5, None), (2, 5)])
@pytest.mark.parametrize("high_pass", [False, True])
def test_circle_mask_matches_numpy(h, w, r, r2, high_pass):
    got = F.circle_mask(h, w, r, high_pass=high_pass, radius2=r2)
    assert np.array_equal(got.numpy(), np_keep(h, w, r, high_pass, r2))


@pytest.mark.parametrize("op", [F.mask_frequencies, F.literal_mask_frequencies])
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("n,r,r2", [(1, 2, None), (4, 3, None), (5, 2.5, 6)])
def test_mask_frequencies_matches_numpy(op, h, w, n, r, r2):
    x, hp = _batch(n, h, w)
    out, keep = op(x, r, hp, radius2=r2)
    want_keep = np.stack([np_keep(h, w, r, bool(b), r2) for b in hp])
    assert keep.shape == (n, h, w) and np.array_equal(keep.numpy(), want_keep)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert np.abs(out.numpy() - np_corrupt(x.double().numpy(), want_keep)).max() <= TOL


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL), (torch.bfloat16, 2**-8)])
def test_mask_frequencies_dtypes(dtype, tol):
    x, hp = _batch(3, 16, 15, dtype=dtype)
    out, keep = F.mask_frequencies(x, 4, hp)
    want = np_corrupt(x.double().numpy(), np.stack([np_keep(16, 15, 4, bool(b)) for b in hp]))
    assert out.dtype == dtype and np.abs(out.double().numpy() - want).max() <= tol


def test_high_pass_removes_dc_and_clamps():
    x = torch.full((2, 3, 16, 16), 0.7)
    out, _ = F.mask_frequencies(x, 4, torch.tensor([False, True]))
    assert torch.allclose(out[0], x[0], atol=1e-5)  # a constant image is all DC
    assert out[1].abs().max() < 1e-5


@pytest.mark.parametrize("op", [F.frequency_loss, F.literal_frequency_loss])
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("keep_kind", ["none", "circle", "random"])
@pytest.mark.parametrize("alpha", [None, 1.0])
def test_frequency_loss_and_gradient_match_numpy(op, h, w, keep_kind, alpha):
    n = 3
    g = torch.Generator().manual_seed(h * 100 + w)
    pred = torch.randn(n, 3, h, w, generator=g)
    target = torch.randn(n, 3, h, w, generator=g)
    if keep_kind == "none":
        keep = None
    elif keep_kind == "circle":
        keep = torch.stack([F.circle_mask(h, w, 3, high_pass=b) for b in (False, True, False)])
    else:  # not Hermitian-symmetric: the half-spectrum formulation must still be exact
        keep = (torch.rand(n, h, w, generator=g) < 0.4).float()
    want, want_grad = np_loss_and_grad(
        pred.double().numpy(), target.double().numpy(), None if keep is None else keep.double().numpy(), alpha
    )
    pred.requires_grad_(True)
    loss = op(pred, target, keep, focal_alpha=alpha)
    loss.backward()
    assert loss.shape == () and abs(loss.item() - want) <= TOL
    assert np.abs(pred.grad.double().numpy() - want_grad).max() <= TOL


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_frequency_loss_dtypes_and_target_gradient(dtype):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 3, 9, 10, generator=g).to(dtype).requires_grad_(True)
    target = torch.randn(2, 3, 9, 10, generator=g).to(dtype).requires_grad_(True)
    keep = torch.stack([F.circle_mask(9, 10, 2), F.circle_mask(9, 10, 2, high_pass=True)])
    want, want_grad = np_loss_and_grad(
        pred.double().detach().numpy(), target.double().detach().numpy(), keep.double().numpy()
    )
    loss = F.frequency_loss(pred, target, keep)
    loss.backward()
    assert abs(loss.item() - want) <= TOL
    assert pred.grad.dtype == dtype and target.grad.dtype == dtype
    tol = TOL if dtype == torch.float64 else 2**-8 * np.abs(want_grad).max()
    assert np.abs(pred.grad.double().numpy() - want_grad).max() <= tol
    assert np.abs(target.grad.double().numpy() + want_grad).max() <= tol


def test_corrupt_then_loss_at_224():
    x, hp = _batch(2, 224, 224)
    out, keep = F.mask_frequencies(x, 16, hp)
    want_keep = np.stack([np_keep(224, 224, 16, bool(b)) for b in hp])
    assert np.abs(out.numpy() - np_corrupt(x.double().numpy(), want_keep)).max() <= TOL
    pred = out.clone().requires_grad_(True)
    loss = F.frequency_loss(pred, x, keep)
    loss.backward()
    want, want_grad = np_loss_and_grad(out.double().numpy(), x.double().numpy(), want_keep)
    assert abs(loss.item() - want) <= TOL and np.abs(pred.grad.numpy() - want_grad).max() <= TOL


def test_masks_are_cached_per_size_radius_device():
    F._masks.cache_clear()
    x, hp = _batch(2, 16, 16)
    for r in (3, 3, 4):
        F.mask_frequencies(x, r, hp)
    info = F._masks.cache_info()
    assert (info.hits, info.misses) == (1, 2)
