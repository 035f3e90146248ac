"""The GPU path of kernels.frequency (compiled Triton kernels) against the literal formulation
computed in float64 on the CPU. Skipped on machines without CUDA; run on a GPU machine with
`pytest tests/test_kernels_cuda.py`."""

from __future__ import annotations

import sys

import pytest
import torch

from kernels import frequency as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (batch, height, width): odd and even sides, W//2+1 filling a tile exactly (14), several
# programs per image, and the paper's 224 px.
SIZES = [(3, 9, 7), (4, 15, 16), (2, 12, 14), (3, 32, 33), (8, 224, 224)]


def _literal64(fn, *tensors, **kw):
    return fn(*(t.detach().double().cpu() if t is not None else None for t in tensors), **kw)


@pytest.mark.parametrize("n,h,w", SIZES)
@pytest.mark.parametrize("radius,radius2", [(3, None), (4, 7)])
def test_corruption_on_gpu_matches_literal(n, h, w, radius, radius2):
    x = torch.rand(n, 3, h, w, device="cuda")
    hp = torch.rand(n, device="cuda") < 0.5
    got, keep = F.mask_frequencies(x, radius, hp, radius2=radius2)
    assert "kernels.triton_frequency" in sys.modules  # dispatched to the Triton path
    want, want_keep = F.literal_mask_frequencies(x.double().cpu(), radius, hp.cpu(), radius2=radius2)
    assert got.is_cuda and got.dtype == x.dtype and got.shape == x.shape
    assert torch.isfinite(got).all()
    assert (got.cpu().double() - want).abs().max() < 1e-4
    assert torch.equal(keep.cpu(), want_keep.float())


@pytest.mark.parametrize("n,h,w", SIZES)
@pytest.mark.parametrize("keep_kind", ["none", "circle", "random"])
def test_loss_and_gradients_on_gpu_match_literal(n, h, w, keep_kind):
    pred = torch.randn(n, 3, h, w, device="cuda", requires_grad=True)
    target = torch.randn(n, 3, h, w, device="cuda", requires_grad=True)
    if keep_kind == "none":
        keep = None
    elif keep_kind == "circle":
        keep = F.mask_frequencies(torch.rand(n, 3, h, w, device="cuda"), 3, torch.arange(n, device="cuda") % 2 == 0)[1]
    else:  # not Hermitian-symmetric: the mirror averaging must still give the exact full-spectrum value
        keep = (torch.rand(n, h, w, device="cuda") < 0.3).float()
    loss = F.frequency_loss(pred, target, keep)
    (loss * 3).backward()

    p64 = pred.detach().double().cpu().requires_grad_(True)
    want = F.literal_frequency_loss(p64, target.detach().double().cpu(), None if keep is None else keep.cpu())
    (want * 3).backward()
    assert abs(loss.item() - want.item()) <= 1e-4 * max(1.0, abs(want.item()))
    scale = p64.grad.abs().max().item()
    assert (pred.grad.cpu().double() - p64.grad).abs().max().item() <= 1e-4 * scale
    assert torch.allclose(target.grad, -pred.grad)


def test_channels_last_and_bf16_inputs_on_gpu():
    x = torch.rand(4, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    hp = torch.tensor([True, False, True, False], device="cuda")
    got, _ = F.mask_frequencies(x, 5, hp)
    want, _ = F.literal_mask_frequencies(x.double().cpu(), 5, hp.cpu())
    assert (got.cpu().double() - want).abs().max() < 1e-4

    pred = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    F.frequency_loss(pred, target).backward()
    assert pred.grad.dtype == torch.bfloat16 and torch.isfinite(pred.grad.float()).all()
    want = F.literal_frequency_loss(pred.detach().double().cpu(), target.double().cpu())
    assert abs(F.frequency_loss(pred, target).item() - want.item()) < 1e-4 * want.item()


def test_corruptions_agree_between_gpu_and_cpu():
    from pipeline.config import load_config
    from pipeline.corruptions import corrupt

    x = torch.rand(6, 3, 64, 64)
    for kind in ("mfm", "sr", "deblur", "denoise"):
        cfg = load_config(None, [f"corruption.kind={kind}", "model.img_size=64"]).corruption
        cpu = corrupt(x, cfg, torch.Generator().manual_seed(1))
        gpu = corrupt(x.cuda(), cfg, torch.Generator().manual_seed(1))
        for a, b in zip(cpu, gpu):
            if a is None:
                assert b is None
                continue
            assert b.is_cuda and (a - b.cpu()).abs().max() < 1e-4, kind


@pytest.mark.parametrize("kind", ["mfm", "denoise"])
def test_a_batch_is_corrupted_and_its_loss_taken_without_a_host_sync(kind):
    """The per-batch path of a GPU loader and the loss: the high-pass draws (made on the host)
    go to the device through pinned memory, the noise is drawn on the device, the masks and the
    normalisation constants are made once per device, the loss copies no constant. Any host
    sync raises under torch's sync debug mode."""
    from pipeline.config import CorruptionConfig
    from pipeline.data.augment import corrupt_samples

    cfg = CorruptionConfig(kind=kind)
    images = torch.rand(8, 3, 64, 64, device="cuda")
    seeds = list(range(8))
    corrupt_samples(images, cfg, seeds)  # the per-device caches fill here
    pred = torch.randn(8, 3, 64, 64, device="cuda", requires_grad=True)
    F.frequency_loss(pred, images, None).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        enc, target, keep = corrupt_samples(images, cfg, seeds)
        loss = F.frequency_loss(pred, target, keep)
        loss.backward()
        F.frequency_loss(pred, target, None).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert enc.is_cuda and (keep is None) == (kind != "mfm")
    if kind == "denoise":  # the same noise as a sample drawn alone on the device from its seed
        alone = corrupt_samples(images[3:4], cfg, seeds[3:4])[0]
        torch.testing.assert_close(enc[3:4], alone)
