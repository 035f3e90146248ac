"""Property-based tests of the parsers of untrusted data files: split manifests and revision
records (through the grow path too), `.idx` rows, registry manifests, aliases and cards, and the
ImageNet label files. Each either gives the right answer or a clear error of the project's own
type naming the file; never another exception, a hang, or a write outside its folder."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from pipeline import split_manifest as mf
from pipeline import storage
from pipeline.sharding import revisions as rv
from pipeline.sharding import sources

# Example counts small enough for CI; the grow path shards a split per example, hence fewer there.
FUZZ = settings(max_examples=80, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    hs.none()
    | hs.booleans()
    | hs.integers(-(2**70), 2**70)
    | hs.floats()
    | hs.text(max_size=12)
    | hs.sampled_from(["../x.tar", "a/b", "C:\\x", ".", "..", "", "x\n.tar", "train-999999999999999999999.tar"])
)
json_values = hs.recursive(
    scalars, lambda c: hs.lists(c, max_size=3) | hs.dictionaries(hs.text(max_size=8), c, max_size=3), max_leaves=8
)


def a_manifest() -> dict:
    """What the sharder commits after two revisions (revision 2 added shards 2 and 3)."""
    shards = [
        {"name": f"train-{i:06d}.tar", "index": f"train-{i:06d}.idx", "samples": 3, "bytes": 4096, "sha256": "ab"}
        for i in range(4)
    ]
    revs = [
        {"revision": r, "rebuild": False, "first_shard": 2 * (r - 1), "shards": 2, "samples": 6}
        | {"source_fingerprint": "f", "files_sha256": "0" * 64, "changed": 0, "missing": 0}
        for r in (1, 2)
    ]
    return {
        "format_version": 1,
        "tool": "mfm-pipeline 0.1.0",
        "split": "train",
        "revision": 2,
        "num_samples": 12,
        "shards": shards,
        "classes": [{"index": 0, "wnid": "n01", "name": "a"}, {"index": 1, "wnid": "n02", "name": "b"}],
        "source": {"kind": "folder", "path": "/src", "fingerprint": "f"},
        "options": {"seed": 0},
        "rejected": [{"file": "x.png", "reason": "r"}],
        "revisions": revs,
        "next_shard": 4,
    }


# Where a hostile value goes: every field a reader or the grow path uses.
PATHS = [
    ("format_version",),
    ("split",),
    ("revision",),
    ("next_shard",),
    ("num_samples",),
    ("shards",),
    ("shards", 0),
    ("shards", 3, "name"),
    ("shards", 1, "index"),
    ("shards", 2, "samples"),
    ("shards", 0, "bytes"),
    ("shards", 0, "sha256"),
    ("classes",),
    ("classes", 1),
    ("classes", 0, "index"),
    ("classes", 1, "wnid"),
    ("source",),
    ("source", "fingerprint"),
    ("options",),
    ("rejected",),
    ("rejected", 0),
    ("rejected", 0, "file"),
    ("revisions",),
    ("revisions", 1),
    ("revisions", 0, "revision"),
    ("revisions", 1, "revision"),
    ("revisions", 1, "first_shard"),
    ("revisions", 1, "shards"),
    ("revisions", 0, "rebuild"),
    ("revisions", 1, "files_sha256"),
]


def mutated(path: tuple, value, delete: bool) -> dict:
    m = a_manifest()
    node = m
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return m


def shard_number(name: str) -> int | None:
    stem = name.removesuffix(".tar")
    head, _, num = stem.rpartition("-")
    return int(num) if name.endswith(".tar") and head and num.isdigit() and len(num) <= 18 else None


def assert_usable(m: dict) -> None:
    """What readers and the grow path rely on in a manifest check_manifest accepted."""
    for s in m["shards"]:
        assert storage.plain_name(s["name"], "name") and type(s["samples"]) is int and s["samples"] >= 0
    taken = [n + 1 for s in m["shards"] if (n := shard_number(s["name"])) is not None]
    taken += [r["first_shard"] + r["shards"] for r in m.get("revisions", [])]
    if "next_shard" in m:
        assert type(m["next_shard"]) is int and m["next_shard"] >= max(taken, default=0)
    revs = [r["revision"] for r in m.get("revisions", [])]
    assert all(type(r) is int for r in revs) and revs == sorted(set(revs))
    if "revision" in m:
        assert type(m["revision"]) is int and m["revision"] >= 1 and (not revs or revs[-1] == m["revision"])


@FUZZ
@given(hs.sampled_from(PATHS), json_values, hs.booleans())
def test_a_hostile_manifest_field_is_refused_naming_it_or_usable(path, value, delete):
    url = "s3://bucket/shards/train/manifest.json"
    raw = mf.dumps(mutated(path, value, delete))
    try:
        m = mf.check_written(mf.parse_manifest(raw, url), url)
    except mf.ManifestError as e:
        assert str(e).startswith(url + ": not a ")
        return
    assert_usable(m)


@FUZZ
@given(hs.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_manifest_bytes_are_refused_or_usable(raw):
    try:
        assert_usable(mf.parse_manifest(raw, "m.json"))
    except mf.ManifestError as e:
        assert str(e).startswith("m.json: not a valid manifest")


# --- the grow path with a hostile manifest: no committed shard is touched ------------------------


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A split sharded from a source that has grown since: (source, dest template)."""
    from test_sharding_growth import grow

    from pipeline import sample_data
    from pipeline.sharding import shard_dataset

    root = tmp_path_factory.mktemp("grown")
    sample = sample_data.build(str(root / "sample"), per_class=4, size=24)
    src, dest = str(root / "src"), str(root / "dest")
    shutil.copytree(sample["folder"], src)
    assert len(shard_dataset(src, dest, splits="train", shard_size_mb=0.01)["train"]["shards"]) > 2
    grow(src)
    return src, dest


