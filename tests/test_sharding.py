"""End-to-end sharding: both input formats, read back with webdataset and DALI, bad files,
determinism, idempotence, verify, a killed-and-resumed run, and S3 with an endpoint restart."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from pipeline import sample_data, storage
from pipeline.sharding import ShardingError, SourceError, read_manifest, shard_dataset, verify_split

SHARD_MB = 0.06  # a dozen samples per shard at 32px: several shards from a small set
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    summary = sample_data.build(str(root), per_class=12, size=32, with_bad_files=True)
    return summary


def expected_labels(folder: str, split: str) -> dict[str, str]:
    """key -> wnid of every file in the folder layout (the ground truth)."""
    out = {}
    for wnid in os.listdir(os.path.join(folder, split)):
        for name in os.listdir(os.path.join(folder, split, wnid)):
            out[name.rsplit(".", 1)[0]] = wnid
    return out


def local_shards(split_dir: str) -> dict[str, bytes]:
    return {
        n: open(os.path.join(split_dir, n), "rb").read()
        for n in sorted(os.listdir(split_dir))
        if n.endswith((".tar", ".idx"))
    }


REJECTED = {f"n00000000_{k}" for k, v in sample_data.BAD_FILES.items() if v == "rejected"}
REENCODED = {f"n00000000_{k}" for k, v in sample_data.BAD_FILES.items() if v == "reencoded"}


@pytest.fixture(scope="module")
def sharded(sample, tmp_path_factory):
    """Both formats sharded once (the folder with two worker processes)."""
    out = tmp_path_factory.mktemp("sharded")
    folder = shard_dataset(sample["folder"], str(out / "folder"), shard_size_mb=SHARD_MB, workers=2, seed=3)
    ilsvrc = shard_dataset(sample["ilsvrc"], str(out / "ilsvrc"), shard_size_mb=SHARD_MB, seed=3)
    return out, folder, ilsvrc


def test_layout_and_manifest_follow_the_contract(sharded, sample):
    out, folder, ilsvrc = sharded
    for fmt, manifests in (("folder", folder), ("ilsvrc", ilsvrc)):
        assert set(manifests) == {"train", "val"}
        for split, m in manifests.items():
            d = out / fmt / split
            assert m == json.loads((d / "manifest.json").read_text())
            assert m["format_version"] == 1 and m["split"] == split and m["tool"].startswith("mfm-pipeline ")
            assert len(m["shards"]) >= 2
            assert sorted(os.listdir(d)) == sorted(
                ["manifest.json", "revisions", *(s["name"] for s in m["shards"]), *(s["index"] for s in m["shards"])]
            )
            assert sorted(os.listdir(d / "revisions")) == ["000001.claim", "000001.files.tsv.gz"]
            assert m["revision"] == 1 and [r["revision"] for r in m["revisions"]] == [1]
            for i, s in enumerate(m["shards"]):
                data = (d / s["name"]).read_bytes()
                assert s["name"] == f"{split}-{i:06d}.tar" and s["index"] == f"{split}-{i:06d}.idx"
                assert (len(data), hashlib.sha256(data).hexdigest()) == (s["bytes"], s["sha256"])
            assert m["num_samples"] == sum(s["samples"] for s in m["shards"])
            assert m["classes"][3] == {"index": 3, "wnid": "n00000003", "name": "Dress"}
            assert m["source"]["kind"] == ("folder" if fmt == "folder" else "ilsvrc-tar")
            assert m["options"] == {"seed": 3, "shard_size_mb": SHARD_MB, "max_side": None, "validation": "structural"}


def test_bad_files_are_rejected_and_reported_or_reencoded(sharded):
    _, folder, ilsvrc = sharded
    for m in (folder["train"], ilsvrc["train"]):
        rejected = {os.path.basename(r["file"]).rsplit(".", 1)[0]: r["reason"] for r in m["rejected"]}
        assert set(rejected) == REJECTED
        assert "empty" in rejected["n00000000_bad_empty"]
        assert "truncated" in rejected["n00000000_bad_truncated"]
        assert "not an image" in rejected["n00000000_bad_text"]
    assert folder["val"]["rejected"] == []


@pytest.mark.parametrize("fmt", ["folder", "ilsvrc"])
def test_webdataset_reads_every_good_image_once_with_its_label(sharded, sample, fmt):
    import webdataset as wds

    out, manifests, _ = sharded
    for split in ("train", "val"):
        m = read_manifest(str(out / fmt / split))
        urls = [str(out / fmt / split / s["name"]) for s in m["shards"]]
        seen = {}
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            key = s["__key__"]
            assert key not in seen, f"{key} twice"
            meta = json.loads(s["json"])
            img = Image.open(io.BytesIO(s["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (meta["width"], meta["height"])
            assert int(s["cls"]) == meta["class"] == m["classes"][meta["class"]]["index"]
            seen[key] = m["classes"][meta["class"]]["wnid"]
            assert meta["wnid"] == seen[key]
        want = {k: w for k, w in expected_labels(sample["folder"], split).items() if k not in REJECTED}
        assert seen == want
        assert len(seen) == m["num_samples"]
        if split == "train":
            assert REENCODED <= set(seen)


def test_dali_reads_every_good_image_once_with_its_label(sharded, sample):
    from nvidia.dali import fn, pipeline_def, types

    out, _, _ = sharded
    m = read_manifest(str(out / "ilsvrc" / "train"))
    d = out / "ilsvrc" / "train"

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def pipe():
        jpg, cls, meta = fn.readers.webdataset(
            paths=[str(d / s["name"]) for s in m["shards"]],
            index_paths=[str(d / s["index"]) for s in m["shards"]],
            ext=["jpg", "cls", "json"],
            missing_component_behavior="error",
            random_shuffle=False,
            name="r",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, meta

    p = pipe()
    p.build()
    n = p.epoch_size("r")
    assert n == m["num_samples"]
    labels = {}
    while len(labels) < n:
        imgs, cls, meta = p.run()
        for i in range(len(cls)):
            info = json.loads(bytes(meta.at(i)))
            label = int(bytes(cls.at(i)).decode())
            key = os.path.basename(info["file"]).rsplit(".", 1)[0]
            if len(labels) < n:  # the last batch wraps around
                assert key not in labels
                labels[key] = m["classes"][label]["wnid"]
                assert imgs.at(i).shape == (info["height"], info["width"], 3)
    want = {k: w for k, w in expected_labels(sample["folder"], "train").items() if k not in REJECTED}
    assert labels == want


def test_index_files_match_dalis_wds2idx(sharded, tmp_path):
    out, _, _ = sharded
    d = out / "ilsvrc" / "val"
    m = read_manifest(str(d))
    for s in m["shards"][:2]:
        subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "wds2idx"), str(d / s["name"]), str(tmp_path / "x.idx")],
            check=True,
            capture_output=True,
        )
        assert (tmp_path / "x.idx").read_bytes() == (d / s["index"]).read_bytes()


def test_both_formats_give_byte_identical_train_shards(sharded):
    """Same images, same keys, same seed: the tars do not depend on the container format or workers."""
    out, folder, ilsvrc = sharded
    assert folder["train"]["shards"] == ilsvrc["train"]["shards"]
    assert local_shards(out / "folder" / "train") == local_shards(out / "ilsvrc" / "train")


def test_seed_shuffles_across_shards(sharded, sample, tmp_path):
    out, folder, _ = sharded
    other = shard_dataset(sample["folder"], str(tmp_path / "s"), splits="val", shard_size_mb=SHARD_MB, seed=4)["val"]
    assert other["num_samples"] == folder["val"]["num_samples"]
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in folder["val"]["shards"]]
    first = json.loads(
        subprocess.run(
            ["tar", "xOf", str(out / "folder" / "val" / "val-000000.tar"), "--wildcards", "*.json"],
            capture_output=True,
            check=True,
        )
        .stdout.replace(b"}{", b"},{")
        .join([b"[", b"]"])
    )
    assert len({f["wnid"] for f in first}) > 3, "first shard should mix classes"


def test_rerun_is_a_noop_and_other_options_are_refused(sharded, sample):
    out, folder, _ = sharded
    d = out / "folder" / "val"
    before = {n: os.stat(d / n).st_mtime_ns for n in os.listdir(d)}
    again = shard_dataset(sample["folder"], str(out / "folder"), splits=["val"], shard_size_mb=SHARD_MB, seed=3)
    assert again["val"] == folder["val"]
    assert {n: os.stat(d / n).st_mtime_ns for n in os.listdir(d)} == before
    with pytest.raises(ShardingError, match="other options"):
        shard_dataset(sample["folder"], str(out / "folder"), splits=["val"], shard_size_mb=SHARD_MB, seed=4)


def test_decode_validation_and_max_side(sample, tmp_path):
    m = shard_dataset(
        sample["ilsvrc"], str(tmp_path / "o"), splits="train", validation="decode", max_side=24, shard_size_mb=1
    )["train"]
    assert {os.path.basename(r["file"]).rsplit(".", 1)[0] for r in m["rejected"]} == REJECTED
    import webdataset as wds

    sizes = {
        (json.loads(s["json"])["width"], json.loads(s["json"])["height"])
        for s in wds.WebDataset(str(tmp_path / "o" / "train" / "train-000000.tar"), shardshuffle=False)
    }
    assert sizes == {(24, 24)}


def test_unrecognised_source_and_missing_split_are_named(tmp_path, sample):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(SourceError, match=str(tmp_path / "junk")):
        shard_dataset(str(tmp_path / "junk"), str(tmp_path / "o"))
    with pytest.raises(SourceError, match="'test'"):
        shard_dataset(sample["folder"], str(tmp_path / "o"), splits="test")


def test_devkit_labels_and_names(sample, tmp_path):
    """The official devkit's ground truth + meta.mat instead of the Kaggle CSV."""
    import numpy as np
    from scipy.io import savemat

    src = tmp_path / "ilsvrc"
    src.mkdir()
    os.symlink(os.path.join(sample["ilsvrc"], "ILSVRC2012_img_val.tar"), src / "ILSVRC2012_img_val.tar")
    rows = [
        line.split(",")
        for line in open(os.path.join(sample["ilsvrc"], "LOC_val_solution.csv")).read().split("\n")[1:]
        if line
    ]
    wnids = [f"n{i:08d}" for i in range(10)]
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array(
        [(i + 1, w, f"name {w}", 0) for i, w in enumerate(wnids)] + [(11, "n99999999", "parent", 2)], dtype=dtype
    )
    data = src / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    savemat(data / "meta.mat", {"synsets": synsets})
    labels = dict((r[0], r[1].split()[0]) for r in rows)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{wnids.index(labels[f'ILSVRC2012_val_{i:08d}']) + 1}\n" for i in range(1, len(labels) + 1))
    )
    m = shard_dataset(str(src), str(tmp_path / "o"), splits="val", shard_size_mb=1)["val"]
    assert m["classes"][2] == {"index": 2, "wnid": "n00000002", "name": "name n00000002"}
    import webdataset as wds

    got = {
        s["__key__"]: int(s["cls"])
        for s in wds.WebDataset(str(tmp_path / "o" / "val" / "val-000000.tar"), shardshuffle=False)
    }
    assert got == {k: wnids.index(w) for k, w in labels.items()}


