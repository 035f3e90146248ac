"""Hostile and broken input (issue 16): names from shared storage stay inside their folder,
only regular files are read, one bad file is skipped and reported, and impossible values are
refused early with an error naming the file or key."""

from __future__ import annotations

import json
import os
import time

import pytest
from test_data_shards import write_split

from pipeline.config import StorageConfig
from pipeline.data.shards import Shard, cache_shard, read_samples, read_split
from pipeline.sharding import verify_split
from pipeline.sharding.cli import cli as shard_cli
from pipeline.storage import join, read_bytes, write_bytes

# --- 1: manifest names stay inside the split ---------------------------------------------------


def _edit_manifest(url: str, edit) -> None:
    m = json.loads(read_bytes(join(url, "manifest.json")))
    edit(m)
    write_bytes(join(url, "manifest.json"), json.dumps(m).encode())


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "../evil.tar"),
        ("name", "sub/../../evil.tar"),
        ("name", "s3://other-bucket/evil.tar"),
        ("name", "/etc/passwd"),
        ("name", ".."),
        ("name", ""),
        ("index", "../evil.idx"),
        ("index", "/tmp/evil.idx"),
    ],
)
def test_manifest_names_must_be_plain_file_names(store_url, field, value, capsys):
    url = join(store_url, "train")
    write_split(url, [3, 2])
    # the bytes an attacker points at, just outside the split: reading them must never happen
    write_split(join(store_url, "other"), [3])
    write_bytes(join(store_url, "evil.tar"), read_bytes(join(store_url, "other", "train-000000.tar")))

    def edit(m):
        m["shards"][1][field] = value

    _edit_manifest(url, edit)
    with pytest.raises(ValueError, match=rf"manifest\.json.*shards\[1\]\.{field}") as e:
        read_split(url)
    assert repr(value) in str(e.value)
    with pytest.raises(ValueError, match=rf"manifest\.json.*shards\[1\]\.{field}"):
        verify_split(url)
    assert shard_cli(["verify", url]) == 1
    out = capsys.readouterr()
    assert "OK" not in out.out and f"shards[1].{field}" in out.err


def test_cache_path_stays_inside_the_cache(tmp_path, s3_endpoint):
    """Even a Shard built by hand (not from a checked manifest) cannot write outside the cache."""
    url = "s3://mfm-test/hostile-cache/train"
    write_split(url, [2])
    good = read_split(url).shards[0]
    cache = tmp_path / "cache"
    target = tmp_path / "escaped.tar"
    evil = Shard(f"../{target.name}", good.url, good.samples, good.nbytes, None)
    with pytest.raises(ValueError, match=r"not a plain file name"):
        cache_shard(evil, StorageConfig(), str(cache))
    assert not target.exists()
    # the checked path works and lands inside the cache
    local = cache_shard(good, StorageConfig(), str(cache))
    assert os.path.dirname(os.path.dirname(local)) == str(cache)
    assert len(read_samples(good, [0, 1], cache_dir=str(cache))) == 2


# --- 8: manifests of the wrong shape -------------------------------------------------------------


@pytest.mark.parametrize(
    "manifest,entry",
    [
        ([1, 2, 3], "expected a JSON object"),
        ({"format_version": 1, "shards": {"name": "x.tar"}}, "shards: expected a list"),
        ({"format_version": 1, "shards": ["train-000000.tar"]}, r"shards\[0\]: expected an object"),
        ({"format_version": 1, "shards": [{"name": "a.tar", "samples": "3"}]}, r"shards\[0\]\.samples"),
        ({"format_version": 1, "shards": [{"name": "a.tar", "samples": -1}]}, r"shards\[0\]\.samples"),
        ({"format_version": 1, "shards": [{"name": 7, "samples": 1}]}, r"shards\[0\]\.name"),
        ({"format_version": 1, "shards": [{"name": "a.tar", "samples": 1}], "classes": {"a": 1}}, "classes"),
    ],
)
def test_manifest_of_the_wrong_shape_is_named(tmp_path, manifest, entry, capsys):
    url = str(tmp_path / "train")
    write_bytes(join(url, "manifest.json"), json.dumps(manifest).encode())
    for read in (read_split, verify_split):
        with pytest.raises(ValueError, match=rf"manifest\.json: not a valid manifest: {entry}"):
            read(url)
    assert shard_cli(["verify", url]) == 1 and "manifest.json" in capsys.readouterr().err
    write_bytes(join(url, "manifest.json"), b"\xff\xfe not json")
    with pytest.raises(ValueError, match=r"manifest\.json: not a valid manifest: not JSON"):
        read_split(url)


