"""The training and evaluation loaders on the torch backend: coverage across ranks and
DataLoader workers, resume, S3 restarts, corrupt samples, shapes and ranges."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from test_data_shards import write_split

from pipeline.config import load_config
from pipeline.data import Batch, build_eval_loader, build_train_loader


def make_cfg(url: str, *overrides: str):
    return load_config(
        None,
        [
            f"data.train={url}",
            "model.img_size=32",
            "corruption.radius=4",
            "data.backend=torch",
            "data.shuffle_buffer=5",
            "data.prefetch_shards=1",
            "data.workers=0",
            *overrides,
        ],
    )


def epoch_ids(loader) -> list[list[int]]:
    out = []
    for _ in loader:
        out.append(loader.last_ids)
    return out


@pytest.mark.parametrize("sizes", [[5, 3, 6, 4, 7], [11]])  # [11]: one shard for 2 ranks x 2 workers
def test_exactly_once_over_ranks_and_workers(tmp_path, sizes):
    url = str(tmp_path / "train")
    write_split(url, sizes, size=(40, 30))
    cfg = make_cfg(url, "data.workers=2")
    loaders = [build_train_loader(cfg, rank=r, world_size=2, micro_batch=2, device="cpu") for r in range(2)]
    per_rank = [epoch_ids(ld) for ld in loaders]
    n, nb = sum(sizes), sum(sizes) // 4
    assert [len(b) for b in per_rank] == [nb, nb] == [ld.steps_per_epoch for ld in loaders]
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == nb * 4 and set(seen) <= set(range(n))
    assert all(ld.epoch == 1 for ld in loaders)
    # the next epoch covers the same way, in another order
    again = [epoch_ids(ld) for ld in loaders]
    seen2 = [i for batches in again for b in batches for i in b]
    assert len(set(seen2)) == nb * 4 and seen2 != seen


def test_workers_persist_across_epochs_and_passes(tmp_path):
    import multiprocessing

    url = str(tmp_path / "train")
    write_split(url, [5, 3, 6, 4], size=(40, 30))
    build = lambda w: build_train_loader(  # noqa: E731
        make_cfg(url, f"data.workers={w}"), rank=0, world_size=1, micro_batch=2, device="cpu"
    )
    want, state = [], None
    for _ in range(3):  # each epoch from new worker processes: a fresh loader at the epoch's state
        fresh = build(2)
        if state:
            fresh.load_state_dict(state)
        want += epoch_ids(fresh)
        state = fresh.state_dict()
    del fresh
    before = {p.pid for p in multiprocessing.active_children()}
    ld = build(2)
    got = epoch_ids(ld)
    workers = {p.pid for p in multiprocessing.active_children()} - before
    it = iter(ld)  # a pass left unfinished (a trainer stopping mid-epoch) ...
    next(it)
    got.append(ld.last_ids)
    del it
    got += epoch_ids(ld) + epoch_ids(ld)  # ... then the rest of that epoch, and one more
    assert got == want
    assert len(workers) == 2 and workers <= {p.pid for p in multiprocessing.active_children()}


def test_batch_contract(tmp_path):
    url = str(tmp_path / "train")
    write_split(url, [6], size=(48, 36))
    b = next(iter(build_train_loader(make_cfg(url), rank=0, world_size=1, micro_batch=3, device="cpu")))
    assert isinstance(b, Batch)
    assert b.encoder_input.shape == b.target.shape == (3, 3, 32, 32) and b.keep.shape == (3, 32, 32)
    assert b.encoder_input.dtype == b.target.dtype == b.keep.dtype == torch.float32
    lo, hi = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225  # normalised [0, 1]
    for t in (b.encoder_input, b.target):
        assert lo - 1e-4 <= t.min() and t.max() <= hi + 1e-4
    assert set(b.keep.unique().tolist()) <= {0.0, 1.0}
    sr = next(
        iter(
            build_train_loader(
                make_cfg(url, "corruption.kind=denoise"), rank=0, world_size=1, micro_batch=3, device="cpu"
            )
        )
    )
    assert sr.keep is None and sr.encoder_input.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(tmp_path, workers):
    url = str(tmp_path / "train")
    write_split(url, [5, 4, 6], size=(40, 30))
    cfg = make_cfg(url, f"data.workers={workers}")
    build = lambda: build_train_loader(cfg, rank=1, world_size=2, micro_batch=2, device="cpu")  # noqa: E731
    ref = build()
    want = [b for _ in range(2) for b in ref]  # two uninterrupted epochs
    a = build()
    it = iter(a)
    for _ in range(2):
        next(it)
    state = a.state_dict()
    del it
    b = build()
    b.load_state_dict(state)
    got = list(b) + list(b)  # the rest of epoch 0, then epoch 1
    assert len(got) == len(want) - 2
    for x, y in zip(got, want[2:]):
        for u, v in zip(x, y):
            assert torch.equal(u, v)


def test_state_saved_after_the_last_batch_resumes_at_the_next_epoch(tmp_path):
    url = str(tmp_path / "train")
    write_split(url, [5, 4], size=(40, 30))
    cfg = make_cfg(url)
    ref = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu")
    list(ref)
    want = epoch_ids(ref)  # epoch 1
    a = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu")
    for _ in a:
        state = a.state_dict()  # as a trainer checkpointing inside its loop would
    b = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu")
    b.load_state_dict(state)
    assert b.epoch == 1 and b.batches_left == 3
    assert epoch_ids(b) == want


def test_world_size_change_continues_the_epoch(tmp_path):
    url = str(tmp_path / "train")
    write_split(url, [9, 8, 7], size=(40, 30))
    cfg = make_cfg(url)
    seen = []
    states = []
    for r in range(3):
        ld = build_train_loader(cfg, rank=r, world_size=3, micro_batch=2, device="cpu")
        it = iter(ld)
        for _ in range(2):
            next(it)
            seen += ld.last_ids
        states.append(ld.state_dict())
    assert states[0] == states[1] == states[2]
    for r in range(2):  # the run resumes on 2 ranks
        ld = build_train_loader(cfg, rank=r, world_size=2, micro_batch=2, device="cpu")
        ld.load_state_dict(states[0])
        seen += [i for _ in ld for i in ld.last_ids]
        assert ld.epoch == 1
    assert len(seen) == len(set(seen)) > 24 - 4  # nothing twice; only the last global remainder dropped


def test_corrupt_sample_is_skipped_and_counted(tmp_path, caplog):
    url = str(tmp_path / "train")
    write_split(url, [4, 4], corrupt={5})
    loader = build_train_loader(
        make_cfg(url, "data.shuffle_buffer=0"), rank=0, world_size=1, micro_batch=4, device="cpu"
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        batches = list(loader)
    assert len(batches) == 2 and all(b.target.shape[0] == 4 for b in batches)
    assert loader.skipped == 1 and loader.skipped_keys == [
        "train-000001.tar/s00005: unreadable image header: " + loader.skipped_keys[0].split("header: ", 1)[1]
    ]
    assert "s00005" in caplog.text
    assert loader.state_dict()["skipped"] == 1


def _broken_png() -> bytes:
    """A PNG whose header reads but whose pixel data does not inflate."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 8
    data[start : start + 200] = bytes(200)
    return bytes(data)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_body_that_does_not_decode_is_skipped(tmp_path, monkeypatch, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    import test_data_shards

    real = test_data_shards.jpeg
    monkeypatch.setattr(test_data_shards, "jpeg", lambda i, size=32: _broken_png() if i == 2 else real(i, size))
    url = str(tmp_path / "train")
    write_split(url, [4])
    loader = build_train_loader(
        make_cfg(url, "data.shuffle_buffer=0", "data.workers=1"),
        rank=0,
        world_size=1,
        micro_batch=4,
        device="cpu",
        backend=backend,
    )
    (batch,) = list(loader)
    assert loader.skipped == 1 and loader.skipped_keys[0].startswith("train-000000.tar/s00002: cannot decode")
    assert batch.target.shape == (4, 3, 32, 32) and torch.isfinite(batch.target).all()


def test_s3_endpoint_restart_mid_epoch(s3_endpoint, caplog):
    url = f"s3://mfm-test/restart-{threading.get_ident()}/train"
    # More shards than the reader can fetch ahead of the consumer, so the outage is met mid-epoch.
    write_split(url, [3] * 30)
    cfg = make_cfg(url, "data.prefetch_shards=0", "data.shuffle_buffer=0", "storage.retries=6", "data.cache_dir=null")
    build = lambda: build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu")  # noqa: E731
    ref = build()
    want = [(ref.last_ids, b.target) for b in ref]
    loader = build()
    it = iter(loader)
    first = next(it)
    got = [(loader.last_ids, first.target)]
    s3_endpoint.stop()  # each batch needs a new shard: the next fetch meets the outage
    restart = threading.Timer(5, s3_endpoint.start)  # longer than s3fs's and botocore's own retries
    restart.start()
    # Whichever layer meets the outage retries it: ours, s3fs's or botocore's (their own retries
    # can outlast 5 s when their random backoff draws long).
    for name, level in (
        ("pipeline.storage", logging.WARNING),
        ("s3fs", logging.DEBUG),
        ("botocore.retries.standard", logging.DEBUG),
    ):
        caplog.set_level(level, logger=name)
    got += [(loader.last_ids, b.target) for b in it]
    restart.join()
    assert len(got) == len(want) == 30
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(torch.equal(g[1], w[1]) for g, w in zip(got, want))
    # the outage was met and retried, not avoided by reading ahead
    assert any(m in caplog.text for m in ("retry 1/6", "Retryable error", "Retry needed"))


def test_eval_loader_covers_every_sample_once(tmp_path):
    url = str(tmp_path / "val")
    write_split(url, [4, 3], size=(50, 40), split="val")
    cfg = make_cfg(url)
    labels, count = [], 0
    for r in range(2):
        for images, y in build_eval_loader(cfg, url, rank=r, world_size=2, batch_size=2, device="cpu"):
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32 and y.dtype == torch.long
            labels += y.tolist()
            count += len(y)
    assert count == 7 and sorted(labels) == list(range(7))  # class i % 10 of sample i
    tr = build_eval_loader(cfg, url, rank=0, world_size=1, batch_size=3, device="cpu", train_augment=True)
    assert [len(y) for _, y in tr] == [3, 3]
    custom = build_eval_loader(
        cfg, url, rank=0, world_size=1, batch_size=7, device="cpu", sample_transform=lambda im: torch.zeros(3, 8, 8)
    )
    images, _ = next(iter(custom))
    assert images.shape == (7, 3, 8, 8)


def test_s3_with_worker_processes_and_cache(s3_endpoint, tmp_path):
    url = f"s3://mfm-test/workers-{threading.get_ident()}/train"
    write_split(url, [4, 3, 5])
    cfg = make_cfg(url, "data.workers=2", f"data.cache_dir={tmp_path / 'cache'}")
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=2, micro_batch=2, device="cpu")
        seen += [i for _ in loader for i in loader.last_ids]
    assert len(seen) == len(set(seen)) == 12
    assert len(list((tmp_path / "cache" / "mfm-shard-cache").iterdir())) == 3  # each shard cached once, whole


