"""A growing source: revisions shard only new files, leave old shards byte-identical, keep class
indices, report changed and deleted files, refuse a second writer, and rebuild on request."""

import collections
import io
import json
import os
import shutil
import tarfile
import time

import pytest

from pipeline import sample_data, storage
from pipeline.sharding import ShardingError, read_manifest, shard_dataset, verify_split
from pipeline.sharding import revisions as rv

SHARD_MB = 0.02


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_data.build(str(tmp_path_factory.mktemp("sample")), per_class=10, size=32)


def grow(src: str) -> dict:
    """+10% files (one in a class whose wnid sorts first), one file changed, one deleted."""
    train = os.path.join(src, "train")
    old = sorted(os.path.join(w, f) for w in os.listdir(train) for f in os.listdir(os.path.join(train, w)))
    pic = open(os.path.join(train, old[0]), "rb").read()
    added = [f"n00000003/n00000003_new{i}.JPEG" for i in range(len(old) // 10 - 1)] + ["a0000000/a0000000_1.JPEG"]
    for f in added:
        os.makedirs(os.path.join(train, os.path.dirname(f)), exist_ok=True)
        shutil.copyfile(os.path.join(train, old[len(added)]), os.path.join(train, f))
    changed, deleted = old[1], old[2]
    with open(os.path.join(train, changed), "ab") as fh:
        fh.write(pic[:10])
    os.remove(os.path.join(train, deleted))
    return {"added": added, "changed": changed, "deleted": deleted, "old": old}


def samples_of(split_url: str, manifest: dict) -> list[dict]:
    """Every sample's json (with its .cls) in manifest order, read from the stored tars."""
    out = []
    for s in manifest["shards"]:
        data = storage.read_bytes(storage.join(split_url, s["name"]))
        members = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in tf:
                members[m.name] = tf.extractfile(m).read()
        for name, raw in members.items():
            if name.endswith(".json"):
                meta = json.loads(raw)
                meta["cls_member"] = int(members[name[: -len("json")] + "cls"])
                meta["shard"] = s["name"]
                out.append(meta)
    return out


def shard_bytes(split_url: str, manifest: dict) -> dict[str, bytes]:
    return {
        n: storage.read_bytes(storage.join(split_url, n)) for s in manifest["shards"] for n in (s["name"], s["index"])
    }


def test_growth_adds_only_new_files_and_keeps_everything_else(sample, tmp_path, store_url):
    src = str(tmp_path / "src")
    shutil.copytree(sample["folder"], src)
    split = storage.join(store_url, "train")
    first = shard_dataset(src, store_url, splits="train", shard_size_mb=SHARD_MB, seed=1)["train"]
    before = shard_bytes(split, first)
    g = grow(src)

    second = shard_dataset(src, store_url, splits="train", shard_size_mb=SHARD_MB, seed=1)["train"]
    assert second == read_manifest(split)
    assert second["revision"] == 2 and [r["revision"] for r in second["revisions"]] == [1, 2]
    # Old shards: listed first, unchanged in the manifest and byte-identical on storage.
    assert second["shards"][: len(first["shards"])] == first["shards"]
    assert {n: b for n, b in shard_bytes(split, second).items() if n in before} == before
    rec = second["revisions"][1]
    assert rec["first_shard"] == len(first["shards"]) and rec["shards"] == len(second["shards"]) - len(first["shards"])
    assert rec["samples"] == len(g["added"]) and second["num_samples"] == first["num_samples"] + len(g["added"])
    assert (rec["changed_files"], rec["missing_files"]) == ([g["changed"]], [g["deleted"]])
    # Each file exactly once: the new ones in the new shards; changed and deleted keep their old samples.
    got = samples_of(split, second)
    counts = collections.Counter(s["file"] for s in got)
    assert set(counts) == set(g["old"]) | set(g["added"]) and set(counts.values()) == {1}
    new_shards = {s["name"] for s in second["shards"][len(first["shards"]) :]}
    assert {s["file"] for s in got if s["shard"] in new_shards} == set(g["added"])
    assert len({s["file"] for s in got}) == len({s.get("file") for s in got})
    # Class indices: old ones never move; the new class (sorting first) takes the next index.
    assert second["classes"][: len(first["classes"])] == first["classes"]
    assert second["classes"][-1] == {"index": len(first["classes"]), "wnid": "a0000000", "name": "a0000000"}
    index = {c["wnid"]: c["index"] for c in second["classes"]}
    assert all(s["class"] == s["cls_member"] == index[s["wnid"]] for s in got)
    assert verify_split(split) == []

    # No new files: a no-op, nothing rewritten.
    assert shard_dataset(src, store_url, splits="train", shard_size_mb=SHARD_MB, seed=1)["train"] == second

    # --rebuild: every current file once, in shards numbered after all earlier ones; the old stay.
    third = shard_dataset(src, store_url, splits="train", shard_size_mb=SHARD_MB, seed=1, rebuild=True)["train"]
    assert third["revision"] == 3 and third["revisions"][-1]["rebuild"]
    assert min(int(s["name"][6:12]) for s in third["shards"]) == second["next_shard"]
    files = collections.Counter(s["file"] for s in samples_of(split, third))
    assert set(files) == (set(g["old"]) - {g["deleted"]}) | set(g["added"]) and set(files.values()) == {1}
    assert third["classes"] == second["classes"]
    assert storage.exists(storage.join(split, second["shards"][0]["name"]))


def test_a_second_writer_is_refused_and_a_dead_ones_claim_taken_over(sample, tmp_path):
    src, dest = str(tmp_path / "src"), str(tmp_path / "out")
    shutil.copytree(sample["folder"], src)
    shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)
    grow(src)
    claim = rv.claim_url(os.path.join(dest, "train"), 2)
    held = {"owner": "someone", "digest": "another plan", "heartbeat": time.time()}
    assert storage.create_bytes(claim, json.dumps(held).encode())
    with pytest.raises(ShardingError, match="000002.claim: another writer"):
        shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)
    assert read_manifest(os.path.join(dest, "train"))["revision"] == 1
    # The same claim gone silent for longer than the lease: taken over, and the revision committed.
    held["heartbeat"] = time.time() - rv.CLAIM_STALE_S - 1
    open(claim, "w").write(json.dumps(held))
    assert shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)["train"]["revision"] == 2


