"""Sources: the official ILSVRC2012 archives, Kaggle's ImageNet download, or an ImageFolder tree,
listed cheaply.

Listing yields one `Entry` per image with where its bytes live: a file, or a byte range
inside ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar. The archives are read as
streams (tarfile 'r|'), nested per-class tars included, and never extracted: the listing
records each member's offset, and workers later read just that range. Kaggle's layout
(`ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG`, `val/*.JPEG` labelled by `LOC_val_solution.csv`)
is read as files. Class indices are the sorted wnids (torchvision's ImageNet labels).

A source may sit on storage others write, so listing reads only what it can trust: real
folders and regular files (regular members inside the archives). Links, FIFOs, devices and
names that are not UTF-8 are never opened; each is listed in `rejected` with the reason.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import stat
import tarfile
from dataclasses import dataclass, field
from typing import NamedTuple

from pipeline import storage as st
from pipeline.sharding.kinds import NOT_UTF8, entry_kind, member_kind, not_read, shown, utf8

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
LOC_VAL = "LOC_val_solution.csv"
LOC_SYNSETS = "LOC_synset_mapping.txt"
DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_TGZ = "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_DATA = os.path.join("ILSVRC", "Data", "CLS-LOC")  # under the folder holding LOC_*.csv
METADATA_MAX_BYTES = 64 << 20  # a label or synset file (LOC_val_solution.csv: 2.5 MB)
IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


CONTROL = "name has control characters (a tab or newline would break the revision file lists)"


def plain(name: str) -> bool:
    return not any(ord(c) < 32 or ord(c) == 127 for c in name)


class SourceError(ValueError):
    """The source is not one we can read; the message names the path."""


class Entry(NamedTuple):  # a tuple, not a frozen dataclass: built twice per image while listing
    key: str  # stable sample key (file stem, made unique and dot-free)
    file: str  # original name, relative to the source
    wnid: str
    size: int
    path: str  # file holding the bytes
    offset: int | None = None  # byte offset inside `path` for archive members


@dataclass
class Listing:
    kind: str  # "ilsvrc-tar" | "folder"
    path: str
    split: str
    entries: list[Entry]
    classes: list[dict]  # [{"index", "wnid", "name"}], index = position in sorted wnids
    fingerprint: str = ""
    rejected: list[dict] = field(default_factory=list)  # found while listing (e.g. unlabelled)


def detect(source: str) -> str:
    """'ilsvrc-tar', 'ilsvrc-kaggle' or 'folder'; anything else is a SourceError naming the path."""
    if not os.path.isdir(source):
        raise SourceError(
            f"{source}: source must be a directory holding {TRAIN_TAR}/{VAL_TAR}, Kaggle's {KAGGLE_DATA}, "
            "or <split>/<class>/<image>"
        )
    names = set(os.listdir(source))
    if TRAIN_TAR in names or VAL_TAR in names:
        return "ilsvrc-tar"
    if _real_dir(source, KAGGLE_DATA):
        return "ilsvrc-kaggle"
    if _folder_splits(source):
        return "folder"
    raise SourceError(
        f"{source}: not a recognised dataset: expected {TRAIN_TAR} and/or {VAL_TAR} (official ILSVRC2012 archives), "
        f"Kaggle's ImageNet ({KAGGLE_DATA}/<split>, {LOC_VAL} beside ILSVRC/), "
        "or an ImageFolder tree <split>/<class>/<image>"
    )


def available_splits(source: str) -> list[str]:
    kind = detect(source)
    if kind == "folder":
        return _folder_splits(source)
    if kind == "ilsvrc-kaggle":  # test/ has no labels
        return [s for s in ("train", "val") if _real_dir(source, KAGGLE_DATA, s)]
    return [s for s, name in (("train", TRAIN_TAR), ("val", VAL_TAR)) if os.path.exists(os.path.join(source, name))]


def list_split(source: str, split: str) -> Listing:
    """Every image of the split. A split with nothing to shard is a SourceError that says what
    was found instead (files outside class folders, files without a label, rejected entries)."""
    kind = detect(source)
    lister = {"ilsvrc-tar": _list_ilsvrc, "ilsvrc-kaggle": _list_kaggle, "folder": _list_folder}[kind]
    listing = lister(source, split)
    listing.entries = assign_keys(listing.entries)
    listing.fingerprint = fingerprint(listing.entries)
    return listing


def _nothing_to_shard(where: str, split: str, rejected: list[dict], found: str = "") -> SourceError:
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    seen = [found] if found else []
    seen += [f"{n} {'entry' if n == 1 else 'entries'} rejected ({reason})" for reason, n in reasons.items()]
    return SourceError(
        f"{where}: split {split!r} has no images to shard; found {'; '.join(seen) or 'nothing'}"
        + (f" (e.g. {', '.join(r['file'] for r in rejected[:3])})" if rejected else "")
    )


def _real_dir(*parts: str) -> bool:
    """Whether every folder along the joined path is a real folder (no link on the way)."""
    path = parts[0]
    for part in os.path.join(*parts[1:]).split(os.sep) if len(parts) > 1 else []:
        path = os.path.join(path, part)
        if os.path.islink(path) or not os.path.isdir(path):
            return False
    return os.path.isdir(path)


def fingerprint(entries: list[Entry]) -> str:
    return hashlib.sha256(
        "".join(f"{name}\t{size}\n" for name, size in sorted((e.file, e.size) for e in entries)).encode()
    ).hexdigest()


_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]")


def assign_keys(entries: list[Entry]) -> list[Entry]:
    """Keys are file stems without dots (webdataset splits names at the first dot); where
    stems collide (ImageFolder sets often reuse 0001.jpg per class) the class is prefixed."""
    sub = _NOT_KEY.sub
    stems = []
    for e in entries:
        base = e.file.rpartition("/")[2]
        stems.append(sub("_", base.rpartition(".")[0] if "." in base else base))
    if len(set(stems)) == len(stems):  # no collisions (ImageNet): no order to settle them in
        return [Entry._make((s, *e[1:])) for e, s in zip(entries, stems)]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out, seen = [], set()
    for e, s in sorted(zip(entries, stems), key=lambda p: p[0].file):
        key = s if counts[s] == 1 else _NOT_KEY.sub("_", f"{e.wnid}_{s}")
        base, n = key, 1
        while key in seen:
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        out.append(Entry(key, e.file, e.wnid, e.size, e.path, e.offset))
    return out


def read_entry(e: Entry, handles: dict | None = None) -> bytes:
    """The source bytes of one entry; `handles` caches open archive files per worker."""
    if e.offset is None:
        # os.read with the listed size: no buffered file object per image (a third of the cost
        # of a small file); the loop still reads a file that grew since it was listed. Opened
        # without following a link or blocking on a FIFO, and checked to be a regular file: what
        # was listed may have been swapped since.
        fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{e.path}: not a regular file")
            data = os.read(fd, e.size + 1)
            if len(data) > e.size:  # the file grew since it was listed: read it to the end
                chunks = [data]
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                data = b"".join(chunks)
            return data
        finally:
            os.close(fd)
    if handles is None:
        with open(e.path, "rb") as f:
            f.seek(e.offset)
            return f.read(e.size)
    f = handles.get(e.path)
    if f is None:
        f = handles[e.path] = open(e.path, "rb")
    f.seek(e.offset)
    return f.read(e.size)


def class_table(wnids, names: dict[str, str] | None = None) -> list[dict]:
    names = names or {}
    return [{"index": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(sorted(set(wnids)))]


# --- ImageFolder ---------------------------------------------------------------------------


def _real_dirs(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted((d for d in it if d.is_dir(follow_symlinks=False)), key=lambda d: d.name)
    except OSError:
        return []


def _folder_splits(source: str) -> list[str]:
    return [d.name for d in _real_dirs(source) if not d.name.startswith(".") and _real_dirs(d.path)]


def _class_dirs(split_dir: str, rejected: list[dict] | None = None) -> list[str]:
    """The class folders of a split: real folders with UTF-8 names. Links (a loop included) and
    other entries that are not regular files go to `rejected`; regular files here are ignored."""
    out = []
    with os.scandir(split_dir) as it:
        for d in sorted(it, key=lambda d: d.name):
            if d.name.startswith("."):
                continue
            kind = entry_kind(d)
            if kind is None and d.is_dir(follow_symlinks=False):
                if utf8(d.name) and plain(d.name):
                    out.append(d.name)
                elif rejected is not None:
                    rejected.append({"file": shown(d.name), "reason": CONTROL if utf8(d.name) else NOT_UTF8})
            elif kind is not None and rejected is not None:
                rejected.append({"file": shown(d.name), "reason": not_read(kind)})
    return out


def _list_folder(source: str, split: str) -> Listing:
    root = os.path.join(source, split)
    if not os.path.isdir(root) or os.path.islink(root):
        raise SourceError(f"{root}: split {split!r} not found (have: {', '.join(_folder_splits(source)) or 'none'})")
    # Classes are the union over all splits, so train and val agree on indices.
    wnids = {c for s in _folder_splits(source) for c in _class_dirs(os.path.join(source, s))}
    rejected: list[dict] = []
    entries = _tree_entries(root, rejected)
    if not entries:
        loose = _loose_images(root)
        found = (
            f"{len(loose)} image files directly in {root} (e.g. {', '.join(loose[:3])}) and no class folders "
            f"holding images: an ImageFolder split is <split>/<class>/<image>; for Kaggle's ImageNet, whose "
            f"val images are flat, point the source at the folder holding ILSVRC/ and {LOC_VAL}"
            if loose
            else ""
        )
        raise _nothing_to_shard(root, split, rejected, found)
    return Listing("folder", source, split, entries, class_table(wnids, _synset_names(source)), rejected=rejected)


def _tree_entries(root: str, rejected: list[dict], labels: dict[str, str] | None = None, label_file: str = ""):
    """Entries of `<root>/<class>/**/<image>` (the class from the folder) and, given `labels`
    (file stem -> wnid, from `label_file`), of the images directly in `root`."""
    entries = []
    for cls in _class_dirs(root, rejected):
        for f, kind in _walk_files(os.path.join(root, cls)):
            if f.name.startswith("."):
                continue
            rel = f.path[len(root) + 1 :]
            if kind is not None:
                rejected.append({"file": shown(rel), "reason": kind if kind == NOT_UTF8 else not_read(kind)})
            elif not plain(rel):
                rejected.append({"file": rel, "reason": CONTROL})
            elif not _is_image(f.name):
                rejected.append({"file": rel, "reason": "not an image file extension"})
            else:
                entries.append(Entry("", rel, cls, f.stat(follow_symlinks=False).st_size, f.path))
    if labels is not None:
        for f in _loose_files(root, rejected):
            stem = f.name.rpartition(".")[0]
            if not _is_image(f.name):
                rejected.append({"file": f.name, "reason": "not an image file extension"})
            elif stem not in labels:
                rejected.append({"file": f.name, "reason": f"no label in {label_file}"})
            else:
                entries.append(Entry("", f.name, labels[stem], f.stat(follow_symlinks=False).st_size, f.path))
    return entries


def _is_image(name: str) -> bool:
    dot = name.rfind(".")  # os.path.splitext for a name without leading dots
    return (name[dot:].lower() if dot > 0 else "") in IMAGE_EXTS


def _loose_files(root: str, rejected: list[dict] | None = None) -> list[os.DirEntry]:
    """The regular files directly in `root` with UTF-8 names (others go to `rejected`; links and
    special files there are reported by _class_dirs)."""
    out = []
    with os.scandir(root) as it:
        for d in sorted(it, key=lambda d: d.name):
            if d.name.startswith(".") or not d.is_file(follow_symlinks=False):
                continue
            if utf8(d.name) and plain(d.name):
                out.append(d)
            elif rejected is not None:
                rejected.append({"file": shown(d.name), "reason": CONTROL if utf8(d.name) else NOT_UTF8})
    return out


def _loose_images(root: str) -> list[str]:
    return [d.name for d in _loose_files(root) if _is_image(d.name)]


def _walk_files(top: str):
    """(DirEntry, None) for the regular files under `top` in os.walk's order (sorted, files
    before subfolders), and (DirEntry, what it is) for everything that is not read: links,
    FIFOs, devices, names that are not UTF-8, unreadable folders. One stat per file."""
    files, dirs = [], []
    try:
        with os.scandir(top) as it:
            for d in it:  # the common cases from d_type alone, without a system call
                if not (d.name.isascii() or utf8(d.name)):
                    files.append((d, NOT_UTF8))
                elif d.is_file(follow_symlinks=False):
                    files.append((d, None))
                elif d.is_dir(follow_symlinks=False):
                    dirs.append((d, None))
                else:
                    files.append((d, entry_kind(d)))
    except OSError as e:
        yield _Unreadable(top), f"unreadable folder ({e.strerror})"
        return
    files.sort(key=lambda p: p[0].name)
    yield from files
    for d, _ in sorted(dirs, key=lambda p: p[0].name):
        yield from _walk_files(d.path)


class _Unreadable(NamedTuple):
    path: str

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


# --- ILSVRC2012 archives ---------------------------------------------------------------------


def _list_ilsvrc(source: str, split: str) -> Listing:
    if split not in ("train", "val"):
        raise SourceError(f"{source}: the ILSVRC2012 archives hold splits train and val, not {split!r}")
    tar_path = os.path.join(source, TRAIN_TAR if split == "train" else VAL_TAR)
    if not os.path.exists(tar_path):
        raise SourceError(f"{tar_path}: not found (needed for split {split!r})")
    if not stat.S_ISREG(os.stat(tar_path).st_mode):  # a link to the archive is fine, a FIFO is not
        raise SourceError(f"{tar_path}: not a regular file")
    names = _synset_names(source)
    rejected: list[dict] = []
    try:
        if split == "train":
            entries = list(_stream_train_tar(tar_path, rejected))
            wnids = names.keys() or {e.wnid for e in entries}
            return Listing("ilsvrc-tar", source, split, entries, class_table(wnids, names), rejected=rejected)
        labels = _val_labels(source)
        entries = []
        for name, offset, size in _stream_members(tar_path, rejected):
            stem = os.path.splitext(os.path.basename(name))[0]
            if stem not in labels:
                rejected.append({"file": name, "reason": "no label in the validation ground truth"})
                continue
            entries.append(Entry("", name, labels[stem], size, tar_path, offset))
    except (tarfile.TarError, EOFError) as e:
        raise SourceError(f"{tar_path}: not a readable tar archive (truncated or damaged?): {e}") from None
    if not entries:
        raise _nothing_to_shard(tar_path, split, rejected)
    wnids = names.keys() or set(labels.values())
    return Listing("ilsvrc-tar", source, split, entries, class_table(wnids, names), rejected=rejected)


# --- Kaggle's ImageNet (imagenet-object-localization-challenge) ------------------------------------


def _list_kaggle(source: str, split: str) -> Listing:
    """`ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG` and `val/*.JPEG` (flat, labelled by
    LOC_val_solution.csv beside ILSVRC/; class folders there are read as folders too). The
    class table is LOC_synset_mapping.txt's wnids, else those seen in train and the labels."""
    if split not in ("train", "val"):
        raise SourceError(f"{source}: Kaggle's ImageNet has labelled splits train and val, not {split!r}")
    base = os.path.join(source, KAGGLE_DATA)
    root = os.path.join(base, split)
    if not _real_dir(source, KAGGLE_DATA, split):
        raise SourceError(f"{root}: split {split!r} not found (or a link)")
    names = _synset_names(source)
    labels = _val_labels(source) if split == "val" else None
    rejected: list[dict] = []
    entries = _tree_entries(root, rejected, labels, LOC_VAL)
    if not entries:
        raise _nothing_to_shard(root, split, rejected)
    wnids = set(names)
    if not wnids:
        for s in ("train", "val"):
            if _real_dir(base, s):
                wnids |= set(_class_dirs(os.path.join(base, s)))
        if _metadata(os.path.join(source, LOC_VAL)):
            wnids |= set((labels or _val_labels(source)).values())
    return Listing("ilsvrc-kaggle", source, split, entries, class_table(wnids, names), rejected=rejected)