@pytest.mark.parametrize("drop", ["options", "source", "classes"])
def test_resharding_over_a_manifest_of_the_wrong_shape_names_it(tmp_path, drop, capsys):
    from pipeline.cli import main
    from pipeline.sharding import shard_dataset

    src = _tree(tmp_path / "src", {"train": {"n01": 2, "n02": 2}, "val": {"n01": 1, "n02": 1}})
    dest = str(tmp_path / "out")
    shard_dataset(src, dest)
    _edit_manifest(join(dest, "train"), lambda m: m.pop(drop))
    for splits in ("train", "val"):  # its own manifest, and a sibling's (compared class tables)
        with pytest.raises(ValueError, match=rf"train/manifest\.json: not a manifest written by mfm shard: {drop}"):
            shard_dataset(src, dest, splits=splits)
    assert main(["shard", "--source", src, "--dest", dest, "--splits", "train", "--no-progress"]) == 2
    assert "train/manifest.json" in capsys.readouterr().err


# --- 8: impossible config values are refused early, naming the key -------------------------------


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.crop_scale=[0.9, 0.1]", "data.crop_scale"),
        ("data.crop_scale=[0, 1]", "data.crop_scale"),
        ("data.crop_scale=[0.5, 1.5]", "data.crop_scale"),
        ("finetune.crop_scale=[0.9, 0.1]", "finetune.crop_scale"),
        ("optim.betas=[0.9, 1.0]", "optim.betas"),
        ("optim.betas=[-0.1, 0.9]", "optim.betas"),
        ("optim.base_lr=.inf", "optim.base_lr"),
        ("optim.base_lr=.nan", "optim.base_lr"),
        ("optim.min_lr=.inf", "optim.min_lr"),
        ("optim.warmup_lr=.inf", "optim.warmup_lr"),
        ("optim.weight_decay=.inf", "optim.weight_decay"),
        ("optim.clip_grad=.inf", "optim.clip_grad"),
        ("data.batch_size=100000000000000000000000", "data.batch_size"),
        ("data.batch_size=1.0e+23", "data.batch_size"),
        ("optim.lr_base_batch=100000000000000000000000", "optim.lr_base_batch"),
        ("data.workers=100000000", "data.workers"),
        ("data.prefetch_shards=100000000", "data.prefetch_shards"),
    ],
)
def test_impossible_config_values_name_the_key(override, key):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"{key}: ") as e:
        load_config("tiny_cpu", [override])
    assert "invalid config" in str(e.value)


def test_possible_config_edges_still_load():
    from pipeline.config import load_config

    edges = ["data.crop_scale=[1.0, 1.0]", "optim.betas=[0.0, 0.999]", "data.workers=64", "data.batch_size=65536"]
    cfg = load_config("tiny_cpu", edges)
    assert cfg.data.crop_scale == (1.0, 1.0) and cfg.optim.betas == (0.0, 0.999)


# --- 11: a lying or stale index is caught and the tar scanned instead ----------------------------


def _rewrite_index(url: str, edit) -> None:
    idx = join(url, "train-000000.idx")
    lines = read_bytes(idx).decode().splitlines()
    rows = [line.split() for line in lines[1:]]
    edit(rows)
    write_bytes(idx, ("\n".join([lines[0], *(" ".join(r) for r in rows)]) + "\n").encode())


def _labels_ok(got: dict) -> bool:
    return all(int(s["cls"]) == int(s["__key__"][1:]) % 10 for s in got.values())


