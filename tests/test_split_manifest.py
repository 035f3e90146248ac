"""The manifest of a sharded split: its schema lives below the stages that write and read it, and
every field that decides what a grow writes or deletes is checked before it is used."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import pathlib
import shutil
import time

import pytest
from test_sharding_growth import grow

from pipeline import sample_data, storage
from pipeline.data.shards import read_split
from pipeline.sharding import ShardingError, shard_dataset, verify_split
from pipeline.sharding import revisions as rv

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_data_layer_imports_no_stage():
    """pipeline/data reads what pipeline/sharding writes through pipeline/split_manifest.py."""
    stages = ("pipeline.sharding", "pipeline.training", "pipeline.registry", "pipeline.finetune", "pipeline.evaluation")
    found = []
    for path in sorted((ROOT / "pipeline" / "data").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{path.name}: {n}" for n in names if n.startswith(stages)]
    assert found == []


# --- fields that decide what a grow writes and deletes (issue 26, item 4) ------------------------

SHARD_MB = 0.02


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_data.build(str(tmp_path_factory.mktemp("sample")), per_class=10, size=32)


def sharded(sample, tmp_path, dest) -> tuple[str, str, dict]:
    src = str(tmp_path / "src")
    shutil.copytree(sample["folder"], src)
    first = shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)["train"]
    assert len(first["shards"]) > 3
    return src, storage.join(dest, "train"), first


def edit_manifest(split: str, change) -> None:
    url = storage.join(split, "manifest.json")
    m = json.loads(storage.read_bytes(url))
    change(m)
    storage.write_bytes(url, json.dumps(m).encode())


def stored(split: str) -> dict[str, bytes]:
    """Every file under the split, by path: what a refused grow must leave as it was."""
    fs, path = storage.filesystem(split)
    return {p: fs.cat_file(p) for p in fs.find(path)}


@pytest.mark.parametrize("next_shard", [0, -1])
def test_an_edited_next_shard_is_refused_before_a_grow_touches_a_shard(sample, tmp_path, store_url, next_shard):
    src, split, _ = sharded(sample, tmp_path, store_url)
    edit_manifest(split, lambda m: m.update(next_shard=next_shard))
    before = stored(split)
    grow(src)
    with pytest.raises(ValueError, match=r"train/manifest.json: .*next_shard"):
        shard_dataset(src, store_url, splits="train", shard_size_mb=SHARD_MB)
    assert stored(split) == before  # no shard overwritten or deleted, no claim or file list written
    for read in (read_split, verify_split):  # readers and `mfm shard verify` refuse it too
        with pytest.raises(ValueError, match="next_shard"):
            read(split)


def test_next_shard_below_an_earlier_revisions_shards_is_refused(sample, tmp_path):
    """After a rebuild the listed shards start past the replaced ones, whose files stay for
    readers still on them: next_shard must stay past those too."""
    src, split, first = sharded(sample, tmp_path, str(tmp_path / "out"))
    grow(src)
    rebuilt = shard_dataset(src, str(tmp_path / "out"), splits="train", shard_size_mb=SHARD_MB, rebuild=True)["train"]
    assert rebuilt["next_shard"] > len(rebuilt["shards"])
    edit_manifest(split, lambda m: m.update(next_shard=len(first["shards"]) - 1))
    with pytest.raises(ValueError, match=r"next_shard: .*taken"):
        verify_split(split)


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda m: m.update(revision=1.5), "revision"),
        (lambda m: m.update(revision=True), "revision"),
        (lambda m: m.update(revisions=["revision 1"]), r"revisions\[0\]"),
        (lambda m: m.update(revisions={"1": {}}), "revisions"),
        (lambda m: m["revisions"][0].update(revision=1.0), r"revisions\[0\]\.revision"),
        (lambda m: m["revisions"][0].update(first_shard=-4), r"revisions\[0\]\.first_shard"),
        (lambda m: m["revisions"][0].update(files_sha256=7), r"revisions\[0\]\.files_sha256"),
    ],
)
def test_malformed_revision_fields_are_a_clear_error(sample, tmp_path, change, key):
    dest = str(tmp_path / "out")
    src, split, _ = sharded(sample, tmp_path, dest)
    edit_manifest(split, change)
    grow(src)
    with pytest.raises(ValueError, match=rf"train/manifest.json: not a valid manifest: {key}"):
        shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)


def test_a_claim_from_the_future_does_not_block_growing_forever(sample, tmp_path):
    dest = str(tmp_path / "out")
    src, split, _ = sharded(sample, tmp_path, dest)
    grow(src)
    claim = rv.claim_url(split, 2)
    held = {"owner": "someone", "digest": "another plan", "heartbeat": time.time() + 30}
    assert storage.create_bytes(claim, json.dumps(held).encode())
    with pytest.raises(ShardingError, match="another writer"):  # a clock a little ahead: still held
        shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)
    held["heartbeat"] = time.time() + 10 * rv.CLAIM_STALE_S  # no live writer's heartbeat: taken over
    storage.write_bytes(claim, json.dumps(held).encode())
    assert shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)["train"]["revision"] == 2


def test_a_revision_file_list_that_inflates_is_refused(sample, tmp_path):
    """A gzip bomb (40 MiB from some 40 KB) whose sha256 the manifest records: the sharder stops
    decompressing at a bound instead of filling the memory."""
    dest = str(tmp_path / "out")
    src, split, _ = sharded(sample, tmp_path, dest)
    bomb = gzip.compress(b"a" * (40 << 20) + b"\t1\tk\n", compresslevel=9, mtime=0)
    storage.write_bytes(rv.files_url(split, 1), bomb)
    edit_manifest(split, lambda m: m["revisions"][0].update(files_sha256=hashlib.sha256(bomb).hexdigest()))
    grow(src)
    with pytest.raises(ValueError, match=r"000001.files.tsv.gz: .*more than"):
        shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)
