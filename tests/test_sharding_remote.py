"""A source on object storage (an ImageFolder tree on the S3 endpoint): listed like a local tree,
names that could leave their folder rejected, unreadable objects skipped and reported."""

from __future__ import annotations

import io
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import storage
from pipeline.sharding import ShardingError, SourceError, shard_dataset
from pipeline.sharding.remote import WINDOW, read_entries, source_listing, source_splits
from pipeline.sharding.sources import CONTROL


def _jpeg(seed: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (seed % 256, 80, 160)).save(out, "JPEG")
    return out.getvalue()


def _put(prefix: str, files: dict[str, bytes]) -> None:
    fs, path = storage.filesystem(prefix)
    for name, data in files.items():
        fs.pipe_file(f"{path}/{name}", data)


def _prefix(name: str) -> str:
    return f"s3://mfm-test/remote-{name}-{time.time_ns()}"


def test_listing_follows_the_local_rules(s3_endpoint):
    src = _prefix("rules")
    _put(
        src,
        {
            "train/n01/a.JPEG": _jpeg(1),
            "train/n01/sub/b.jpg": _jpeg(2),
            "train/n02/c.png": _jpeg(3),
            "train/n02/notes.txt": b"x",
            "train/n02/.hidden.JPEG": _jpeg(4),
            "train/n02/../n01/escape.JPEG": _jpeg(5),
            "train/n02//double.JPEG": _jpeg(6),
            "train/README": b"beside the classes",
            "val/n03/d.JPEG": _jpeg(7),
        },
    )
    assert source_splits(src) == ["train", "val"]
    listing = source_listing(src, "train")
    assert sorted(e.file for e in listing.entries) == ["n01/a.JPEG", "n01/sub/b.jpg", "n02/c.png"]
    assert all(e.path == storage.join(src, "train", e.file) for e in listing.entries)
    assert [c["wnid"] for c in listing.classes] == ["n01", "n02", "n03"]  # the union over the splits
    reasons = {r["file"]: r["reason"] for r in listing.rejected}
    assert reasons["n02/notes.txt"] == "not an image file extension"
    assert "'..'" in reasons["n02/../n01/escape.JPEG"] and "empty" in reasons["n02//double.JPEG"]
    with pytest.raises(SourceError, match="split 'test' not found"):
        source_listing(src, "test")


def test_listing_rejects_keys_with_control_characters(s3_endpoint):
    """As a local listing does: a tab or newline in a name would break the revision file lists."""
    src = _prefix("control")
    _put(
        src,
        {"train/n01/a.JPEG": _jpeg(1), "train/n01/tab\there.JPEG": _jpeg(2), "train/n01/unit\x1fsep.JPEG": _jpeg(3)},
    )
    listing = source_listing(src, "train")
    assert [e.file for e in listing.entries] == ["n01/a.JPEG"]
    assert {r["file"]: r["reason"] for r in listing.rejected} == {
        "n01/unit\x1fsep.JPEG": CONTROL,
        "n01/tab\there.JPEG": CONTROL,
    }


def test_sharded_from_s3_with_an_object_gone_since_listing(s3_endpoint, tmp_path, monkeypatch):
    """An object deleted between listing and reading is one rejected sample, not the end of the shard."""
    import pipeline.sharding.remote as remote

    src = _prefix("gone")
    _put(src, {f"train/n01/{i:03d}.JPEG": _jpeg(i) for i in range(WINDOW + 5)})
    listing = remote._list_remote

    def list_then_delete(*args):
        out = listing(*args)
        fs, path = storage.filesystem(src)
        fs.rm_file(f"{path}/train/n01/007.JPEG")
        return out

    monkeypatch.setattr(remote, "_list_remote", list_then_delete)
    m = shard_dataset(src, str(tmp_path / "out"), splits="train")["train"]
    assert m["num_samples"] == WINDOW + 4
    assert [r["file"] for r in m["rejected"]] == ["n01/007.JPEG"] and "unreadable" in m["rejected"][0]["reason"]


def test_dest_inside_a_remote_source_is_refused(s3_endpoint):
    src = _prefix("inside")
    _put(src, {"train/n01/a.JPEG": _jpeg()})
    with pytest.raises(ShardingError, match="is inside the source"):
        shard_dataset(src, f"{src}/shards")


def test_read_entries_keeps_the_order_of_local_and_remote_entries(s3_endpoint, tmp_path):
    from pipeline.sharding.sources import Entry

    src = _prefix("order")
    _put(src, {f"train/n01/{i}.JPEG": bytes([i]) * 3 for i in range(3)})
    (tmp_path / "x.JPEG").write_bytes(b"local")
    entries = [
        Entry("a", "n01/0.JPEG", "n01", 3, f"{src}/train/n01/0.JPEG"),
        Entry("b", "x.JPEG", "n01", 5, str(tmp_path / "x.JPEG")),
        Entry("c", "n01/missing.JPEG", "n01", 3, f"{src}/train/n01/missing.JPEG"),
        Entry("d", "n01/2.JPEG", "n01", 3, f"{src}/train/n01/2.JPEG"),
    ]
    got = [(e.key, d) for e, d in read_entries(entries)]
    assert [k for k, _ in got] == ["a", "b", "c", "d"]
    assert got[0][1] == b"\x00" * 3 and got[1][1] == b"local" and got[3][1] == b"\x02" * 3
    assert isinstance(got[2][1], FileNotFoundError)


_PART = st.text(alphabet="ab.-_ /%\\", min_size=0, max_size=6)


@given(st.lists(_PART, min_size=1, max_size=4).map("/".join))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_object_name_is_listed_inside_its_folder_or_rejected(s3_endpoint, name):
    """Object names are untrusted: whatever the key, an entry names an object under its split
    (no empty, '.' or '..' part) or the key is rejected or skipped; never a traceback."""
    src = _prefix("fuzz")
    _put(src, {"train/n01/ok.JPEG": _jpeg(), f"train/{name}.JPEG": _jpeg(1)})
    try:
        listing = source_listing(src, "train")
    except SourceError as e:
        assert src in str(e)
        return
    for e in listing.entries:
        parts = e.file.split("/")
        assert len(parts) >= 2 and not any(p in ("", ".", "..") for p in parts), e
        assert e.path == storage.join(src, "train", e.file)
    assert "n01/ok.JPEG" in {e.file for e in listing.entries}
