"""The DALI backend (CPU here): the same samples, crops, flips and masks as the torch backend,
exact resume, corrupt samples skipped."""

from __future__ import annotations

import os

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
    from pipeline.data.augment import corrupt_samples, sample_draws

    cfg = CorruptionConfig(kind=kind, radius=4, blur_kernel_sizes=[3, 5, 7], blur_sigma=1.0)
    images = torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    seeds = [11, 12, 13, 14, 15, 16]
    enc, target, keep = corrupt_samples(images, cfg, seeds)
    # the draws made ahead (the DALI hand-over thread's) give the same corruption
    drawn = corrupt_samples(images, cfg, seeds, sample_draws(cfg, seeds))
    assert torch.equal(drawn[0], enc) and (keep is None or torch.equal(drawn[2], keep))
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


def _photo(width: int = 400, height: int = 300, **save) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-20, 21, (height, width, 3))
    arr = (np.asarray(coarse, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _dali_views(data: bytes, params, downscale: str = "bicubic", size: int = 32) -> torch.Tensor:
    """The DALI graph's views of `data` (the same code the GPU runs, on CPU devices)."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    from pipeline.data.dali_backend import views

    @pipeline_def(batch_size=len(params), num_threads=1, device_id=None)
    def pipe():
        encoded, anchor, shape, flip = fn.external_source(
            source=lambda: (
                [np.frombuffer(data, np.uint8)] * len(params),
                [np.array([q.left, q.top], np.int32) for q in params],
                [np.array([q.width, q.height], np.int32) for q in params],
                [np.array(int(q.flip), np.int32) for q in params],
            ),
            num_outputs=4,
            batch=True,
        )
        return views(encoded, anchor, shape, flip, size=size, downscale=downscale, gpu=False, hw_decoder_load=0)

    p = pipe()
    p.build()
    (out,) = p.run()
    return torch.from_numpy(np.array(out.as_tensor()))


def test_dali_views_match_pillow():
    """The DALI graph's views (crop-window decode, bicubic antialiased resize, flip; the same code
    the GPU runs, on CPU devices) against the torch backend's Pillow views: shrinking, enlarging
    and mixed axes, both downscale filters."""
    from pipeline.data.augment import SampleParams, train_view

    data = _photo()
    # (top, left, height, width, flip): shrink both axes, enlarge both, one of each, the whole image
    windows = [(10, 20, 280, 300, True), (5, 7, 20, 28, False), (0, 50, 100, 20, True), (40, 3, 20, 100, False)]
    windows.append((0, 0, 300, 400, True))
    params = [SampleParams(t, left, h, w, f, 0) for t, left, h, w, f in windows]
    for downscale in ("bicubic", "bilinear"):
        got = _dali_views(data, params, downscale)
        want = torch.stack([train_view(data, q, 32, downscale) for q in params])
        assert got.shape == want.shape == (len(params), 3, 32, 32)
        # measured: 5 levels at most when enlarging, 3 when shrinking; 0.33 levels on average
        assert (got - want).abs().max() <= 5.5 / 255, downscale
        assert (got - want).abs().mean() < 1 / 255
        assert (got - want.flip(-1)).abs().mean() > 10 / 255  # a wrong flip would show


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_gives_the_same_view_in_both_backends(orientation):
    """Both backends read the stored pixels and ignore EXIF orientation: the crop window is drawn
    from the stored size, so a decoder that rotated would crop elsewhere (or out of bounds)."""
    from PIL import Image

    from pipeline.data.augment import SampleParams, image_size, sample_params, train_view

    exif = Image.Exif()
    exif[0x0112] = orientation  # rotated 180 / 90 clockwise / 90 counter-clockwise
    data = _photo(exif=exif.tobytes())
    assert image_size(data) == (400, 300)
    params = [sample_params(0, 0, i, 400, 300, (0.2, 1.0)) for i in range(4)]
    params.append(SampleParams(200, 310, 90, 85, False, 0))  # past a rotated image's width and height
    got = _dali_views(data, params)
    want = torch.stack([train_view(data, q, 32) for q in params])
    assert (got - want).abs().max() <= 5.5 / 255 and (got - want).abs().mean() < 1 / 255


def test_gpu_decoder_buffers_are_sized_per_thread():
    """DALI preallocates the mixed decoder's paddings per thread (one device buffer, two pinned
    host ones): 12 threads share the decoder's budget instead of taking 12 of it (2.4 GiB of
    device and 3.1 GiB of pinned host memory per rank)."""
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.data.dali_backend import views

    found = []

    @pipeline_def(batch_size=2, num_threads=12, device_id=0)
    def pipe():
        dtypes = [types.UINT8, types.INT32, types.INT32, types.INT32]
        encoded, anchor, shape, flip = fn.external_source(source=lambda: None, num_outputs=4, batch=True, dtype=dtypes)
        out = views(
            encoded, anchor, shape, flip, size=32, downscale="bicubic", gpu=True, hw_decoder_load=0.65, threads=12
        )
        nodes = [out]
        while nodes:  # the graph back from the output: DALI keeps each operator's arguments
            src = nodes.pop().source
            if hasattr(src, "_op") and src._op._schema.Name() == "decoders__ImageSlice":
                found.append(src._op._init_args)
            nodes.extend(getattr(src, "_inputs", None) or [])
        return out

    pipe()  # defines the graph; building it would need a GPU
    (args,) = found
    assert 12 * args["device_memory_padding"] <= 256 << 20
    assert 12 * 2 * args["host_memory_padding"] <= 300 << 20
    assert args["device_memory_padding"] >= 16 << 20  # DALI's own per-thread default


def test_gpu_graph_is_defined_with_valid_arguments():
    """The GPU branch of the graph, defined without a GPU: DALI checks every operator's arguments
    and devices when the graph is defined, so a wrong name or device fails here, not on a GPU."""
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.data.dali_backend import views

    @pipeline_def(batch_size=2, num_threads=1, device_id=0)
    def pipe():
        dtypes = [types.UINT8, types.INT32, types.INT32, types.INT32]
        encoded, anchor, shape, flip = fn.external_source(source=lambda: None, num_outputs=4, batch=True, dtype=dtypes)
        out = views(encoded, anchor, shape, flip, size=32, downscale="bicubic", gpu=True, hw_decoder_load=0.65)
        assert out.device == "gpu"
        return out

    pipe()  # defines the graph; building it would need a GPU


def _failing(monkeypatch, fail_on: set[int]):
    """build_pipeline replaced by one that runs the real BatchSource and returns what the graph
    would (zero views), failing on the runs (counted over every pipeline built) in `fail_on`."""
    import numpy as np
    from nvidia.dali.tensors import TensorListCPU

    from pipeline.data import dali_backend

    runs, built = [0], []

    class FailingPipeline:
        def __init__(self, source, batch_size, size):
            self.source, self.shape, self.i = source, (batch_size, 3, size, size), 0

        def run(self):
            runs[0] += 1
            if runs[0] in fail_on:
                raise RuntimeError("decoder exploded")
            _, params, notes = self.source(self.i)
            self.i += 1
            return (TensorListCPU(np.zeros(self.shape, np.float32)), TensorListCPU(params), TensorListCPU(notes))

        def reset(self):
            pass

    def build(cfg, bs, source, **kw):
        built.append(source.start)
        return FailingPipeline(source, bs, cfg.model.img_size)

    monkeypatch.setattr(dali_backend, "build_pipeline", build)
    return built


@pytest.mark.parametrize("ahead", [0, 1])
def test_dali_failure_decodes_that_batch_with_pillow_and_goes_on(tmp_path, monkeypatch, ahead):
    """DALI failing on one batch does not stop the epoch: that batch comes from the torch
    backend's path (the same samples, views and corruption), then a new pipeline goes on."""
    from pipeline.data import dali_backend

    monkeypatch.setattr(dali_backend.Runner, "cpu_ahead", ahead)
    url = str(tmp_path / "train")
    write_split(url, [4, 4, 4], size=(40, 30))
    cfg = make_cfg(url, "data.workers=2")
    _, ref = run(cfg, "torch", micro_batch=2)
    built = _failing(monkeypatch, {4})
    loader, got = run(cfg, "dali", micro_batch=2)
    assert [i for i, _ in got] == [i for i, _ in ref] and len(got) == 6
    assert built == [0, 4]  # the first pipeline, and one from the batch after the failure
    torch.testing.assert_close(got[3][1].encoder_input, ref[3][1].encoder_input, rtol=0, atol=1e-6)
    assert torch.equal(got[3][1].target, ref[3][1].target) and torch.equal(got[3][1].keep, ref[3][1].keep)
    assert not torch.equal(got[2][1].target, ref[2][1].target)  # the stand-in pipeline's batches differ