def test_a_manifest_changed_by_another_writer_is_not_overwritten(sample, tmp_path, monkeypatch):
    """The commit is a compare-and-swap on manifest.json: a writer that read an older manifest loses."""
    from pipeline.sharding import job

    src, dest = str(tmp_path / "src"), str(tmp_path / "out")
    shutil.copytree(sample["folder"], src)
    shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)
    grow(src)
    manifest = os.path.join(dest, "train", "manifest.json")
    real_run = job._run

    def racing_run(*args, **kwargs):  # another writer commits while this one writes its shards
        out = real_run(*args, **kwargs)
        m = json.loads(open(manifest).read())
        m["tool"] += " (the other writer)"
        open(manifest, "w").write(json.dumps(m))
        return out

    monkeypatch.setattr(job, "_run", racing_run)
    with pytest.raises(ShardingError, match="changed by another writer"):
        shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)
    assert json.loads(open(manifest).read())["tool"].endswith("(the other writer)")


def test_pure_parts():
    old = [{"index": 0, "wnid": "b", "name": "B"}, {"index": 1, "wnid": "c", "name": "C"}]
    cur = [{"index": 0, "wnid": "a", "name": "A"}, {"index": 1, "wnid": "b", "name": "B"}]
    assert rv.extend_classes(old, cur) == [*old, {"index": 2, "wnid": "a", "name": "A"}]
    E = rv.Entry
    known = {"x/1.jpg": (5, "1"), "x/2.jpg": (6, "2"), "x/3.jpg": (7, "3")}
    g = rv.diff(known, [E("1", "x/1.jpg", "x", 5, ""), E("2", "x/2.jpg", "x", 9, ""), E("1", "y/1.jpg", "y", 1, "")])
    assert ([e.file for e in g.new], g.changed, g.missing) == (["y/1.jpg"], ["x/2.jpg"], ["x/3.jpg"])
    assert [e.key for e in rv.fresh_keys(g.new, {"1", "y_1"})] == ["y_1_1"]
    rows = [("b", 2, "kb"), ("a", 1, "")]
    assert rv.decode_files(rv.encode_files(rows), "t") == {"a": (1, ""), "b": (2, "kb")}
    assert rv.encode_files(rows) == rv.encode_files(rows[::-1])


def test_racing_claims_have_one_winner(store_url):
    """Writers with different plans claiming the same revision at once: exactly one gets it."""
    from concurrent.futures import ThreadPoolExecutor

    split = storage.join(store_url, "train")

    def try_claim(i):
        try:
            return rv.claim(split, 2, f"plan {i}", None)
        except rv.ClaimRefused:
            return None

    with ThreadPoolExecutor(6) as pool:
        got = [c for c in pool.map(try_claim, range(6)) if c is not None]
    assert len(got) == 1
    got[0].refresh(None)  # the winner's heartbeat goes on; a loser's would be refused
    loser = rv.Claim(rv.claim_url(split, 2), "someone else", "plan x", got[0].token)
    got[0].refresh(None)
    with pytest.raises(rv.ClaimRefused):
        loser.refresh(None)


def test_only_deletions_commit_a_revision_without_shards(sample, tmp_path):
    src, dest = str(tmp_path / "src"), str(tmp_path / "out")
    shutil.copytree(sample["folder"], src)
    first = shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)["train"]
    gone = sorted(os.listdir(os.path.join(src, "train", "n00000001")))[0]
    os.remove(os.path.join(src, "train", "n00000001", gone))
    second = shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)["train"]
    assert second["revision"] == 2 and second["shards"] == first["shards"]
    assert second["revisions"][1]["shards"] == 0 and second["revisions"][1]["missing_files"] == [f"n00000001/{gone}"]
    assert second["num_samples"] == first["num_samples"]  # kept until --rebuild
    assert shard_dataset(src, dest, splits="train", shard_size_mb=SHARD_MB)["train"] == second
