"""The DALI backend on a GPU (skipped without CUDA): the same graph with the mixed decoder, the
corruption on its own stream; agreement with the torch backend, exact resume, and the side stream
ordered by events alone."""

from __future__ import annotations

import pytest
import torch
from test_data_loader import make_cfg
from test_data_shards import write_split

from pipeline.data import build_train_loader

pytest.importorskip("nvidia.dali")


@pytest.fixture(autouse=True)
def _cuda():
    # decided per test, not at import: torch.cuda.is_available() starts the CUDA driver (cuInit),
    # and a driver started while pytest collects would make every CPU DALI test spawn its workers
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def run(cfg, backend):
    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cuda", backend=backend)
    return loader, [(loader.last_ids, b) for b in loader]


def test_dali_gpu_matches_torch(tmp_path):
    url = str(tmp_path / "train")
    write_split(url, [5, 5, 5], size=(60, 44), corrupt={4})
    cfg = make_cfg(url, "data.workers=2")
    a, ref = run(cfg, "torch")
    b, got = run(cfg, "dali")
    assert [i for i, _ in got] == [i for i, _ in ref] and len(got) == 5
    assert a.skipped == b.skipped == 1
    for (_, x), (_, y) in zip(ref, got):
        assert y.encoder_input.is_cuda and y.target.is_cuda and y.keep.is_cuda
        assert torch.equal(x.keep, y.keep)
        # nvJPEG (fancy upsampling) and DALI's GPU resize against Pillow: the CPU test's tolerance
        assert (x.target - y.target).abs().mean() < 0.02 and (x.target - y.target).abs().max() < 0.3
        assert (x.encoder_input - y.encoder_input).abs().mean() < 0.02


def test_dali_gpu_resume_is_exact(tmp_path):
    url = str(tmp_path / "train")
    write_split(url, [4, 4, 4], size=(40, 30))
    cfg = make_cfg(url, "data.workers=2")
    loader, want = run(cfg, "dali")
    assert len(list(loader)) == len(want)  # the next epoch, on the same pipeline (spawned workers)
    a = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cuda", backend="dali")
    it = iter(a)
    next(it)
    next(it)
    state = a.state_dict()
    del it
    b = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cuda", backend="dali")
    b.load_state_dict(state)
    got = [x for x in b]
    assert len(got) == len(want) - 2
    for x, (_, y) in zip(got, want[2:]):
        assert torch.equal(x.encoder_input, y.encoder_input) and torch.equal(x.target, y.target)


def test_corruption_side_stream_matches_inline():
    """Corruption on its own stream gives what corrupt_samples gives inline, and the consumer's
    stream, not the host, waits for it."""
    from pipeline.config import load_config
    from pipeline.data.augment import corrupt_samples
    from pipeline.data.dali_backend import Corruption

    cfg = load_config(None, ["model.img_size=64", "corruption.radius=8"])
    views = torch.rand(8, 3, 64, 64, device="cuda")
    seeds = list(range(8))
    want = corrupt_samples(views.clone(), cfg.corruption, seeds)
    c = Corruption(cfg, torch.device("cuda"))
    pending = c.submit(views, seeds)
    assert pending[1] is not None and c.stream != torch.cuda.current_stream()
    got = c.take(pending)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