def test_dali_failing_again_and_again_stops_after_the_batches_before_it(tmp_path, monkeypatch):
    """Fresh pipelines that fail at once, again and again, are not a bad sample: the error
    reaches the consumer after every batch before it, naming the batch."""
    url = str(tmp_path / "train")
    write_split(url, [4, 4, 4], size=(40, 30))
    _failing(monkeypatch, {4, 5, 6})
    loader = build_train_loader(
        make_cfg(url, "data.workers=2"), rank=0, world_size=1, micro_batch=2, device="cpu", backend="dali"
    )
    got = []
    with pytest.raises(RuntimeError, match="DALI failed on 3 batches in a row, up to batch 5"):
        for _ in loader:
            got.append(loader.batches_left)
    assert got == [5, 4, 3, 2, 1]


@pytest.mark.parametrize("ahead", [0, 1])
def test_dali_pipeline_lives_across_epochs(tmp_path, monkeypatch, ahead):
    """The next epoch runs on the same pipeline and workers (DALI's next epoch, its plan computed
    in the workers) and gives what a loader resumed at that epoch gives, bit for bit; also with
    the next batch's corruption queued before each hand-over, as on a GPU."""
    from pipeline.data import dali_backend

    url = str(tmp_path / "train")
    write_split(url, [4, 4, 4], size=(40, 30))
    cfg = make_cfg(url, "data.workers=2")
    real, built = dali_backend.build_pipeline, []
    monkeypatch.setattr(dali_backend, "build_pipeline", lambda *a, **kw: built.append(1) or real(*a, **kw))
    monkeypatch.setattr(dali_backend.Runner, "cpu_ahead", ahead)  # 1: the GPU's order, a batch corrupted ahead
    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu", backend="dali")
    first = [(loader.last_ids, b) for b in loader]
    state = loader.state_dict()
    second = [(loader.last_ids, b) for b in loader]
    assert len(built) == 1 and len(first) == len(second) == 4
    assert [i for i, _ in first] != [i for i, _ in second]  # a new epoch, a new order
    fresh = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu", backend="dali")
    fresh.load_state_dict(state)
    want = [(fresh.last_ids, b) for b in fresh]
    assert [i for i, _ in want] == [i for i, _ in second]
    for (_, x), (_, y) in zip(want, second):
        assert torch.equal(x.encoder_input, y.encoder_input) and torch.equal(x.target, y.target)


