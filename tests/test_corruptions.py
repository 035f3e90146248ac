import numpy as np
import pytest
import torch
from PIL import Image

from kernels.frequency import circle_mask
from pipeline.config import CorruptionConfig
from pipeline.corruptions import IMAGENET_MEAN, IMAGENET_STD, corrupt, denormalize


def images(n=6, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["mfm", "sr", "deblur", "denoise"])
def test_interface_and_reproducibility(kind):
    cfg = CorruptionConfig(kind=kind, radius=4)
    x = images()
    a = corrupt(x, cfg, gen(1))
    b = corrupt(x, cfg, gen(1))
    assert a[0].shape == x.shape and a[0].dtype == torch.float32
    assert torch.equal(a[0], b[0])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(a[1], (x - mean) / std)  # target: the clean image, normalised
    assert (a[2] is not None) == (kind == "mfm")


def test_mfm_draws_low_pass_with_probability():
    x = images(n=400, size=16)
    for p, expect in [(0.0, 0.0), (1.0, 1.0), (0.3, 0.3)]:
        _, _, keep = corrupt(x, CorruptionConfig(radius=4, low_pass_prob=p), gen(2))
        low = circle_mask(16, 16, 4)
        is_low = (keep == low).flatten(1).all(1)
        is_high = (keep == 1 - low).flatten(1).all(1)
        assert bool((is_low | is_high).all())
        assert abs(is_low.float().mean().item() - expect) < 0.07


def test_mfm_masking_happens_before_normalisation():
    x = images(n=4)
    enc, _, keep = corrupt(x, CorruptionConfig(radius=4, low_pass_prob=1.0), gen())
    raw = denormalize(enc)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5  # clamped to [0,1] before normalising
    spectrum = torch.fft.fftshift(torch.fft.fft2(raw), dim=(-2, -1)).abs()
    # low-pass keeps the disc only (up to the clamp, which is rare for a low-passed image)
    outside = spectrum * (1 - keep[:, None])
    assert outside.max() < 0.05 * spectrum.max()


def test_sr_matches_pil_bicubic():
    x = images(n=2, size=64)
    enc, _, _ = corrupt(x, CorruptionConfig(kind="sr", sr_factor=8), gen())
    got = denormalize(enc)
    for i in range(2):
        for c in range(3):
            im = Image.fromarray(x[i, c].numpy(), mode="F")
            small = np.clip(np.asarray(im.resize((8, 8), Image.BICUBIC)), 0, 1)
            up = np.clip(np.asarray(Image.fromarray(small, mode="F").resize((64, 64), Image.BICUBIC)), 0, 1)
            assert np.abs(got[i, c].numpy() - up).mean() < 0.02


def _blur_numpy(img, k, sigma):
    half = (k - 1) / 2
    t = np.linspace(-half, half, k)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    pad = k // 2
    p = np.pad(img, ((pad, pad), (pad, pad)), mode="reflect")  # numpy's reflect is reflect-101
    rows = np.stack([np.convolve(r, w, mode="valid") for r in p])
    return np.stack([np.convolve(c, w, mode="valid") for c in rows.T]).T


def test_deblur_matches_numpy_gaussian():
    x = images(n=3, size=32)
    for k in (7, 21):
        enc, _, _ = corrupt(x, CorruptionConfig(kind="deblur", blur_kernel_sizes=[k]), gen())
        got = denormalize(enc)
        for i in range(3):
            for c in range(3):
                np.testing.assert_allclose(
                    got[i, c].numpy(), _blur_numpy(x[i, c].numpy().astype(np.float64), k, 5.0), atol=1e-5
                )


def test_deblur_draws_kernel_sizes_per_sample():
    x = images(n=64, size=32)
    cfg = CorruptionConfig(kind="deblur")
    enc, _, _ = corrupt(x, cfg, gen(3))
    got = denormalize(enc)
    matched = set()
    for i in range(64):
        errs = {
            k: (got[i, 0].numpy() - _blur_numpy(x[i, 0].numpy().astype(np.float64), k, 5.0)).__abs__().max()
            for k in cfg.blur_kernel_sizes
        }
        best = min(errs, key=errs.get)
        assert errs[best] < 1e-5
        matched.add(best)
    assert len(matched) >= 6  # 8 sizes, 64 draws


def test_denoise_statistics():
    x = torch.full((8, 3, 64, 64), 0.5)
    enc, _, _ = corrupt(x, CorruptionConfig(kind="denoise"), gen())
    noise = denormalize(enc) - 0.5
    assert abs(noise.std().item() - 75 / 255) < 0.01
    assert noise.min() < -0.5  # not clamped
    corr = np.corrcoef(noise[:, 0].flatten().numpy(), noise[:, 1].flatten().numpy())[0, 1]
    assert abs(corr) < 0.05
