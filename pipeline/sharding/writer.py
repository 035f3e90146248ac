"""Write one planned shard: read its sources, check each image, commit tar, index, sidecar.

A shard is committed in three atomic writes: the tar, its `.idx`, then a small sidecar
`_work/<shard>.json` recording the plan digest and the tar's size and sha256. The sidecar is
the shard's commit record: a rerun reuses a shard whose sidecar matches its plan and whose
tar has the recorded size, and rewrites anything else (the same bytes, by construction).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.jpeg import MAX_PIXELS
from pipeline.sharding.images import checked_images
from pipeline.sharding.plan import ShardPlan
from pipeline.sharding.tarfmt import TarWriter

WORK_DIR = "_work"


@dataclass
class ShardResult:
    name: str
    index: str
    plan: str
    samples: int
    bytes: int
    sha256: str
    rejected: list[dict] = field(default_factory=list)
    reencoded: int = 0
    reused: bool = False


@dataclass(frozen=True)
class WriteOptions:
    validation: str = "structural"
    max_side: int | None = None
    threads: int = 1  # decoding threads (decode validation); no effect on the bytes written
    max_pixels: int | None = MAX_PIXELS  # header pixel-count limit (None: none)


def sidecar_url(split_url: str, shard_name: str) -> str:
    return storage.join(split_url, WORK_DIR, shard_name.replace(".tar", ".json"))


def committed(plan: ShardPlan, split_url: str, cfg: StorageConfig | None) -> ShardResult | None:
    """The recorded result when this exact shard is already committed, else None."""
    side = sidecar_url(split_url, plan.name)
    if not storage.exists(side, cfg):
        return None
    try:
        rec = ShardResult(**json.loads(storage.read_bytes(side, cfg)))
    except (ValueError, TypeError):
        return None  # a sidecar from another tool version: rewrite the shard
    if rec.plan != plan.digest:
        return None
    fs, path = storage.filesystem(storage.join(split_url, plan.name), cfg)
    try:
        size = storage.retry(lambda: fs.size(path), what=f"stat {path}")
    except FileNotFoundError:
        return None
    if size != rec.bytes or not storage.exists(storage.join(split_url, plan.index_name), cfg):
        return None
    rec.reused = True
    return rec


# What json.dumps (ensure_ascii) leaves as it is inside quotes: printable ASCII except quote and backslash.
_PLAIN = re.compile(r"[ !#-\[\]-~]*")


def sample_json(file: str, wnid: str, cls: int, width: int, height: int) -> bytes:
    """json.dumps of the sample's metadata, byte for byte, without the encoder's per-call setup."""
    return _json_head(file) + _json_tail(wnid, cls) % (width, height)


def _json_head(file: str) -> bytes:
    if _PLAIN.fullmatch(file):
        return f'{{"file": "{file}"'.encode()
    return f'{{"file": {json.dumps(file)}'.encode()


def _json_tail(wnid: str, cls: int) -> bytes:
    # A format filled per image with (width, height): the wnid's own '%' are escaped.
    return f', "wnid": {json.dumps(wnid).replace("%", "%%")}, "class": {cls}, "width": %d, "height": %d}}'.encode()


def write_samples(
    plan: ShardPlan,
    fileobj,
    class_of: dict[str, int],
    opts: WriteOptions,
    sync: bool = False,
    cfg: StorageConfig | None = None,
) -> tuple[TarWriter, list[dict], int]:
    """Fill one tar from the plan's sources; bad images are listed, never raised.

    sync: fileobj is a file to be fsynced: start writing it to disk while the shard is built.
    cfg: the storage of sources on object storage."""
    rejected, reencoded = [], 0
    per_class: dict[str, tuple[bytes, bytes]] = {}  # wnid -> (.cls bytes, .json tail format)
    with TarWriter(fileobj, sync=sync) as tw:
        for e, data, size, reenc in checked_images(
            plan.entries, opts.validation, opts.max_side, opts.threads, opts.max_pixels, cfg
        ):
            if data is None:
                rejected.append({"file": e.file, "reason": size})
                continue
            reencoded += reenc
            wnid = e.wnid
            pc = per_class.get(wnid)
            if pc is None:
                cls = class_of[wnid]
                pc = per_class[wnid] = (str(cls).encode(), _json_tail(wnid, cls))
            tw.add_image(e.key, pc[0], data, _json_head(e.file) + pc[1] % size)
    return tw, rejected, reencoded


def write_shard(
    plan: ShardPlan,
    split_url: str,
    class_of: dict[str, int],
    opts: WriteOptions,
    cfg: StorageConfig | None = None,
    tmp_dir: str | None = None,
) -> ShardResult:
    """Commit one shard (or reuse it when already committed); runs in a worker process.
    tmp_dir: where a shard for object storage is built (default: the system's)."""
    done = committed(plan, split_url, cfg)
    if done is not None:
        return done
    tar_url = storage.join(split_url, plan.name)
    if storage.is_local(tar_url):
        with storage.atomic_open(tar_url, cfg) as f:
            tw, rejected, reencoded = write_samples(plan, f, class_of, opts, sync=True, cfg=cfg)
    else:
        # Build locally, then upload with retries: an interrupted upload is redone from the
        # finished file instead of re-reading and re-encoding every image.
        with tempfile.TemporaryDirectory(prefix="mfm-shard-", dir=tmp_dir) as tmp:
            local = os.path.join(tmp, plan.name)
            with open(local, "wb") as f:
                tw, rejected, reencoded = write_samples(plan, f, class_of, opts, cfg=cfg)
            _upload(local, tar_url, cfg)
    storage.write_bytes(storage.join(split_url, plan.index_name), tw.index(), cfg)
    result = ShardResult(
        plan.name, plan.index_name, plan.digest, len(tw.index_rows), tw.pos, tw.sha.hexdigest(), rejected, reencoded
    )
    storage.write_bytes(sidecar_url(split_url, plan.name), json.dumps(asdict(result), indent=1).encode(), cfg)
    return result


def _upload(local: str, url: str, cfg: StorageConfig | None) -> None:
    def put():
        with open(local, "rb") as src, storage.atomic_open(url, cfg) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    storage.retry(put, attempts=(cfg or StorageConfig()).retries, what=f"upload {url}")
