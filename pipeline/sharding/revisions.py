"""Growing a sharded split: what is new since the last revision, stable class indices and keys,
the list of files each revision holds, and the claim that keeps two writers apart.

A split grows by revisions (docs/architecture.md, "Growing a split"). Revision N+1 shards only
the files no earlier revision holds, under shard numbers after the last one, and commits a new
`manifest.json` listing every shard by compare-and-swap against the one it read. Before any
shard is written the writer claims the revision (`revisions/<N+1>.claim`, created only if
absent), so a second writer is refused instead of overwriting shards the first one writes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import time
import uuid
import zlib
from dataclasses import dataclass

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.sharding.sources import Entry
from pipeline.split_manifest import ManifestError

REVISIONS_DIR = "revisions"
# A claim whose writer has not reported progress for this long is taken to be dead and may be
# taken over; a live writer refreshes it after every shard (shards take seconds to minutes).
CLAIM_STALE_S = 30 * 60
# A heartbeat further ahead than this is no live writer's clock (hosts disagree by seconds):
# the claim is invalid and taken over, so an edited claim cannot block growing forever.
CLAIM_SKEW_S = 60
# A file list decompresses to about 6x its size (ImageNet's: 11.7 MB -> 65 MB); more than this
# is a bomb that would fill the memory.
MAX_EXPANSION, MIN_LIMIT = 100, 16 << 20
_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]")


def files_url(split_url: str, revision: int) -> str:
    """`revisions/<N>.files.tsv.gz`: file, size and key of every sample revision N added."""
    return st.join(split_url, REVISIONS_DIR, f"{revision:06d}.files.tsv.gz")


def claim_url(split_url: str, revision: int) -> str:
    return st.join(split_url, REVISIONS_DIR, f"{revision:06d}.claim")


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Growth:
    new: list[Entry]  # files no revision holds: sharded now
    changed: list[str]  # same name, other size: the sharded copy is kept (policy: until a rebuild)
    missing: list[str]  # sharded once, gone from the source: kept likewise


def diff(known: dict[str, tuple[int, str]], entries: list[Entry]) -> Growth:
    """Pure: the listing against file -> (size, key) of what the split already holds."""
    new, changed, seen = [], [], set()
    for e in entries:
        seen.add(e.file)
        old = known.get(e.file)
        if old is None:
            new.append(e)
        elif old[0] != e.size:
            changed.append(e.file)
    missing = sorted(f for f in known if f not in seen)
    return Growth(new, sorted(changed), missing)


def extend_classes(old: list[dict], current: list[dict]) -> list[dict]:
    """Old indices never move; classes seen for the first time get the next indices, in wnid order."""
    have = {c["wnid"] for c in old}
    nxt = 1 + max((c["index"] for c in old), default=-1)
    added = [
        {"index": nxt + i, "wnid": c["wnid"], "name": c["name"]}
        for i, c in enumerate(sorted((c for c in current if c["wnid"] not in have), key=lambda c: c["wnid"]))
    ]
    return [*old, *added]


def fresh_keys(new: list[Entry], taken: set[str]) -> list[Entry]:
    """New entries with keys no earlier sample has (a sample key names one sample in the split)."""
    out, taken = [], set(taken)
    for e in sorted(new, key=lambda e: e.file):
        key = e.key
        if key in taken:
            key = _NOT_KEY.sub("_", f"{e.wnid}_{e.key}")
        base, n = key, 1
        while key in taken:
            key, n = f"{base}_{n}", n + 1
        taken.add(key)
        out.append(e._replace(key=key))
    return out


def encode_files(rows: list[tuple[str, int, str]]) -> bytes:
    """file TAB size TAB key per line, sorted, gzip without a timestamp (same rows, same bytes).
    A rejected file has an empty key: it is known, so it is not retried until it changes."""
    text = "".join(f"{f}\t{s}\t{k}\n" for f, s, k in sorted(rows))
    return gzip.compress(text.encode(), mtime=0)


def decode_files(data: bytes, what: str) -> dict[str, tuple[int, str]]:
    """file -> (size, key) from `encode_files`' bytes; a ManifestError naming `what` for anything
    else, a list that would inflate past MAX_EXPANSION x its size included."""
    limit = max(MIN_LIMIT, MAX_EXPANSION * len(data))
    out = {}
    try:
        z = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing, one member (as encode_files writes)
        text = z.decompress(data, limit + 1)
        if len(text) > limit:
            raise ValueError(f"inflates to more than {limit} bytes ({len(data)} compressed)")
        if not z.eof or z.unused_data:
            raise ValueError("truncated, or bytes after the gzip stream")
        for line in text.decode().splitlines():
            f, s, k = line.split("\t")
            out[f] = (int(s), k)
    except (zlib.error, UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{what}: not a file list (file, size, key per line): {e}") from None
    return out


def plan_digest(plan_digests: list[str], extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for d in plan_digests:
        h.update(d.encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- storage


def known_files(split_url: str, manifest: dict, cfg: StorageConfig | None) -> dict[str, tuple[int, str]]:
    """file -> (size, key) of every sample the manifest's shards hold, from the revision file
    lists since the last rebuild, each checked against the sha256 the manifest records."""
    revs = manifest.get("revisions") or []
    start = max((i for i, r in enumerate(revs) if r.get("rebuild") or r["revision"] == 1), default=0)
    known: dict[str, tuple[int, str]] = {}
    for r in revs[start:]:
        url = files_url(split_url, int(r["revision"]))
        try:
            data = st.read_bytes(url, cfg)
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: missing; the manifest lists revision {r['revision']}") from None
        if hashlib.sha256(data).hexdigest() != r.get("files_sha256"):
            raise ValueError(f"{url}: sha256 differs from the manifest's files_sha256")
        known.update(decode_files(data, url))
    return known


class ClaimRefused(RuntimeError):
    """Another writer holds this revision."""


@dataclass
class Claim:
    url: str
    owner: str
    digest: str
    token: str | None = None

    def _payload(self) -> bytes:
        return json.dumps({"owner": self.owner, "digest": self.digest, "heartbeat": time.time()}).encode()

    def refresh(self, cfg: StorageConfig | None) -> None:
        """Heartbeat; ClaimRefused if another writer took the claim over meanwhile."""
        data = self._payload()
        if not st.replace_bytes_if(self.url, data, self.token, cfg):
            raise ClaimRefused(f"{self.url}: taken over by another writer; stopping")
        self.still_ours(cfg)

    def still_ours(self, cfg: StorageConfig | None) -> None:
        """Check the claim is this writer's and take its current token."""
        cur = st.read_versioned(self.url, cfg)
        if cur is None or _held(cur[0])[0].get("owner") != self.owner:
            raise ClaimRefused(f"{self.url}: taken over by another writer; stopping")
        self.token = cur[1]