def tree(root: str) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


@FEW
@given(hs.sampled_from([p for p in PATHS if p[0] in ("next_shard", "revision", "revisions", "shards")]), json_values)
def test_a_grow_under_a_hostile_manifest_never_touches_committed_shards(grown, path, value):
    from pipeline.sharding import ShardingError, SourceError, shard_dataset

    src, template = grown
    with tempfile.TemporaryDirectory() as box:
        dest = os.path.join(box, "dest")
        shutil.copytree(template, dest)
        manifest = os.path.join(dest, "train", "manifest.json")
        m = json.loads(open(manifest).read())
        node = m
        for k in path[:-1]:
            node = node[k] if isinstance(node, dict) or k < len(node) else node[-1]
        if isinstance(node, dict) or (isinstance(node, list) and path[-1] < len(node)):
            node[path[-1]] = value
        open(manifest, "w").write(json.dumps(m))
        before = {p: b for p, b in tree(dest).items() if p.endswith((".tar", ".idx"))}
        try:
            shard_dataset(src, dest, splits="train", shard_size_mb=0.01)
        except (mf.ManifestError, ShardingError, SourceError) as e:
            assert "train" in str(e)
        after = tree(dest)
        assert {p: after.get(p) for p in before} == before  # committed shards: never overwritten or removed
        assert os.listdir(box) == ["dest"]  # nothing written beside the destination


# --- revision file lists and claims --------------------------------------------------------------

rows = hs.lists(
    hs.tuples(
        hs.text(
            hs.characters(
                blacklist_categories=["Cs"], blacklist_characters="\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
            ),
            min_size=1,
            max_size=12,
        ),
        hs.integers(0, 2**40),
        hs.text(hs.sampled_from("abc_-019"), max_size=6),
    ),
    max_size=8,
    unique_by=lambda r: r[0],
)


@FUZZ
@given(rows)
def test_file_lists_round_trip(rows):
    assert rv.decode_files(rv.encode_files(rows), "f") == {f: (s, k) for f, s, k in rows}


@FUZZ
@given(hs.binary(max_size=200) | hs.binary(max_size=200).map(lambda b: gzip.compress(b, mtime=0)))
def test_file_list_bytes_are_refused_or_decoded(data):
    try:
        got = rv.decode_files(data, "revisions/000001.files.tsv.gz")
    except mf.ManifestError as e:
        assert str(e).startswith("revisions/000001.files.tsv.gz: not a file list")
        return
    assert all(isinstance(f, str) and type(s) is int and isinstance(k, str) for f, (s, k) in got.items())


@FUZZ
@given(hs.binary(max_size=100) | json_values.map(lambda v: json.dumps({"owner": "o", "digest": "d", "heartbeat": v})))
def test_a_claim_is_read_as_held_for_a_while_or_dead(raw):
    held, age = rv._held(raw.encode() if isinstance(raw, str) else raw)
    assert isinstance(held, dict) and (age == float("inf") or age >= -rv.CLAIM_SKEW_S)


# --- .idx rows: a hostile index is never read as samples ----------------------------------------


@pytest.fixture(scope="module")
def indexed_shard(tmp_path_factory):
    from test_data_shards import write_split

    from pipeline.data.shards import read_samples, read_split

    url = str(tmp_path_factory.mktemp("idx") / "train")
    write_split(url, [5], size=8)
    shard = read_split(url).shards[0]
    truth = read_samples(shard, range(5))
    return shard, open(shard.index_url, "rb").read(), truth