def _regular(members, rejected: list[dict], prefix: str = ""):
    """The regular members with UTF-8 names; folders skipped; anything else listed in `rejected`."""
    for m in members:
        if m.isdir():
            continue
        if not utf8(m.name):
            rejected.append({"file": shown(prefix + m.name), "reason": NOT_UTF8})
        elif not plain(m.name):
            rejected.append({"file": prefix + m.name, "reason": CONTROL})
        elif not m.isfile():
            rejected.append({"file": prefix + m.name, "reason": f"{member_kind(m)}; only regular members are read"})
        else:
            yield m


def _stream_members(tar_path: str, rejected: list[dict]):
    """(name, data offset, size) of every regular member, one sequential pass."""
    with open(tar_path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
        for m in _regular(tf, rejected):
            yield m.name, m.offset_data, m.size


def _stream_train_tar(tar_path: str, rejected: list[dict]):
    with open(tar_path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as outer:
        for m in _regular(outer, rejected):
            if not m.name.endswith(".tar"):
                raise SourceError(f"{tar_path}: member {m.name!r} is not a per-class tar (n*.tar)")
            wnid = os.path.basename(m.name)[: -len(".tar")]
            try:
                with tarfile.open(fileobj=outer.extractfile(m), mode="r|") as inner:
                    for im in _regular(inner, rejected, f"{wnid}/"):
                        yield Entry("", f"{wnid}/{im.name}", wnid, im.size, tar_path, m.offset_data + im.offset_data)
            except (tarfile.TarError, EOFError) as e:
                raise SourceError(f"{tar_path}: member {m.name}: not a readable tar: {e}") from None


def _metadata(path: str) -> bool:
    """Whether a label or synset file is there; one that is there but not a regular file (a FIFO
    would hang the listing) is a SourceError. A link to a regular file is fine."""
    if not os.path.exists(path):
        return False
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise SourceError(f"{path}: not a regular file")
    return True


def _read_metadata(path: str) -> bytes:
    """A label or synset file's bytes (a SourceError past METADATA_MAX_BYTES)."""
    try:
        return st.read_capped(path, max_bytes=METADATA_MAX_BYTES)
    except st.UnsafeFile as e:
        raise SourceError(f"{e}; not a label file") from None


_LABEL = re.compile(r"[A-Za-z0-9_-]+")  # a wnid (n01440764) or a file stem (ILSVRC2012_val_00000001)


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{where}: not UTF-8 text: {e}") from None


def parse_loc_val(data: bytes, where: str) -> dict[str, str]:
    """Pure: image stem -> wnid from Kaggle's LOC_val_solution.csv (`ImageId,PredictionString`,
    the string's first token the wnid); a SourceError naming `where` and the line otherwise."""
    try:
        reader = csv.DictReader(io.StringIO(_text(data, where), newline=""))
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise SourceError(f"{where}: expected columns ImageId,PredictionString, got {reader.fieldnames}")
        out: dict[str, str] = {}
        for row in reader:
            line = reader.line_num
            image, pred = row.get("ImageId"), row.get("PredictionString")
            wnid = pred.split()[0] if isinstance(pred, str) and pred.split() else None
            if not isinstance(image, str) or not _LABEL.fullmatch(image) or wnid is None or not _LABEL.fullmatch(wnid):
                raise SourceError(f"{where}: line {line}: expected ImageId,wnid ..., got {image!r}, {pred!r}")
            if out.setdefault(image, wnid) != wnid:
                raise SourceError(f"{where}: line {line}: {image} labelled twice ({out[image]}, {wnid})")
        return out
    except csv.Error as e:
        raise SourceError(f"{where}: not a CSV file: {e}") from None


def parse_synsets(data: bytes, where: str) -> dict[str, str]:
    """Pure: wnid -> name from LOC_synset_mapping.txt (`n01440764 tench, Tinca tinca` per line)."""
    out: dict[str, str] = {}
    for i, line in enumerate(_text(data, where).splitlines(), start=1):
        if not line.strip():
            continue
        wnid, *name = line.split(None, 1)
        if not _LABEL.fullmatch(wnid) or wnid in out:
            raise SourceError(f"{where}: line {i}: expected a new wnid and its name, got {line[:80]!r}")
        out[wnid] = name[0].strip() if name else wnid
    return out


def parse_devkit_gt(data: bytes, ids: dict[int, tuple[str, str]], where: str) -> dict[str, str]:
    """Pure: ILSVRC2012_val_<n> -> wnid from the devkit's ground truth (one ILSVRC2012_ID per
    line, for image n = the line number) and meta.mat's synsets (`ids`)."""
    out = {}
    for i, token in enumerate(_text(data, where).split(), start=1):
        if not (token.isascii() and token.isdigit() and len(token) < 6) or int(token) not in ids:
            raise SourceError(f"{where}: line {i}: {token[:20]!r} is not an ILSVRC2012_ID of meta.mat")
        out[f"ILSVRC2012_val_{i:08d}"] = ids[int(token)][0]
    return out


def _val_labels(source: str) -> dict[str, str]:
    """Validation file stem -> wnid, from the Kaggle CSV or the official devkit."""
    loc = os.path.join(source, LOC_VAL)
    if _metadata(loc):
        return parse_loc_val(_read_metadata(loc), loc)
    gt, meta = _devkit_files(source)
    if gt is None or meta is None:
        raise SourceError(
            f"{source}: no validation labels: put {LOC_VAL} (Kaggle) or the devkit ({DEVKIT_TGZ}, "
            f"or its data/{DEVKIT_GT} and data/meta.mat) next to {VAL_TAR}"
        )
    return parse_devkit_gt(gt, _devkit_synsets(meta), f"{source}: {DEVKIT_GT}")


def _devkit_files(source: str) -> tuple[bytes | None, bytes | None]:
    """(ground truth txt, meta.mat) from a devkit folder or tarball, or loose files."""
    want = {DEVKIT_GT: None, "meta.mat": None}
    for d in (source, os.path.join(source, "data"), os.path.join(source, "ILSVRC2012_devkit_t12", "data")):
        for name in want:
            p = os.path.join(d, name)
            if want[name] is None and _metadata(p):
                want[name] = _read_metadata(p)
    tgz = os.path.join(source, DEVKIT_TGZ)
    if None in want.values() and _metadata(tgz):
        with tarfile.open(tgz, "r|gz") as tf:
            for m in tf:
                base = os.path.basename(m.name)
                if m.isfile() and base in want and want[base] is None:
                    if m.size > METADATA_MAX_BYTES:
                        raise SourceError(f"{tgz}: {m.name} is larger than {METADATA_MAX_BYTES >> 20} MiB")
                    want[base] = tf.extractfile(m).read()
    return want[DEVKIT_GT], want["meta.mat"]


def _devkit_synsets(meta: bytes) -> dict[int, tuple[str, str]]:
    """ILSVRC2012_ID -> (wnid, words) for the 1000 leaf synsets of the devkit's meta.mat."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        out = {}
        for s in synsets:
            if int(s["num_children"]) == 0:
                out[int(s["ILSVRC2012_ID"])] = (str(s["WNID"]), str(s["words"]))
    except Exception as e:  # noqa: BLE001 - scipy's reader raises many kinds for a damaged file
        raise SourceError(f"meta.mat of the devkit: not the ILSVRC2012 synsets: {type(e).__name__}: {e}") from None
    return out


def _synset_names(source: str) -> dict[str, str]:
    """wnid -> human-readable name, where the source ships them."""
    p = os.path.join(source, LOC_SYNSETS)
    if _metadata(p):
        return parse_synsets(_read_metadata(p), p)
    if os.path.exists(os.path.join(source, TRAIN_TAR)) or os.path.exists(os.path.join(source, VAL_TAR)):
        _, meta = _devkit_files(source)
        if meta is not None:
            return {w: words for w, words in _devkit_synsets(meta).values()}
    return {}
