"""Sharding on a Dask cluster (a distributed.LocalCluster of 2 worker processes on 127.0.0.1)
into the S3 endpoint: the same shards, manifest and revisions as the local process pool, a
worker killed while it writes, and task arguments that carry no credential."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import sample_data, storage
from pipeline import split_manifest as mf
from pipeline.config import StorageConfig
from pipeline.sharding import read_manifest, shard_dataset, verify_split
from pipeline.sharding.cluster import DaskShards, check_address, import_distributed, task_key

# not `import distributed`: see import_distributed (in-process DALI tests run later in this session)
distributed = import_distributed()

SHARD_MB = 0.03


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """Started after the S3 endpoint: the worker processes inherit its AWS_* environment, as
    workers on a real cluster get their own credentials from theirs."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as c:
        yield c


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_data.build(str(tmp_path_factory.mktemp("sample")), per_class=4, size=32)


def _objects(url: str) -> dict[str, bytes]:
    """Every object under a prefix (relative name -> bytes)."""
    fs, path = storage.filesystem(url)
    # a revision claim names its writer (a random id) and its last heartbeat
    return {p[len(path) + 1 :]: fs.cat_file(p) for p in fs.find(path) if not p.endswith(".claim")}


def _same_but_location(a: dict, b: dict) -> None:
    assert mf.dumps(a) == mf.dumps(b)


def _prefix(name: str) -> str:
    return f"s3://mfm-test/{name}-{time.time_ns()}"


def test_cluster_shards_are_the_local_pools(cluster, sample, tmp_path):
    """Source and destination on S3: byte-identical shards, indices, manifest, revision file
    lists and rejected list from the cluster and from the local pool, through a first run, a
    grown source and a rebuild; and the same shards as from the tree on a local disk."""
    import shutil

    tree = tmp_path / "src"
    shutil.copytree(sample["folder"], tree)
    (tree / "train" / sample_data_class(str(tree)) / "broken.JPEG").write_bytes(b"not a jpeg")
    src = _prefix("source")
    fs, src_path = storage.filesystem(src)

    def upload():
        fs.put(str(tree) + "/", src_path, recursive=True)

    upload()
    local, remote = _prefix("pool"), _prefix("dask")
    runner = DaskShards(cluster.scheduler_address)

    def both(workers=1, **kw):
        a = shard_dataset(src, local, shard_size_mb=SHARD_MB, workers=workers, **kw)
        b = shard_dataset(src, remote, shard_size_mb=SHARD_MB, runner=runner, **kw)
        assert a.keys() == b.keys() == {"train", "val"}
        for split in a:
            _same_but_location(a[split], b[split])
        assert _objects(local) == _objects(remote)
        return b

    first = both(workers=2)
    assert first["train"]["num_samples"] == 40 and len(first["train"]["shards"]) > 2
    assert [r["file"] for r in first["train"]["rejected"]] == [f"{sample_data_class(str(tree))}/broken.JPEG"]
    on_disk = shard_dataset(str(tree), str(tmp_path / "from-disk"), shard_size_mb=SHARD_MB)
    assert on_disk["train"]["shards"] == first["train"]["shards"] and on_disk["val"]["shards"] == first["val"]["shards"]

    train = tree / "train"
    for i, name in enumerate(sorted(os.listdir(train))[:2]):
        pic = sorted(p for p in (train / name).iterdir() if p.name != "broken.JPEG")[0].read_bytes()
        (train / name / f"grown{i}.JPEG").write_bytes(pic)
    upload()
    grown = both()
    assert grown["train"]["revision"] == 2 and grown["train"]["num_samples"] == 42

    rebuilt = both(rebuild=True)
    assert rebuilt["train"]["revision"] == 3 and rebuilt["train"]["revisions"][-1]["rebuild"]
    assert verify_split(storage.join(remote, "train")) == []


def sample_data_class(src: str) -> str:
    return sorted(os.listdir(os.path.join(src, "train")))[0]


def test_dask_address_checked():
    assert check_address("tcp://scheduler:8786") == "tcp://scheduler:8786"
    assert check_address("tls://10.0.0.7:8786")
    for bad in ["scheduler:8786", "tcp://scheduler", "tcp://a b:1", "tcp://x:99999", "tcp://x:1; rm -rf /", ""]:
        with pytest.raises(ValueError, match="expected tcp://HOST:PORT"):
            DaskShards(bad)


def test_unreachable_scheduler_is_a_clear_error(sample, tmp_path, monkeypatch):
    from pipeline.sharding import ShardingError
    from pipeline.sharding import cluster as cl

    monkeypatch.setattr(cl, "CONNECT_TIMEOUT_S", 1)
    with pytest.raises(ShardingError, match=r"Dask cluster at tcp://127\.0\.0\.1:9: could not connect"):
        shard_dataset(sample["folder"], str(tmp_path / "out"), splits="val", runner=DaskShards("tcp://127.0.0.1:9"))
    # nothing committed, and the rerun on the local pool is the ordinary one
    assert not (tmp_path / "out" / "val" / "manifest.json").exists()
    assert shard_dataset(sample["folder"], str(tmp_path / "out"), splits="val")["val"]["num_samples"] == 10


