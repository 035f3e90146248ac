"""Hostile and broken input (issue 16): names from shared storage stay inside their folder,
only regular files are read, one bad file is skipped and reported, and impossible values are
refused early with an error naming the file or key."""

from __future__ import annotations

import json
import os

import pytest
from test_data_shards import write_split

from pipeline.config import StorageConfig
from pipeline.data.shards import Shard, cache_shard, read_samples, read_split
from pipeline.sharding.cli import cli as shard_cli
from pipeline.sharding.manifest import verify_split
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
    assert os.path.dirname(local) == str(cache) and len(read_samples(good, [0, 1], cache_dir=str(cache))) == 2


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
    """Sample 0's `.cls` entry points at sample 1's label bytes while keeping its own name: only
    the first member's header was checked, so sample 0 came back with sample 1's label."""
    url = join(store_url, "train")
    keys = write_split(url, [4])

    def borrow_label(rows):  # members: jpg, cls, json as (ext, offset, size, name) quadruples
        rows[0][5:7], rows[0][9:11] = rows[1][5:7], rows[1][9:11]  # still in file order

    _rewrite_index(url, borrow_label)
    shard = read_split(url).shards[0]
    with caplog.at_level("WARNING"):
        got = read_samples(shard, range(4))
    assert [got[i]["__key__"] for i in range(4)] == keys and _labels_ok(got)
    assert "does not match the tar" in caplog.text and "s00000.cls" in caplog.text


def test_index_pointing_past_the_end_is_stale_not_a_network_error(store_url, caplog):
    url = join(store_url, "train")
    keys = write_split(url, [4])

    def past_the_end(rows):
        for k in range(1, len(rows[3]), 4):
            rows[3][k] = str(int(rows[3][k]) + 10_000_000)

    _rewrite_index(url, past_the_end)
    shard = read_split(url).shards[0]
    with caplog.at_level("WARNING"):
        got = read_samples(shard, range(4), StorageConfig(retries=2))
    assert [got[i]["__key__"] for i in range(4)] == keys and _labels_ok(got)
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
def test_index_with_bad_numbers_falls_back_to_the_scan(tmp_path, caplog, edit):
    url = str(tmp_path / "train")
    keys = write_split(url, [4])
    _rewrite_index(url, edit)
    with caplog.at_level("WARNING"):
        got = read_samples(read_split(url).shards[0], range(4), StorageConfig(retries=1))
    assert [got[i]["__key__"] for i in range(4)] == keys and _labels_ok(got)
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