def _held(raw: bytes) -> tuple[dict, float]:
    """(a claim's fields, seconds since its heartbeat). A claim that is not one, or whose
    heartbeat lies in the future past clock skew, is infinitely old: it holds nothing."""
    try:
        held = json.loads(raw)
        age = time.time() - float(held["heartbeat"])
    except (ValueError, KeyError, TypeError, OverflowError):  # UnicodeDecodeError is a ValueError
        return {}, math.inf
    return held, (age if math.isfinite(age) and age >= -CLAIM_SKEW_S else math.inf)


def claim(split_url: str, revision: int, digest: str, cfg: StorageConfig | None, *, stale_s: float = CLAIM_STALE_S):
    """Claim the right to write `revision`: created if absent; reused when it is for the same
    plan (a rerun after a crash writes the same bytes); taken over when its writer has been
    silent for `stale_s`; otherwise ClaimRefused naming the claim."""
    c = Claim(claim_url(split_url, revision), uuid.uuid4().hex, digest)
    for _ in range(5):
        if st.create_bytes(c.url, c._payload(), cfg):
            c.still_ours(cfg)
            return c
        cur = st.read_versioned(c.url, cfg)
        if cur is None:
            continue  # removed in between: try to create it again
        held, age = _held(cur[0])
        if held.get("digest") != digest and age < stale_s:
            raise ClaimRefused(
                f"{c.url}: another writer is adding revision {revision} to this split (other files or "
                f"options; last progress {max(age, 0):.0f} s ago). Wait for it; a claim silent for "
                f"{stale_s:.0f} s is taken over, or delete the claim if that writer is known dead"
            )
        if st.replace_bytes_if(c.url, c._payload(), cur[1], cfg):
            c.still_ours(cfg)
            return c
    raise ClaimRefused(f"{c.url}: contended by other writers; try again")