def test_task_arguments_carry_no_credential(cluster, sample, monkeypatch):
    """What is sent to the scheduler (the pickled call and its key, which the dashboard shows)
    holds the endpoint, never a key: StorageConfig cannot even hold one."""
    import cloudpickle
    from pydantic import ValidationError

    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRET"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # the driver's own; moto takes any
    with pytest.raises(ValidationError, match="key"):
        StorageConfig(key="AKIA", secret=secret)
    sent = []
    submit = distributed.Client.submit

    def recording(self, fn, *args, **kwargs):
        sent.append((fn, args, kwargs))
        return submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "submit", recording)
    cfg = StorageConfig(endpoint_url=os.environ["AWS_ENDPOINT_URL"], region="us-east-1")
    shard_dataset(
        sample["folder"],
        _prefix("secret"),
        splits="val",
        shard_size_mb=SHARD_MB,
        storage=cfg,
        runner=DaskShards(cluster.scheduler_address),
    )
    assert len(sent) > 1
    for fn, args, kwargs in sent:
        assert kwargs["key"].startswith("write-shard-val-")
        blob = cloudpickle.dumps((fn, args, kwargs))
        assert secret.encode() not in blob and secret not in repr((args, kwargs))
        assert args[-1] == cfg  # the endpoint travels; credentials come from the worker


def _executing(dask_worker) -> list[str]:
    return [str(k) for k, ts in dask_worker.state.tasks.items() if ts.state == "executing"]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Large images: with SLOW options every image is resized and re-encoded, so a shard takes a while."""
    return sample_data.build(str(tmp_path_factory.mktemp("big")), per_class=20, size=1024)["folder"]


# ~12 shards of ~17 images, each decoded, resized and re-encoded: a task takes ~0.1 s or more
SLOW = {"splits": "train", "shard_size_mb": 1.0, "validation": "decode", "max_side": 48}


def _local_cluster() -> distributed.LocalCluster:
    return distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:  # the test's assertions report it
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _wait_for(what, timeout=120.0):
    deadline = time.time() + timeout
    while not what():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_lost_scheduler_fails_the_run_and_the_rerun_resumes(big, tmp_path, monkeypatch):
    """The whole cluster goes away once some shards are committed: the run fails with a clear
    error and commits nothing; a rerun on another cluster reuses the committed shards (their
    files untouched) and ends with the local pool's bytes."""
    from pipeline.sharding import ShardingError
    from pipeline.sharding import cluster as cl

    monkeypatch.setattr(cl, "CONNECT_TIMEOUT_S", 3)  # how long the client tries to reconnect
    expected = shard_dataset(big, str(tmp_path / "pool"), workers=1, **SLOW)["train"]
    dest = tmp_path / "dask"
    work = dest / "train" / "_work"
    c = _local_cluster()
    driver, out = _in_thread(lambda: shard_dataset(big, str(dest), runner=DaskShards(c.scheduler_address), **SLOW))
    _wait_for(lambda: work.exists() and any(p.suffix == ".json" for p in work.iterdir()))
    c.close()
    driver.join(120)
    assert isinstance(out.get("error"), ShardingError), out
    assert "lost the cluster" in str(out["error"]) and "rerun to resume" in str(out["error"])
    assert not (dest / "train" / "manifest.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in work.iterdir() if p.suffix == ".json"}
    shards = {n: (dest / "train" / n.replace(".json", ".tar")).stat().st_mtime_ns for n in done}
    assert 0 < len(done) < len(expected["shards"])
    with _local_cluster() as again:
        got = shard_dataset(big, str(dest), runner=DaskShards(again.scheduler_address), **SLOW)["train"]
    _same_but_location(got, expected)
    assert {n: (dest / "train" / n.replace(".json", ".tar")).stat().st_mtime_ns for n in done} == shards
    assert verify_split(str(dest / "train")) == []


def test_two_clusters_cannot_add_one_revision(cluster, big, tmp_path):
    """A second driver (here another seed, so another plan) adding the same revision while the
    first writes on the cluster is refused by the revision claim; the first commits alone."""
    from pipeline.sharding import ShardingError

    dest = tmp_path / "out"
    with _local_cluster() as other:
        first, out = _in_thread(
            lambda: shard_dataset(big, str(dest), runner=DaskShards(cluster.scheduler_address), **SLOW)
        )
        _wait_for(lambda: (dest / "train" / "revisions" / "000001.claim").exists())
        with pytest.raises(ShardingError, match="another writer is adding revision 1"):
            shard_dataset(big, str(dest), runner=DaskShards(other.scheduler_address), **{**SLOW, "seed": 1})
        # (not "other options": the second found no manifest, so the first had not committed yet)
    first.join(180)
    assert "error" not in out, out
    assert read_manifest(str(dest / "train"))["options"]["seed"] == 0
    assert verify_split(str(dest / "train")) == []


def test_worker_killed_while_writing(s3_endpoint, big, tmp_path):
    """SIGKILL the worker process running a shard task: the task reruns on a worker, the split
    commits once with every sample exactly once, byte-identical to the local pool's, and no
    partial object is left in the store."""
    kw = SLOW
    local = _prefix("kill-pool")
    expected = shard_dataset(big, local, workers=2, **kw)["train"]
    assert len(expected["shards"]) >= 4
    remote = _prefix("kill-dask")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as c,
        distributed.Client(c, set_as_default=False) as client,
    ):
        out: dict = {}

        def drive():
            try:
                out["manifest"] = shard_dataset(big, remote, runner=DaskShards(c.scheduler_address), **kw)["train"]
            except BaseException as e:  # reported by the assertion below
                out["error"] = e

        driver = threading.Thread(target=drive)
        driver.start()
        killed = None
        deadline = time.time() + 120
        while killed is None and time.time() < deadline and driver.is_alive():
            for addr, keys in client.run(_executing).items():
                if keys:
                    shard = "-".join(keys[0].split("-")[2:4])  # write-shard-train-000003-<digest>
                    pid = client.run(os.getpid, workers=[addr])[addr]
                    committed = storage.exists(storage.join(remote, "train", "_work", f"{shard}.json"))
                    os.kill(pid, signal.SIGKILL)
                    killed = (keys[0], pid, committed)
                    break
            else:
                time.sleep(0.02)
        driver.join(180)
        assert killed is not None, "no worker was seen writing"
        key, pid, was_committed = killed
        assert not was_committed  # it died before its shard's commit record: the shard had to be redone
        story = client.run_on_scheduler(lambda dask_scheduler, k=key: [list(t) for t in dask_scheduler.story(k)])
    assert "error" not in out, out.get("error")
    # sent to a worker twice: the killed one, then another
    assert sum(1 for t in story if t[0] == key and t[2] == "processing") >= 2, story
    got = out["manifest"]
    _same_but_location(got, expected)
    assert _objects(remote) == _objects(local)  # nothing partial, nothing extra
    keys = [k for s in got["shards"] for k in _keys(remote, s["name"])]
    assert len(keys) == len(set(keys)) == got["num_samples"] == expected["num_samples"]
    assert read_manifest(storage.join(remote, "train"))["revision"] == 1