def test_a_view_that_fails_late_is_filled_from_the_batch():
    from pipeline.data.reading import RawBatch
    from pipeline.data.torch_backend import fill_gaps

    raw = RawBatch(7, [1, 2, 3], [], [], [])
    a, c = torch.zeros(1), torch.ones(1)
    assert fill_gaps([a, None, c], raw) == [a, c, c]
    assert fill_gaps([None, a, None], raw) == [a, a, a]
    with pytest.raises(ValueError, match="every sample of batch 7"):
        fill_gaps([None, None, None], raw)


def test_header_check_reads_sizes_from_markers_and_rejects_truncated_files():
    import io

    from PIL import Image

    from pipeline.data.augment import CorruptSample, image_size

    def encode(mode, fmt="JPEG", **kw):
        buf = io.BytesIO()
        Image.new(mode, (37, 21), 128).save(buf, fmt, **kw)
        return buf.getvalue()

    for data in (encode("RGB"), encode("L"), encode("RGB", progressive=True), encode("CMYK"), encode("RGB", "PNG")):
        assert image_size(data) == (37, 21)
    jpeg = encode("RGB")
    assert image_size(jpeg + b"\0\0") == (37, 21)  # NUL padding after EOI is harmless
    for bad in (jpeg[:-20], b"\xff\xd8 not a jpeg", b""):
        with pytest.raises(CorruptSample):
            image_size(bad)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_cpu_corruption_runs_on_the_cores_the_workers_leave(tmp_path, monkeypatch, backend):
    """One rule on both backends (issue 24, item 7): on a CPU the corruption runs on
    corruption_threads(workers) torch threads, and the trainer's own count is restored after."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from pipeline.data import augment, dali_backend, torch_backend
    from pipeline.data.augment import corruption_threads

    url = str(tmp_path / "train")
    write_split(url, [6, 6], size=(48, 36))
    seen = []

    def counting(*args, **kw):
        seen.append(torch.get_num_threads())
        return augment.corrupt_samples(*args, **kw)

    monkeypatch.setattr(torch_backend if backend == "torch" else dali_backend, "corrupt_samples", counting)
    monkeypatch.setattr(augment, "available_cpus", lambda: 6)  # a 6-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(5)
    try:
        cfg = make_cfg(url, "data.workers=2")
        loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu", backend=backend)
        for _ in loader:
            assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)
    assert corruption_threads(2) == 4
    assert seen and set(seen) == {4}