def test_dali_workers_start_once_the_cuda_driver_is_up(tmp_path, monkeypatch):
    """With the CUDA driver up in the process (torch.cuda.is_available() alone starts it), DALI
    refuses to fork its workers: the loader spawns them instead, by DALI's own check."""
    import nvidia.dali.backend

    from pipeline.data.dali_backend import start_method

    monkeypatch.setattr(nvidia.dali.backend, "IsDriverInitialized", lambda: True)  # DALI's pool reads it too
    assert start_method() == "spawn"
    url = str(tmp_path / "train")
    write_split(url, [4, 4], size=(40, 30))
    cfg = make_cfg(url, "data.workers=1")
    _, ref = run(cfg, "torch", micro_batch=2)
    _, got = run(cfg, "dali", micro_batch=2)
    assert [i for i, _ in got] == [i for i, _ in ref] and len(got) == 4


def test_collecting_the_cuda_tests_leaves_cuda_alone(monkeypatch):
    """Importing tests/test_data_dali_cuda.py must not start the CUDA driver (see start_method)."""
    import importlib.util
    from pathlib import Path

    def refuse(*a, **kw):
        raise AssertionError("CUDA queried at import")

    monkeypatch.setattr(torch.cuda, "is_available", refuse)
    monkeypatch.setattr(torch.cuda, "device_count", refuse)
    monkeypatch.setattr(torch.cuda, "init", refuse)
    path = Path(__file__).with_name("test_data_dali_cuda.py")
    spec = importlib.util.spec_from_file_location("_dali_cuda_tests", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_dali_views_are_taken_without_a_copy_and_stay_valid(tmp_path):
    """The pipeline runs on DALI's dynamic executor, whose outputs are not recycled while
    referenced: the views are DALI's own memory (DLPack, no copy) and stay intact while the
    pipeline runs on."""
    import numpy as np

    from pipeline.data.dali_backend import BatchSource, Corruption, build_pipeline

    url = str(tmp_path / "train")
    write_split(url, [4, 4, 4], size=(40, 30))
    cfg = make_cfg(url, "data.workers=1")
    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch=2, device="cpu", backend="dali")
    plan = loader._plan()
    pipe = build_pipeline(cfg, 2, BatchSource(loader.split, cfg, plan, 0, 0), workers=1, device=torch.device("cpu"))
    assert pipe.exec_dynamic
    c = Corruption(cfg, torch.device("cpu"))
    held = []
    for _ in range(len(plan)):
        views, params, _ = pipe.run()
        v = c.receive(views)
        assert v.data_ptr() == views.as_tensor().data_ptr()  # DALI's buffer itself
        held.append((v, v.clone(), np.array(params.as_tensor())[:, -1].tolist()))
    assert [ids for _, _, ids in held] == plan.tolist()
    for v, v0, _ in held:
        assert torch.equal(v, v0)
    assert not torch.equal(held[0][0], held[-1][0])