def test_verify_catches_a_tampered_shard(sharded, tmp_path):
    import shutil

    from pipeline.sharding.cli import cli

    out, _, _ = sharded
    d = tmp_path / "copy"
    shutil.copytree(out / "ilsvrc", d)
    assert cli(["verify", str(d)]) == 0
    assert verify_split(str(d / "val")) == []
    tar = d / "val" / "val-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    problems = verify_split(str(d / "val"))
    assert [p.shard for p in problems] == [str(tar)] and "sha256" in problems[0].message
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "shard", "verify", str(d / "val")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 1 and "val-000001.tar" in r.stderr and "sha256" in r.stderr
    (d / "train" / "train-000002.tar").unlink()
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "shard", "verify", str(d)], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 1 and "train-000002.tar: missing" in r.stderr


def test_killed_run_resumes_to_identical_output(sample, tmp_path):
    dest, ref = tmp_path / "killed", tmp_path / "ref"
    args = [
        "--source",
        sample["folder"],
        "--splits",
        "train",
        "--shard-size-mb",
        "0.004",
        "--seed",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "shard", "--dest", str(dest), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = dest / "train" / "_work" / "train-000000.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the first shard was never committed"
    assert not (dest / "train" / "manifest.json").exists(), "the run finished before it could be killed"
    partial = len(os.listdir(dest / "train" / "_work"))
    (dest / "train" / "train-009999.tar").write_bytes(b"left by an unfinished run with other options")
    manifest = shard_dataset(sample["folder"], str(dest), splits="train", shard_size_mb=0.004, seed=1)["train"]
    assert partial < len(manifest["shards"])
    assert manifest == shard_dataset(sample["folder"], str(ref), splits="train", shard_size_mb=0.004, seed=1)["train"]
    assert local_shards(dest / "train") == local_shards(ref / "train")
    assert sorted(os.listdir(dest / "train")) == sorted(os.listdir(ref / "train"))


def test_s3_with_endpoint_restart_mid_run(sample, s3_endpoint, tmp_path):
    """The endpoint goes down for longer than botocore's own retries last, mid-run."""
    import boto3

    url = f"s3://mfm-test/shards-{time.time_ns()}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint.url)
    prefix = url.split("/", 3)[3] + "/val/_work/"
    restarted = []

    def restart_after_first_shard():
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if s3.list_objects_v2(Bucket="mfm-test", Prefix=prefix).get("KeyCount"):
                    break
            except Exception:
                pass
            time.sleep(0.01)
        s3_endpoint.stop()
        time.sleep(5)
        s3_endpoint.start()
        restarted.append(time.time())

    t = threading.Thread(target=restart_after_first_shard, daemon=True)
    t.start()
    m = shard_dataset(sample["ilsvrc"], url, splits="val", shard_size_mb=0.004, seed=2)["val"]
    finished = time.time()
    t.join(30)
    assert restarted and restarted[0] < finished, "the outage did not fall inside the run"
    assert verify_split(storage.join(url, "val")) == []
    ref = shard_dataset(sample["ilsvrc"], str(tmp_path / "ref"), splits="val", shard_size_mb=0.004, seed=2)["val"]
    assert m == ref
    assert read_manifest(storage.join(url, "val")) == ref
    assert shard_dataset(sample["ilsvrc"], url, splits="val", shard_size_mb=0.004, seed=2)["val"] == ref  # no-op rerun


def test_storage_retries_botocore_connection_errors():
    """botocore's EndpointConnectionError is no OSError: storage.retry must still treat it as
    transient (an endpoint down longer than botocore's own retries used to kill the job)."""
    from botocore.exceptions import EndpointConnectionError

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    assert storage.retry(flaky, base_delay=0.001) == "ok" and len(calls) == 3


def test_cli_shards_and_names_a_bad_source(sample, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["shard", "--source", str(tmp_path), "--dest", str(tmp_path / "o")]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    args = [
        "shard",
        "--source",
        sample["ilsvrc"],
        "--dest",
        str(tmp_path / "o"),
        "--splits",
        "val",
        "--seed",
        "5",
        "--shard-size-mb",
        "0.05",
        "--validation",
        "decode",
        "--no-progress",
    ]
    assert main(args) == 0
    assert "val: 30 samples" in capsys.readouterr().out
    m = read_manifest(str(tmp_path / "o" / "val"))
    assert m["options"] == {"seed": 5, "shard_size_mb": 0.05, "max_side": None, "validation": "decode"}
    assert main(["shard", "verify", str(tmp_path / "o")]) == 0