index_edits = hs.one_of(
    hs.binary(max_size=200),
    hs.tuples(
        hs.integers(0, 6), hs.integers(0, 12), hs.sampled_from(["0", "-1", "512", "1" + "0" * 19, "x", "", "9" * 30])
    ),
    hs.lists(hs.integers(0, 6), min_size=1, max_size=7),
)


def edit_index(text: bytes, edit) -> bytes:
    if isinstance(edit, bytes):
        return edit
    lines = text.decode().splitlines()
    if isinstance(edit, list):  # rows reordered, dropped or repeated
        return "\n".join([lines[0]] + [lines[1 + i % (len(lines) - 1)] for i in edit]).encode()
    row, field, value = edit  # one field of one row replaced
    fields = lines[row % len(lines)].split()
    fields[field % len(fields)] = value
    lines[row % len(lines)] = " ".join(fields)
    return "\n".join(lines).encode()


@FUZZ
@given(index_edits)
def test_a_hostile_index_reads_the_right_samples_or_is_scanned(indexed_shard, edit):
    from pipeline.data.shards import read_samples

    shard, text, truth = indexed_shard
    with tempfile.TemporaryDirectory() as d:
        idx = os.path.join(d, "train-000000.idx")
        open(idx, "wb").write(edit_index(text, edit))
        hostile = shard.__class__(shard.name, shard.url, shard.samples, shard.nbytes, idx)
        assert read_samples(hostile, range(5)) == truth


# --- registry manifests, aliases and cards -------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from test_registry_cache import tiny_export

    from pipeline.registry import Registry

    root = tmp_path_factory.mktemp("reg")
    reg = Registry(str(root / "registry"))
    reg.register("m", tiny_export(str(root / "export"), 1)[0], aliases=("prod",))
    return reg


def registry_manifest_edits():
    keys = ["format_version", "files", "metrics", "model", "lineage", "name", "version"]
    file_keys = ["model.safetensors", "config.json", "README.md"]
    names = hs.sampled_from(["../x", "a/b", "", ".", "manifest.json", ".claim", "x" * 300, "a\nb", "ok.txt", "C:x"])
    return hs.one_of(
        hs.tuples(hs.just("top"), hs.sampled_from(keys), json_values),
        hs.tuples(hs.just("file"), hs.sampled_from(file_keys), json_values),
        hs.tuples(hs.just("entry"), hs.sampled_from(file_keys), hs.sampled_from(["sha256", "size"]), json_values),
        hs.tuples(hs.just("name"), names, hs.integers(0, 10)),
    )


@FEW
@given(registry_manifest_edits())
def test_a_hostile_registry_manifest_is_refused_or_fills_the_cache_inside_it(registry, edit):
    from pipeline.registry import IntegrityError, RegistryError, cache

    good = storage.read_bytes(storage.join(registry.version_url("m", 1), "manifest.json"))
    m = json.loads(good)
    if edit[0] == "top":
        m[edit[1]] = edit[2]
    elif edit[0] == "file":
        m["files"][edit[1]] = edit[2]
    elif edit[0] == "entry":
        m["files"][edit[1]][edit[2]] = edit[3]
    else:
        m["files"][edit[1]] = {"sha256": "0" * 64, "size": edit[2]}
    url = storage.join(registry.version_url("m", 1), "manifest.json")
    storage.write_bytes(url, json.dumps(m).encode())
    try:
        with tempfile.TemporaryDirectory() as box:
            root = os.path.join(box, "cache")
            try:
                ref, entry = cache.cached_version(registry, "m@v1", root=Path(root))
                assert str(entry).startswith(root) and ref.version == 1
            except (RegistryError, IntegrityError) as e:
                assert "m" in str(e)
            assert os.listdir(box) in ([], ["cache"])
    finally:
        storage.write_bytes(url, good)


@FUZZ
@given(hs.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()))
def test_a_hostile_alias_is_refused_or_names_a_version(registry, raw):
    from pipeline.registry import RegistryError

    url = registry.alias_url("m", "prod")
    good = storage.read_bytes(url)
    storage.write_bytes(url, raw)
    try:
        ref = registry.resolve("m@prod")
        assert type(ref.version) is int and ref.version >= 1
    except RegistryError as e:
        assert "prod" in str(e)
    finally:
        storage.write_bytes(url, good)


@FUZZ
@given(hs.dictionaries(hs.sampled_from(["architecture", "model_args", "num_classes", "num_features"]), json_values))
def test_a_model_card_renders_any_config(config):
    from pipeline.registry.card import model_card

    lineage = {"run_url": "s3://b/run", "export_url": "s3://b/run/export", "code": {"package": "mfm-pipeline"}}
    card = model_card("m", 3, config, lineage, {"top1": 0.5})
    assert card.startswith("# m v3\n") and "## Metrics" in card