def test_index_lying_about_a_later_member_is_caught(store_url, caplog):
    """Sample 1's entries point at sample 2's bytes while keeping sample 1's names. The index only
    places a read of part of a remote shard (a local one is read in place): the key found at its
    offset is checked against the tar's own header before any sample is handed over."""
    url = join(store_url, "train")
    keys = write_split(url, [4])

    def borrow(rows):  # members: jpg, cls, json as (ext, offset, size, name) quadruples
        for k in (1, 5, 9):
            rows[1][k : k + 2] = rows[2][k : k + 2]  # still in file order

    _rewrite_index(url, borrow)
    shard = read_split(url).shards[0]
    with caplog.at_level("WARNING"):
        got = read_samples(shard, range(1, 4))
    assert [got[i]["__key__"] for i in range(1, 4)] == keys[1:] and _labels_ok(got)
    if not store_url.startswith("/"):
        # refused as out of file order across samples (read_index) before any header is read
        assert "train-000000.idx: not a v1.2 index of 4 samples; scanning the tar instead" in caplog.text


def test_index_pointing_past_the_end_is_stale_not_a_network_error(store_url, caplog):
    url = join(store_url, "train")
    keys = write_split(url, [4])

    def past_the_end(rows):
        for k in range(1, len(rows[3]), 4):
            rows[3][k] = str(int(rows[3][k]) + 10_000_000)

    _rewrite_index(url, past_the_end)
    shard = read_split(url).shards[0]
    with caplog.at_level("WARNING"):
        got = read_samples(shard, [3], StorageConfig(retries=2))
    assert got[3]["__key__"] == keys[3] and _labels_ok(got)
    if not store_url.startswith("/"):
        assert "scanning the tar instead" in caplog.text
    assert "retry" not in caplog.text  # never retried as if the network had failed


@pytest.mark.parametrize(
    "edit",
    [
        lambda rows: rows[2].__setitem__(1, "not-a-number"),
        lambda rows: rows[2].__setitem__(1, "-4096"),
        lambda rows: rows[2].__setitem__(2, "-5"),
    ],
    ids=["word", "negative-offset", "negative-size"],
)
def test_index_with_bad_numbers_falls_back_to_the_scan(s3_endpoint, caplog, edit):
    url = f"s3://mfm-test/bad-index-{time.time_ns()}/train"  # remote: a local shard never reads its index
    keys = write_split(url, [4])
    _rewrite_index(url, edit)
    with caplog.at_level("WARNING"):
        got = read_samples(read_split(url).shards[0], range(1, 4), StorageConfig(retries=1))
    assert [got[i]["__key__"] for i in range(1, 4)] == keys[1:] and _labels_ok(got)
    assert "scanning the tar instead" in caplog.text


# --- 4: a JPEG header claiming a huge size never reaches a decoder ------------------------------


