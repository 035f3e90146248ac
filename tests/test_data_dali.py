"""The DALI backend (CPU here): the same samples, crops, flips and masks as the torch backend,
exact resume, corrupt samples skipped."""

from __future__ import annotations

import pytest
import torch
from test_data_loader import make_cfg
from test_data_shards import write_split

from pipeline.data import build_train_loader

pytest.importorskip("nvidia.dali")


def run(cfg, backend, *, rank=0, world_size=1, micro_batch=3):
    loader = build_train_loader(
        cfg, rank=rank, world_size=world_size, micro_batch=micro_batch, device="cpu", backend=backend
    )
    return loader, [(loader.last_ids, b) for b in loader]


@pytest.mark.parametrize("downscale", ["bicubic", "bilinear"])
def test_dali_matches_torch(tmp_path, downscale):
    url = str(tmp_path / "train")
    write_split(url, [4, 5], size=(44, 36))
    cfg = make_cfg(url, "data.workers=2", f"data.downscale={downscale}")
    _, ref = run(cfg, "torch", rank=1, world_size=2, micro_batch=2)
    _, got = run(cfg, "dali", rank=1, world_size=2, micro_batch=2)
    assert [i for i, _ in got] == [i for i, _ in ref] and len(got) == 2
    for (_, a), (_, b) in zip(ref, got):
        assert b.encoder_input.shape == b.target.shape == (2, 3, 32, 32) and b.keep.shape == (2, 32, 32)
        assert b.encoder_input.dtype == b.target.dtype == b.keep.dtype == torch.float32
        assert torch.equal(a.keep, b.keep)  # same seeds, same masks
        # same crop window and flip; only the JPEG decoder and the resize filter differ
        assert (a.target - b.target).abs().mean() < 0.02 and (a.target - b.target).abs().max() < 0.3
        assert (a.encoder_input - b.encoder_input).abs().mean() < 0.02
    # a wrong flip or crop would be far off: the comparison can fail
    assert (ref[0][1].target - ref[0][1].target.flip(-1)).abs().mean() > 0.05


def test_dali_resume_is_exact_and_skips_corrupt(tmp_path):
    url = str(tmp_path / "train")
    write_split(url, [4, 4, 4], size=(40, 30), corrupt={6})
    cfg = make_cfg(url, "data.workers=2", "corruption.kind=deblur")
    full, want = run(cfg, "dali")
    assert full.skipped == 1 and "s00006" in full.skipped_keys[0]
    assert all(b.keep is None for _, b in want)
    a = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu", backend="dali")
    it = iter(a)
    next(it)
    state = a.state_dict()
    del it
    b = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu", backend="dali")
    b.load_state_dict(state)
    got = [(b.last_ids, x) for x in b]
    assert [i for i, _ in got] == [i for i, _ in want[1:]]
    for (_, x), (_, y) in zip(got, want[1:]):
        assert torch.equal(x.encoder_input, y.encoder_input) and torch.equal(x.target, y.target)


@pytest.mark.parametrize("kind", ["mfm", "sr", "deblur", "denoise"])
def test_batched_corruption_matches_per_sample(kind):
    """corrupt_samples corrupts a batch in one call (the CPU loaders' main cost); it must give
    each sample what corrupt() gives it alone with the sample's seed."""
    from pipeline.config import CorruptionConfig
    from pipeline.corruptions import corrupt
    from pipeline.data.augment import corrupt_samples

    cfg = CorruptionConfig(kind=kind, radius=4, blur_kernel_sizes=[3, 5, 7], blur_sigma=1.0)
    images = torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    seeds = [11, 12, 13, 14, 15, 16]
    enc, target, keep = corrupt_samples(images, cfg, seeds)
    for i, s in enumerate(seeds):
        e, t, k = corrupt(images[i : i + 1], cfg, torch.Generator().manual_seed(s))
        # a convolution over a batch may sum in another order than over one image
        torch.testing.assert_close(enc[i : i + 1], e, rtol=0, atol=1e-6)
        assert torch.equal(target[i : i + 1], t) and (k is None) == (keep is None)
        if k is not None:
            assert torch.equal(keep[i : i + 1], k)
    if kind == "mfm":
        assert 0 < keep.flatten(1).mean(1).gt(0.5).sum() < 6  # both low- and high-pass draws occur
    if kind == "deblur":  # several kernel sizes occur in the batch
        from pipeline.corruptions import blur_kernel_sizes

        draws = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(s)) for s in seeds])
        assert len(blur_kernel_sizes(draws, cfg).unique()) > 1


def test_dali_batches_outlive_later_runs(tmp_path):
    """DALI's CPU outputs are taken without a copy: the batches must stay intact while the pipeline
    runs on."""
    url = str(tmp_path / "train")
    write_split(url, [4, 4, 4], size=(40, 30))
    cfg = make_cfg(url, "data.workers=2")
    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch=2, device="cpu", backend="dali")
    held = [(b.encoder_input, b.encoder_input.clone(), b.target, b.target.clone()) for b in loader]
    assert len(held) == 6
    for e, e0, t, t0 in held:
        assert torch.equal(e, e0) and torch.equal(t, t0)
    assert not torch.equal(held[0][0], held[-1][0])


def test_resize_uint8_matches_pillow():
    """The DALI CPU path's resize (torch's uint8 kernels) against the torch backend's Pillow
    resize: shrinking, enlarging and mixed axes, both downscale filters."""
    import numpy as np
    from PIL import Image

    from pipeline.data.augment import resize_uint8, resize_view

    rng = np.random.default_rng(0)
    for downscale in ("bicubic", "bilinear"):
        for h, w in [(300, 400), (20, 28), (100, 20), (20, 100), (32, 57), (224, 224)]:
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            want = np.asarray(resize_view(Image.fromarray(arr), 32, downscale)).transpose(2, 0, 1).astype(int)
            got = resize_uint8(torch.from_numpy(arr), 32, downscale)
            assert got.dtype == torch.uint8 and got.shape == (3, 32, 32)
            assert np.abs(got.numpy().astype(int) - want).max() <= 2, (downscale, h, w)


def test_dali_failure_comes_after_the_batches_before_it(tmp_path, monkeypatch):
    """A DALI failure reaches the consumer after every batch before it, naming the batch."""
    import numpy as np

    from pipeline.data import dali_backend

    class FailingPipeline:
        def __init__(self, source, batch_size, size):
            self.source, self.shape, self.runs = source, (batch_size, 3, size, size), 0

        def run(self):
            self.source()
            self.runs += 1
            if self.runs == 4:
                raise RuntimeError("decoder exploded")
            return (type("Out", (), {"as_tensor": lambda _: np.zeros(self.shape, np.uint8)})(),)

    monkeypatch.setattr(
        dali_backend, "build_pipeline", lambda cfg, bs, source, **kw: FailingPipeline(source, bs, cfg.model.img_size)
    )
    url = str(tmp_path / "train")
    write_split(url, [4, 4, 4], size=(40, 30))
    loader = build_train_loader(
        make_cfg(url, "data.workers=2"), rank=0, world_size=1, micro_batch=2, device="cpu", backend="dali"
    )
    got = []
    with pytest.raises(RuntimeError, match="DALI failed on batch 3"):
        for _ in loader:
            got.append(loader.batches_left)
    assert got == [5, 4, 3]
