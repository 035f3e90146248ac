"""The pretext corruptions behind one interface (shared/MFM_SPEC.md sections 1 and 4).

`corrupt(images, cfg, generator)` turns a batch of [0, 1] RGB images (N, 3, H, W) into
(encoder_input, target, keep): both images normalised with the ImageNet mean/std, keep the
(N, H, W) frequency mask for mfm and None for the baselines (which use the plain loss).
Random draws come from `generator` (a CPU torch.Generator) so that a seed reproduces a batch
on any device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from kernels.frequency import mask_frequencies
from pipeline.config import CorruptionConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=16)
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a torch.tensor on a GPU per batch is a copy that waits for it."""
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(images.device, images.dtype)
    return (images - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(images.device, images.dtype)
    return images * std + mean


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def frequency_mask(images, cfg: CorruptionConfig, generator=None):
    """Each sample draws low-pass with probability cfg.low_pass_prob, else high-pass."""
    high_pass = _rand(images.shape[0], generator, images.device) >= cfg.low_pass_prob
    return mask_frequencies(images, cfg.radius, high_pass, radius2=cfg.radius2)


def super_resolution(images, cfg: CorruptionConfig, generator=None):
    """Bicubic down by sr_factor and back up, clamped after each step. Downsampling is
    antialiased, as an image library's bicubic resize is."""
    h, w = images.shape[-2:]
    small = F.interpolate(
        images, size=(h // cfg.sr_factor, w // cfg.sr_factor), mode="bicubic", align_corners=False, antialias=True
    ).clamp(0, 1)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1), None


def blur_kernel_sizes(draws: torch.Tensor, cfg: CorruptionConfig) -> torch.Tensor:
    """Each sample's kernel size from its uniform draw in [0, 1)."""
    sizes = torch.tensor(cfg.blur_kernel_sizes)
    return sizes[(draws.cpu() * len(sizes)).long().clamp_max(len(sizes) - 1)]


def blur(images: torch.Tensor, kernel_sizes: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur, sample i with kernel_sizes[i]: one call per distinct size."""
    out = torch.empty_like(images)
    for k in kernel_sizes.unique().tolist():
        idx = (kernel_sizes == k).nonzero().squeeze(1).to(images.device)
        out[idx] = gaussian_blur(images[idx], kernel_size=[k, k], sigma=[sigma, sigma])
    return out


def deblur(images, cfg: CorruptionConfig, generator=None):
    """Gaussian blur with sigma cfg.blur_sigma and a kernel size drawn per sample; reflect-101
    border (torch's "reflect"); no clamp."""
    sizes = blur_kernel_sizes(_rand(images.shape[0], generator, "cpu"), cfg)
    return blur(images, sizes, cfg.blur_sigma), None


def denoise(images, cfg: CorruptionConfig, generator=None):
    """Additive Gaussian noise, independent per pixel and channel, no clamp."""
    gen_device = generator.device if generator is not None else images.device
    noise = torch.randn(images.shape, generator=generator, device=gen_device, dtype=images.dtype)
    return images + cfg.noise_std * noise.to(images.device), None


CORRUPTIONS = {"mfm": frequency_mask, "sr": super_resolution, "deblur": deblur, "denoise": denoise}


def corrupt(images: torch.Tensor, cfg: CorruptionConfig, generator: torch.Generator | None = None):
    """(encoder_input, target, keep or None), normalised, on the input's device."""
    images = images.float()
    corrupted, keep = CORRUPTIONS[cfg.kind](images, cfg, generator)
    return normalize(corrupted), normalize(images), keep