def huge_jpeg(width: int = 60000, height: int = 60000) -> bytes:
    """A valid 8x8 JPEG (some 600 bytes) whose frame header claims width x height: it passes every
    marker check, and a decoder that believes it allocates width * height * 3 bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG", quality=95)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_pixel_limit_in_structural_and_decode_validation():
    from pipeline.jpeg import MAX_PIXELS, frame
    from pipeline.sharding.validate import check_image

    bomb = huge_jpeg()
    assert len(bomb) < 1000 and frame(bomb)[1:3] == (60000, 60000)
    for mode in ("structural", "decode"):
        got = check_image(bomb, mode)
        assert got.jpeg is None and "60000x60000" in got.reason and "max_pixels" in got.reason
    # the default admits large real photos (ImageNet's largest are a few tens of megapixels)
    assert MAX_PIXELS >= 8000 * 8000
    assert check_image(huge_jpeg(8000, 6000), "structural").jpeg is not None
    # configurable, and it covers what only Pillow can read (a PNG header)
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (40, 30)).save(png, "PNG")
    assert "max_pixels" in check_image(png.getvalue(), "structural", max_pixels=1000).reason
    assert check_image(png.getvalue(), "structural", max_pixels=1200).jpeg is not None


def test_sharder_rejects_a_huge_header_and_lists_it(tmp_path):
    from pipeline import sample_data
    from pipeline.sharding import shard_dataset

    src = tmp_path / "src"
    sample_data.build(str(src), per_class=2, size=32)
    folder = src / "folder"
    cls = sorted(os.listdir(folder / "train"))[0]
    (folder / "train" / cls / "bomb.JPEG").write_bytes(huge_jpeg())
    m = shard_dataset(str(folder), str(tmp_path / "out"), splits="train")["train"]
    assert [r["file"] for r in m["rejected"] if "max_pixels" in r["reason"]] == [f"{cls}/bomb.JPEG"]
    assert m["options"].get("max_pixels") is None  # the default is not recorded: older splits stay current
    m2 = shard_dataset(str(folder), str(tmp_path / "out2"), splits="train", max_pixels=100)["train"]
    assert m2["num_samples"] == 0 and all("max_pixels" in r["reason"] for r in m2["rejected"])
    assert m2["options"]["max_pixels"] == 100


def _bomb_split(url, monkeypatch, bad: int):
    import test_data_shards

    real = test_data_shards.jpeg
    monkeypatch.setattr(test_data_shards, "jpeg", lambda i, size=32: huge_jpeg() if i == bad else real(i, size))
    return write_split(url, [4, 4, 4], size=(40, 30))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loaders_skip_and_count_a_huge_header(tmp_path, monkeypatch, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from test_data_loader import make_cfg

    from pipeline.data import build_train_loader

    url = str(tmp_path / "train")
    _bomb_split(url, monkeypatch, bad=6)
    cfg = make_cfg(url, "data.workers=2", "corruption.kind=deblur")
    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu", backend=backend)
    batches = list(loader)
    assert len(batches) == 4 and loader.skipped == 1
    assert "s00006" in loader.skipped_keys[0] and "max_pixels" in loader.skipped_keys[0]
    # a configured limit below the real images' 40x30 skips them too, on the same header check
    cfg = make_cfg(url, "data.workers=0", "corruption.kind=deblur", "data.max_pixels=1000")
    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch=3, device="cpu", backend="torch")
    with pytest.raises(ValueError, match="every sample of batch"):
        list(loader)


# --- source trees: special files, links, names, archives, dest inside the source ----------------


def _tree(root, layout: dict[str, dict[str, int]]) -> str:
    """<root>/<split>/<class>/<class>_<i>.JPEG, small real JPEGs."""
    from test_data_shards import jpeg

    for split, classes in layout.items():
        for c, n in classes.items():
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                with open(os.path.join(root, split, c, f"{c}_{split}{i}.JPEG"), "wb") as f:
                    f.write(jpeg(i))
    return str(root)


def _reasons(rejected) -> dict[str, str]:
    return {r["file"]: r["reason"] for r in rejected}


def test_special_files_in_a_folder_source_are_listed_not_read(tmp_path):
    from pipeline.sharding import shard_dataset
    from pipeline.sharding.sources import list_split

    src = _tree(tmp_path / "src", {"train": {"n01": 3, "n02": 3}, "val": {"n01": 1, "n02": 1}})
    c = os.path.join(src, "train", "n01")
    os.symlink("/dev/zero", os.path.join(c, "zero.JPEG"))  # read as an image: until MemoryError
    os.mkfifo(os.path.join(c, "pipe.JPEG"))  # read as an image: hangs forever
    outside = tmp_path / "secret.JPEG"
    outside.write_bytes(b"not yours")
    os.symlink(str(outside), os.path.join(c, "link.JPEG"))  # a file outside the source
    os.symlink("loop.JPEG", os.path.join(c, "loop.JPEG"))
    os.symlink(str(tmp_path), os.path.join(c, "updir"))  # a folder outside the source
    listing = list_split(src, "train")
    reasons = _reasons(listing.rejected)
    assert {e.file for e in listing.entries} == {f"n0{k}/n0{k}_train{i}.JPEG" for k in (1, 2) for i in range(3)}
    for name in ("zero.JPEG", "link.JPEG", "loop.JPEG", "updir"):
        assert "symbolic link" in reasons[f"n01/{name}"]
    assert "FIFO" in reasons["n01/pipe.JPEG"]
    m = shard_dataset(src, str(tmp_path / "out"), splits="train")["train"]
    assert m["num_samples"] == 6 and len(m["rejected"]) == 5


def test_read_entry_refuses_what_is_not_a_regular_file(tmp_path):
    """Swapped after listing: a FIFO or a link where a regular file was must not hang or be followed."""
    import threading

    from pipeline.sharding.sources import Entry, read_entry

    fifo = str(tmp_path / "fifo.JPEG")
    os.mkfifo(fifo)
    real = tmp_path / "real.JPEG"
    real.write_bytes(b"x" * 10)
    link = str(tmp_path / "link.JPEG")
    os.symlink(str(real), link)
    for path in (fifo, link):
        out = {}

        def read(path=path, out=out):
            try:
                out["data"] = read_entry(Entry("k", "f", "n01", 10, path))
            except OSError as e:
                out["error"] = e

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), f"reading {path} hangs"
        assert "error" in out and path in str(out["error"])


def _ilsvrc_member(tf, name, data=None, kind=None, target=None):
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.mtime, info.mode = 0, 0o644
    if kind is not None:
        info.type, info.linkname = kind, target
        tf.addfile(info)
    else:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def test_links_inside_ilsvrc_tars_are_listed(tmp_path):
    import io
    import tarfile

    from test_data_shards import jpeg

    from pipeline.sharding.sources import list_split

    src = tmp_path / "ilsvrc"
    src.mkdir()
    with tarfile.open(src / "ILSVRC2012_img_val.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        _ilsvrc_member(tf, "ILSVRC2012_val_00000001.JPEG", jpeg(1))
        _ilsvrc_member(tf, "ILSVRC2012_val_00000002.JPEG", kind=tarfile.SYMTYPE, target="/dev/zero")
        _ilsvrc_member(tf, "ILSVRC2012_val_00000003.JPEG", kind=tarfile.LNKTYPE, target="ILSVRC2012_val_00000001.JPEG")
        _ilsvrc_member(tf, "ILSVRC2012_val_00000004.JPEG", kind=tarfile.FIFOTYPE, target="")
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _ilsvrc_member(tf, "n01_1.JPEG", jpeg(2))
        _ilsvrc_member(tf, "n01_2.JPEG", kind=tarfile.SYMTYPE, target="../../etc/passwd")
    with tarfile.open(src / "ILSVRC2012_img_train.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        _ilsvrc_member(tf, "n01.tar", inner.getvalue())
        _ilsvrc_member(tf, "n02.tar", kind=tarfile.SYMTYPE, target="/etc/passwd")
    (src / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"ILSVRC2012_val_0000000{i},n01 0 0 1 1\n" for i in range(1, 5))
    )
    val = list_split(str(src), "val")
    assert [e.file for e in val.entries] == ["ILSVRC2012_val_00000001.JPEG"]
    reasons = _reasons(val.rejected)
    assert "symbolic link" in reasons["ILSVRC2012_val_00000002.JPEG"]
    assert "hard link" in reasons["ILSVRC2012_val_00000003.JPEG"]
    assert "FIFO" in reasons["ILSVRC2012_val_00000004.JPEG"]
    train = list_split(str(src), "train")
    assert [e.file for e in train.entries] == ["n01/n01_1.JPEG"]
    reasons = _reasons(train.rejected)
    assert "symbolic link" in reasons["n01/n01_2.JPEG"] and "symbolic link" in reasons["n02.tar"]
    # a label file that is a FIFO would hang the listing: named instead
    from pipeline.sharding import SourceError

    os.remove(src / "LOC_val_solution.csv")
    os.mkfifo(src / "LOC_val_solution.csv")
    with pytest.raises(SourceError, match="LOC_val_solution.csv: not a regular file"):
        list_split(str(src), "val")


@pytest.mark.parametrize("inside", ["shards", "train/shards", "."])
def test_dest_inside_the_source_is_refused(tmp_path, inside, capsys):
    from pipeline.cli import main
    from pipeline.sharding import ShardingError, shard_dataset

    src = _tree(tmp_path / "src", {"train": {"n01": 2, "n02": 2}, "val": {"n01": 1, "n02": 1}})
    dest = os.path.normpath(os.path.join(src, inside))
    with pytest.raises(ShardingError, match="inside the source"):
        shard_dataset(src, dest)
    assert main(["shard", "--source", src, "--dest", dest, "--no-progress"]) == 2
    assert "inside the source" in capsys.readouterr().err
    assert sorted(os.listdir(src)) == ["train", "val"]  # nothing written into it


def test_class_tables_that_would_differ_between_splits_are_refused(tmp_path):
    from pipeline.sharding import ShardingError, read_manifest, shard_dataset

    src = _tree(tmp_path / "src", {"train": {"n01": 2, "n03": 2}, "val": {"n01": 1, "n03": 1}})
    dest = str(tmp_path / "out")
    shard_dataset(src, dest, splits="train")
    _tree(src, {"val": {"n02": 1}})  # a class appears after train was sharded: n03 would move in val
    with pytest.raises(ShardingError, match=r"class table would differ from split 'train'.*1: n02 here, n03"):
        shard_dataset(src, dest, splits="val")
    assert not os.path.exists(os.path.join(dest, "val", "manifest.json"))
    shard_dataset(src, str(tmp_path / "fresh"))  # sharded together, the tables agree
    t, v = (read_manifest(os.path.join(tmp_path, "fresh", s)) for s in ("train", "val"))
    assert t["classes"] == v["classes"] and [c["wnid"] for c in t["classes"]] == ["n01", "n02", "n03"]


def test_names_that_are_not_utf8_are_rejected_and_the_split_goes_on(tmp_path):
    import tarfile

    from test_data_shards import jpeg

    from pipeline.sharding import shard_dataset

    src = _tree(tmp_path / "src", {"train": {"n01": 2, "n02": 2}, "val": {"n01": 1, "n02": 1}})
    with open(os.path.join(os.fsencode(src), b"train", b"n01", b"caf\xe9.JPEG"), "wb") as f:
        f.write(jpeg(9))
    os.makedirs(os.path.join(os.fsencode(src), b"train", b"n\xff3"))
    with open(os.path.join(os.fsencode(src), b"train", b"n\xff3", b"a.JPEG"), "wb") as f:
        f.write(jpeg(9))
    m = shard_dataset(src, str(tmp_path / "out"), splits="train")["train"]
    assert m["num_samples"] == 4
    reasons = _reasons(m["rejected"])
    assert reasons == {"n01/caf\\xe9.JPEG": "name is not valid UTF-8", "n\\xff3": "name is not valid UTF-8"}
    json.dumps(m, ensure_ascii=False).encode()  # the manifest itself is valid UTF-8
    # the same inside an archive
    ils = tmp_path / "ilsvrc"
    ils.mkdir()
    with tarfile.open(ils / "ILSVRC2012_img_val.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        _ilsvrc_member(tf, "ILSVRC2012_val_00000001.JPEG", jpeg(1))
        _ilsvrc_member(tf, "ILSVRC2012_val_0000000\xe9.JPEG", jpeg(2))
    (ils / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01 0 0 1 1\n")
    m = shard_dataset(str(ils), str(tmp_path / "out2"), splits="val")["val"]
    assert m["num_samples"] == 1 and _reasons(m["rejected"]) == {
        "ILSVRC2012_val_0000000\\xe9.JPEG": "name is not valid UTF-8"
    }


def test_class_folder_symlink_loop_is_listed_not_a_traceback(tmp_path):
    from pipeline.sharding import shard_dataset

    src = _tree(tmp_path / "src", {"train": {"n01": 2, "n02": 2}, "val": {"n01": 1, "n02": 1}})
    os.symlink("n03", os.path.join(src, "train", "n03"))
    os.symlink(".", os.path.join(src, "train", "n04"))
    m = shard_dataset(src, str(tmp_path / "out"), splits="train")["train"]
    assert m["num_samples"] == 4 and [c["wnid"] for c in m["classes"]] == ["n01", "n02"]
    reasons = _reasons(m["rejected"])
    assert "symbolic link" in reasons["n03"] and "symbolic link" in reasons["n04"]


@pytest.mark.parametrize("damage", ["truncated", "not-a-tar", "empty"])
def test_a_damaged_val_archive_is_named(tmp_path, damage, capsys):
    import tarfile

    from test_data_shards import jpeg

    from pipeline.cli import main
    from pipeline.sharding import SourceError, shard_dataset

    src = tmp_path / "ilsvrc"
    src.mkdir()
    tar = src / "ILSVRC2012_img_val.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(1, 4):
            _ilsvrc_member(tf, f"ILSVRC2012_val_0000000{i}.JPEG", jpeg(i, 64))
    (src / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"ILSVRC2012_val_0000000{i},n01 0 0 1 1\n" for i in range(1, 4))
    )
    data = tar.read_bytes()
    tar.write_bytes(
        {"truncated": data[: len(data) // 2 + 100], "not-a-tar": b"<html>403</html>" * 100, "empty": b""}[damage]
    )
    with pytest.raises(SourceError, match="ILSVRC2012_img_val.tar"):
        shard_dataset(str(src), str(tmp_path / "out"))
    assert main(["shard", "--source", str(src), "--dest", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "ILSVRC2012_img_val.tar" in capsys.readouterr().err


# --- labelled loaders (fine-tuning, evaluation): a body that does not decode is skipped too ------


def undecodable_jpeg() -> bytes:
    """Passes every marker check (SOF, 3 components, EOI) but Pillow refuses the frame."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    data[data.index(b"\xff\xc0") + 11] = 0  # the first component's sampling factors
    return bytes(data)