_ABANDONING_PROCESS = """
import os, sys, time
import nvidia.dali.backend
from pipeline.config import load_config
from pipeline.data import build_train_loader

cfg = load_config(None, [f"data.train={sys.argv[1]}", "model.img_size=32", "corruption.radius=4",
                         "data.shuffle_buffer=5", "data.workers=2"])
if sys.argv[3] == "spawn":  # as in a GPU process, where the CUDA driver is up
    nvidia.dali.backend.IsDriverInitialized = lambda: True
loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch=2, device="cpu", backend="dali")
it = iter(loader)
next(it)
print("mid-epoch", flush=True)
if sys.argv[2] == "exit":
    os._exit(0)
time.sleep(600)
"""


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = {int(k) for k in f.read().split()}
            except OSError:
                continue
            todo.extend(kids - out)
            out |= kids
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from /proc (Linux)")
@pytest.mark.parametrize("how,start", [("sigkill", "fork"), ("exit", "fork"), ("sigkill", "spawn")])
def test_dali_workers_die_with_their_process(tmp_path, how, start):
    """A process killed mid-epoch (SIGKILL) or leaving with os._exit takes DALI's worker
    processes with it, forked or spawned: none of its tree remains, and its output pipe reaches
    its end."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    url = str(tmp_path / "train")
    write_split(url, [4, 4, 4], size=(40, 30))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.Popen(
        [sys.executable, "-c", _ABANDONING_PROCESS, url, how, start], stdout=subprocess.PIPE, env=env, cwd=root
    )
    tree: set[int] = set()
    try:
        assert proc.stdout.readline() == b"mid-epoch\n"
        tree = _descendants(proc.pid)
        assert len(tree) >= 2  # DALI's two workers
        if how == "sigkill":
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.1)
        assert not [p for p in tree if _alive(p)]
        assert proc.stdout.read() == b""  # no one holds the pipe any more
    finally:
        for p in [proc.pid, *tree]:  # what this test started, should it have outlived the test
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def test_dali_hand_over_runs_off_the_training_thread(tmp_path, monkeypatch):
    """DALI's runs (which feed its external source from the workers' shared memory) and the
    corruption's per-sample draws happen on the hand-over thread: the training thread takes the
    results and corrupts; the batches are the same."""
    import threading

    from pipeline.data import dali_backend

    url = str(tmp_path / "train")
    write_split(url, [4, 4, 4], size=(40, 30))
    cfg = make_cfg(url, "data.workers=1")
    _, want = run(cfg, "dali", micro_batch=2)
    runs, draws = set(), set()
    real_build, real_draws = dali_backend.build_pipeline, dali_backend.sample_draws

    class Recorded:
        def __init__(self, pipe):
            self.pipe = pipe

        def run(self, *a):
            runs.add(threading.get_ident())
            return self.pipe.run(*a)

        def reset(self):
            self.pipe.reset()

    monkeypatch.setattr(dali_backend, "build_pipeline", lambda *a, **kw: Recorded(real_build(*a, **kw)))
    monkeypatch.setattr(dali_backend, "sample_draws", lambda *a: draws.add(threading.get_ident()) or real_draws(*a))
    _, got = run(cfg, "dali", micro_batch=2)
    me = threading.get_ident()
    assert runs and draws and me not in runs | draws
    assert [i for i, _ in got] == [i for i, _ in want]
    for (_, x), (_, y) in zip(got, want):
        assert torch.equal(x.encoder_input, y.encoder_input) and torch.equal(x.keep, y.keep)


def test_bench_data_reports_the_training_threads_own_cpu_time(capsys):
    """`mfm bench data` gives each loader the training thread's CPU time inside next(loader) per
    256 images, and the corruption's part of it apart (tiny run: the figures are not judged)."""
    from pipeline.benchmarks.data import cli

    tiny = ["--images", "48", "--image-size", "64x48", "--size", "32", "--batch", "8", "--workers", "1"]
    assert cli([*tiny, "--backends", "torch,dali", "--downscale", "bilinear"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:5] in ("torch", "dali ")}
    assert set(rows) == {"torch", "dali"}, out
    for row in rows.values():
        thread, corruption = float(row[-2]), float(row[-1])
        assert thread >= 0 and corruption > 0, out


def test_skip_notes_round_trip_whatever_the_names():
    """Skip messages name untrusted shards and keys (newlines, NULs, lone surrogates from
    undecodable bytes): packed for DALI and back they are the same messages, as many."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pipeline.data.dali_backend import pack_notes, unpack_notes

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.text()), st.integers(1, 64))
    def check(notes, batch):
        packed = pack_notes(notes, batch)
        assert packed.dtype == "uint8" and packed.shape[0] == batch
        assert unpack_notes(packed) == notes

    check()
    assert unpack_notes(pack_notes(["a/b\nc: bad", "x\udcff\x00: bad"], 3)) == ["a/b\nc: bad", "x\udcff\x00: bad"]
