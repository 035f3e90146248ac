"""Per-sample randomness and the torch-side image transforms, shared by both backends.

Every random choice for a sample (crop window, flip, corruption draws) comes from
mix_seed(seed, epoch, sample id): a sample looks the same whichever rank, worker, batch or
backend produces it, which is what makes resume exact. The crop window is computed here, from
the JPEG header alone, so the DALI backend decodes exactly the region the torch backend crops.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from kernels.frequency import mask_frequencies
from pipeline.config import CorruptionConfig
from pipeline.corruptions import CORRUPTIONS, blur, blur_kernel_sizes, normalize
from pipeline.data.sampling import mix_seed
from pipeline.jpeg import CLEAN_SOF, MAX_PIXELS, ends_with_eoi, frame, too_many_pixels
from pipeline.processes import available_cpus

RATIO = (3 / 4, 4 / 3)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class CorruptSample(ValueError):
    """Bytes that do not hold a usable image."""


@dataclass(frozen=True)
class SampleParams:
    """Where to crop (top, left, height, width in source pixels), whether to flip, and the
    seed of the corruption draws."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    corruption_seed: int


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise CorruptSample(f"no image member ({'/'.join(IMAGE_EXTS)}) in sample {sample.get('__key__')}")


def image_size(data: bytes, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header; raises CorruptSample for bytes no decoder would take.
    A JPEG must also end with its EOI marker: that catches truncated files without decoding (a
    damaged JPEG body decodes, to wrong pixels, in both Pillow and DALI). Both backends run this
    before decoding, so a header claiming more than `max_pixels` pixels (a few hundred bytes can
    claim 60000x60000) is skipped here, never handed to Pillow or DALI."""
    f = frame(data)
    if f is not None and f[0] in CLEAN_SOF and f[3] in (1, 3) and f[1] and f[2]:
        # the common case, from the markers alone (Pillow's header parse costs ~0.2 ms)
        if reason := too_many_pixels(f[1], f[2], max_pixels):
            raise CorruptSample(f"too large: {reason}")
        if not ends_with_eoi(data):
            raise CorruptSample("truncated JPEG (no EOI marker)")
        return f[1], f[2]
    try:
        with Image.open(io.BytesIO(data)) as im:
            size, fmt = im.size, im.format
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad bytes
        raise CorruptSample(f"unreadable image header: {e}") from None
    if reason := too_many_pixels(*size, max_pixels):
        raise CorruptSample(f"too large: {reason}")
    if fmt != "JPEG":
        # rare (the sharder writes JPEGs) and, unlike a damaged JPEG body, fatal to DALI's
        # decoder: decode it once here
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as e:  # noqa: BLE001
            raise CorruptSample(f"cannot decode: {e}") from None
    if fmt == "JPEG" and not ends_with_eoi(data):
        raise CorruptSample("truncated JPEG (no EOI marker)")
    if min(size) < 1:
        raise CorruptSample(f"empty image {size}")
    return size


def crop_window(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's window (torchvision's algorithm: 10 tries, then the centre crop
    clamped to the ratio range), drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(
    seed: int, epoch: int, sample_id: int, width: int, height: int, scale: tuple[float, float]
) -> SampleParams:
    rng = np.random.default_rng(mix_seed(seed, epoch, sample_id))
    top, left, h, w = crop_window(width, height, scale, rng)
    flip = bool(rng.random() < 0.5)
    return SampleParams(top, left, h, w, flip, int(rng.integers(0, 2**62)))


def decode_rgb(data: bytes) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        return im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise CorruptSample(f"cannot decode: {e}") from None


def to_uint8(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_float(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 (3, H, W) in [0, 1]."""
    return to_uint8(im).float().div_(255)


def resize_view(im: Image.Image, size: int, downscale: str = "bicubic", box=None) -> Image.Image:
    """`box` (left, top, right, bottom; default the whole image) to size x size: bicubic, and
    `downscale` on an axis that shrinks, as DALI's min_filter does."""
    width, height = (box[2] - box[0], box[3] - box[1]) if box is not None else im.size
    shrink = Image.BILINEAR if downscale == "bilinear" else Image.BICUBIC
    fx = shrink if width > size else Image.BICUBIC
    fy = shrink if height > size else Image.BICUBIC
    if fx == fy:
        return im.resize((size, size), fx, box=box)
    # one pass per axis, each with its own filter
    return im.resize((size, height), fx, box=box).resize((size, size), fy)


def train_view(
    data: bytes, p: SampleParams, size: int, downscale: str = "bicubic", *, uint8: bool = False
) -> torch.Tensor:
    """Decode, crop the window, resize to size x size (resize_view), flip: float (3, S, S) in
    [0, 1], or uint8 0..255."""
    im = resize_view(decode_rgb(data), size, downscale, box=(p.left, p.top, p.left + p.width, p.top + p.height))
    if p.flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return to_uint8(im) if uint8 else to_float(im)


def eval_resize(size: int) -> int:
    """The shorter side before the centre crop: 256 at 224, proportionally otherwise."""
    return int(round(size * 256 / 224))


def eval_view(data: bytes, size: int) -> torch.Tensor:
    """Shorter side to size*256/224 (bicubic), centre crop size: float (3, S, S) in [0, 1]."""
    im = decode_rgb(data)
    im = TF.resize(im, eval_resize(size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    im = TF.center_crop(im, [size, size])
    return to_float(im)


def sample_draws(cfg: CorruptionConfig, seeds) -> torch.Tensor | None:
    """Each sample's one draw in [0, 1) from its own seed, for the kinds that take one (mfm: low-
    or high-pass; deblur: the kernel size), else None. A torch.Generator per sample (~7 us each):
    the DALI backend draws them off the training thread and hands them to corrupt_samples."""
    if cfg.kind not in ("mfm", "deblur"):
        return None
    return torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def corruption_threads(workers: int) -> int:
    """Torch threads for the corruption on a CPU, on both backends: the cores the loader's
    workers leave (at least one). More only spin at barriers while the workers hold the cores
    (2 threads on 2 busy cores: 2.3 -> 5.4 CPU ms per 224 px image, measured)."""
    return max(1, available_cpus() - workers)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside, restored after (the model's count is the trainer's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def corrupt_samples(images: torch.Tensor, cfg: CorruptionConfig, seeds: list[int], draws: torch.Tensor | None = None):
    """corrupt() with each sample's draws from its own seed, so that a sample's corruption
    does not depend on the batch it lands in. Returns (encoder_input, target, keep or None).
    `draws`: sample_draws(cfg, seeds), when already drawn.

    The draws are taken per sample and the batch corrupted in one call: the same numbers as a
    call per sample, for a fraction of the CPU time (small per-sample FFTs and convolutions
    cost far more, most of all where torch's intra-op threads wait on a loaded machine)."""
    if draws is None:
        draws = sample_draws(cfg, seeds)
    images = images.float()
    keep = None
    if cfg.kind == "mfm":  # one draw: low- or high-pass, as corruptions.frequency_mask makes it
        corrupted, keep = mask_frequencies(images, cfg.radius, draws >= cfg.low_pass_prob, radius2=cfg.radius2)
    elif cfg.kind == "deblur":  # one draw: the kernel size, as corruptions.deblur makes it
        corrupted = blur(images, blur_kernel_sizes(draws, cfg), cfg.blur_sigma)
    elif cfg.kind == "denoise":
        # The noise, as corruptions.denoise draws it for one image with a generator of the
        # images' device: drawn where the images are (on a GPU, no ~150 MB copy per batch of
        # 256 from pageable memory). A CUDA generator draws other numbers than a CPU one from
        # the same seed: a denoise sample is reproducible per kind of device.
        noise = torch.empty_like(images)
        for out, s in zip(noise, seeds):
            out.normal_(generator=torch.Generator(images.device).manual_seed(int(s)))
        corrupted = images + cfg.noise_std * noise
    else:  # sr draws nothing
        corrupted, _ = CORRUPTIONS[cfg.kind](images, cfg)
    return normalize(corrupted), normalize(images), keep


__all__ = [
    "CorruptSample",
    "SampleParams",
    "image_bytes",
    "image_size",
    "sample_params",
    "resize_view",
    "train_view",
    "eval_view",
    "sample_draws",
    "corrupt_samples",
    "corruption_threads",
    "torch_threads",
    "normalize",
]