@pytest.mark.parametrize("kind", ["eval", "eval-augment", "seeded-train"])
def test_labelled_loaders_skip_and_count_a_body_that_does_not_decode(tmp_path, monkeypatch, kind):
    import test_data_shards
    import torch
    from test_data_loader import make_cfg
    from torchvision.transforms import v2 as T

    from pipeline.data import build_eval_loader
    from pipeline.data.loader import build_labelled_train_loader

    real = test_data_shards.jpeg
    monkeypatch.setattr(test_data_shards, "jpeg", lambda i, size=32: undecodable_jpeg() if i == 2 else real(i, size))
    url = str(tmp_path / "train")
    write_split(url, [4, 4])
    cfg = make_cfg(url, "data.shuffle_buffer=0", "data.workers=1")
    if kind == "seeded-train":
        transform = T.Compose([T.PILToTensor(), T.Resize((32, 32)), T.ToDtype(torch.float32, scale=True)])
        loader = build_labelled_train_loader(
            cfg, rank=0, world_size=1, micro_batch=4, device="cpu", transform=transform
        )
        batches = [(b.images, b.labels) for b in loader]
    else:
        loader = build_eval_loader(
            cfg, url, rank=0, world_size=1, batch_size=4, device="cpu", train_augment=kind == "eval-augment"
        )
        batches = list(loader)
    labels = torch.cat([lab for _, lab in batches])
    assert len(batches) == 2 and all(torch.isfinite(im).all() for im, _ in batches)
    assert loader.skipped == 1 and "s00002" in loader.skipped_keys[0]
    if kind == "eval":  # in order: slot 2 holds sample 3, image and label together
        assert labels.tolist() == [0, 1, 3, 3, 4, 5, 6, 7]
        assert torch.equal(batches[0][0][2], batches[0][0][3])


def test_a_damaged_train_archive_is_named(tmp_path):
    import io
    import tarfile

    from test_data_shards import jpeg

    from pipeline.sharding import SourceError
    from pipeline.sharding.sources import list_split

    src = tmp_path / "ilsvrc"
    src.mkdir()
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(3):
            _ilsvrc_member(tf, f"n01_{i}.JPEG", jpeg(i, 64))
    outer = io.BytesIO()
    with tarfile.open(fileobj=outer, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _ilsvrc_member(tf, "n01.tar", inner.getvalue())
        _ilsvrc_member(tf, "n02.tar", b"<html>not a tar</html>" * 40)
    tar = src / "ILSVRC2012_img_train.tar"
    tar.write_bytes(outer.getvalue())
    with pytest.raises(SourceError, match=r"ILSVRC2012_img_train.tar: member n02.tar: not a readable tar"):
        list_split(str(src), "train")
    tar.write_bytes(outer.getvalue()[:3000])
    with pytest.raises(SourceError, match=r"ILSVRC2012_img_train.tar"):
        list_split(str(src), "train")