def _keys(url: str, shard: str) -> list[str]:
    import io
    import tarfile

    data = storage.read_bytes(storage.join(url, "train", shard))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [m.name.rsplit(".", 1)[0] for m in tf if m.name.endswith(".json")]


def test_task_key_names_the_shard_and_its_destination():
    from pipeline.sharding.plan import ShardPlan

    p = ShardPlan("train", 7, (), "d" * 64)
    assert task_key("s3://b/a/train", p).startswith("write-shard-train-000007-")
    assert task_key("s3://b/a/train", p) != task_key("s3://b/b/train", p)


@given(st.text(max_size=60) | st.from_regex(r"(tcp|tls|ws)://[a-z0-9.:\[\]-]{0,20}:[0-9]{0,6}", fullmatch=True))
@settings(max_examples=60, deadline=None)
def test_address_parser_answers_or_refuses(address):
    """A flow parameter, so untrusted: a valid address comes back unchanged, anything else is a
    ValueError naming it; never another exception."""
    try:
        assert check_address(address) == address
    except ValueError as e:
        assert repr(address) in str(e)
        return
    scheme, rest = address.split("://", 1)
    host, port = rest.rsplit(":", 1)
    assert scheme in ("tcp", "tls") and host and 0 < int(port) < 65536 and not any(c.isspace() for c in address)


def test_cli_refuses_a_bad_address_and_workers_with_dask(sample, tmp_path, capsys):
    from pipeline.sharding.cli import cli

    base = ["--source", sample["folder"], "--dest", str(tmp_path / "out")]
    assert cli([*base, "--dask", "scheduler:8786"]) == 2
    assert "dask address 'scheduler:8786': expected tcp://HOST:PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli([*base, "--dask", "tcp://scheduler:8786", "--workers", "4"])
    assert exit_.value.code == 2 and "--workers sizes the local process pool" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_exceptions_pickle_plainly_after_importing_distributed():
    """distributed's import registers tblib's exception reducers process-wide, which DALI's worker
    channel refuses (its loader workers' StopIteration included); import_distributed takes them back."""
    import pickle

    import tblib.pickling_support

    tblib.pickling_support.install()  # what `import distributed` does
    assert b"tblib" in pickle.dumps(StopIteration("end of epoch"))
    import_distributed()
    assert b"tblib" not in pickle.dumps(StopIteration("end of epoch"))