# --- ImageNet label files ---------------------------------------------------------------------------

tokens = hs.text(hs.sampled_from("n0123456789_-aZ"), min_size=1, max_size=12)


@FUZZ
@given(hs.dictionaries(tokens, tokens, max_size=6), hs.sampled_from(["\n", "\r\n"]))
def test_loc_val_solution_rows_are_read_right(labels, newline):
    text = "ImageId,PredictionString" + newline
    text += "".join(f"{image},{wnid} 1 2 30 40 {wnid} 5 6 7 8 {newline}" for image, wnid in labels.items())
    assert sources.parse_loc_val(text.encode(), "LOC_val_solution.csv") == labels


@FUZZ
@given(hs.dictionaries(tokens, hs.text(hs.characters(blacklist_categories=["Cs", "Cc", "Zl", "Zp"]), max_size=20)))
def test_synset_mappings_are_read_right(names):
    text = "".join(f"{w} {n}\n" for w, n in names.items())
    got = sources.parse_synsets(text.encode(), "LOC_synset_mapping.txt")
    assert got == {w: n.strip() or w for w, n in names.items()}


label_bytes = hs.binary(max_size=300) | hs.text(
    hs.sampled_from('ImageId,PredictionString n0123456789_ \n\r",\x00\t'), max_size=200
).map(str.encode)


@FUZZ
@given(label_bytes)
def test_label_files_are_refused_naming_them_or_read(data):
    for parse, name in ((sources.parse_loc_val, "LOC_val_solution.csv"), (sources.parse_synsets, "synsets.txt")):
        try:
            got = parse(data, name)
        except sources.SourceError as e:
            assert str(e).startswith(name + ":")
            continue
        assert all(isinstance(k, str) and k and isinstance(v, str) for k, v in got.items())
    ids = {i: (f"n{i:08d}", "words") for i in range(1, 11)}
    try:
        got = sources.parse_devkit_gt(data, ids, "gt.txt")
    except sources.SourceError as e:
        assert str(e).startswith("gt.txt:")
    else:
        assert set(got.values()) <= {w for w, _ in ids.values()}


def test_the_fuzz_settings_stay_small_for_ci():
    assert FUZZ.max_examples <= 100 and FEW.max_examples <= 20 and FUZZ.deadline is not None


def _tar(fmt: int, members: list[tuple[str, str, bytes]]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for kind, name, data in members:
            info = tarfile.TarInfo(name)
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "link": tarfile.SYMTYPE}[kind]
            info.size = len(data) if kind == "file" else 0
            info.linkname = "target" if kind == "link" else ""
            try:
                tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
            except ValueError:  # a name the format cannot hold (ustar, over 100 characters unsplit)
                continue
    return buf.getvalue()


member_names = hs.sampled_from(["s0.jpg", "s0.cls", "s1.jpg", "d/s1.cls", "s2.jpg", "é.jpg", "a" * 120 + ".jpg"])
tar_members = hs.lists(
    hs.tuples(hs.sampled_from(["file", "file", "file", "dir", "link"]), member_names, hs.binary(max_size=700)),
    max_size=6,
)
tar_edits = hs.lists(hs.tuples(hs.integers(0, 10**6), hs.integers(0, 255)), max_size=4)


def _scanned(data: bytes, plain_headers: bool, memory: bool):
    """What shards._scan makes of a tar: its samples, or the type of error it raised."""
    import io
    from unittest import mock

    from pipeline.data import shards

    parse = shards._plain_member if plain_headers else (lambda h, tar: None)  # None: tarfile reads each header
    if memory:  # the download in memory that a remote shard's parser follows
        sink = shards._Sink()
        sink.begin(0)
        sink.write(data)
        sink.finish()
        f = shards._SinkFile(sink, 0)
    else:
        f = io.BytesIO(data)
    try:
        with mock.patch.object(shards, "_plain_member", parse):
            return list(shards._scan(f, shards._TarCursor(), range(100)))
    except shards.TransientStorageError as e:
        return type(e)


@FUZZ
@given(hs.sampled_from([0, 1, 2]), tar_members, tar_edits, hs.integers(0, 4000), hs.booleans())
def test_tar_headers_read_here_as_tarfile_reads_them(fmt, members, edits, cut, memory):
    """The plain-header path of the tar parser (shards._plain_member) gives the samples tarfile alone
    gives, or the same error, on tars of every format with any bytes changed or cut off."""
    import tarfile

    data = bytearray(_tar([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT][fmt], members))
    for at, value in edits:
        data[at % len(data)] = value
    data = bytes(data[: max(512, len(data) - cut)])
    assert _scanned(data, True, memory) == _scanned(data, False, memory)
