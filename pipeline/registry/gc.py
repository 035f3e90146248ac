"""`mfm registry gc`: remove the claims a killed `register` left, never anything else."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from pathlib import Path

from pipeline import storage
from pipeline.registry.refs import CLAIM, MANIFEST, NAME_RE, RegistryError, check_name
from pipeline.registry.store import Registry

log = logging.getLogger(__name__)


def collect_abandoned_claims(
    reg: Registry, older_than_s: float, name: str | None = None, *, dry_run: bool = False
) -> list[str]:
    """Remove abandoned claims: `v<N>/` folders holding a `.claim` older than `older_than_s`
    (by its `created` time) and no manifest (a `register` killed midway). Complete versions are
    never touched.
    Returns the folders removed (or, with dry_run, that would be)."""
    if older_than_s <= 0:
        raise RegistryError(f"gc: the age must be positive, got {older_than_s} s")
    now = dt.datetime.now(dt.timezone.utc)
    removed = []
    for n in [check_name(name)] if name else [x for x in reg.ls() if NAME_RE.fullmatch(x)]:
        for version in reg.claimed(n):
            vurl = reg.version_url(n, version)
            claim_url = storage.join(vurl, CLAIM)
            fs, claim_path = storage.filesystem(claim_url, reg.storage)
            created = _claim_time(reg, claim_url)
            if created is None or (now - created).total_seconds() < older_than_s:
                continue
            if storage.exists(storage.join(vurl, MANIFEST), reg.storage):
                continue
            removed.append(vurl)
            if dry_run:
                continue
            # The claim goes last: while it stands nobody else can take version N and write here.
            for entry in reg.ls(n, f"v{version}"):
                if entry != CLAIM:
                    if storage.exists(storage.join(vurl, MANIFEST), reg.storage):
                        raise RegistryError(f"{vurl}: a manifest appeared while collecting the claim; left alone")
                    fs.rm(fs._strip_protocol(storage.join(vurl, entry)), recursive=True)
            fs.rm(claim_path)
            if storage.is_local(vurl):
                with contextlib.suppress(OSError):  # a file written meanwhile keeps the folder
                    Path(fs._strip_protocol(vurl)).rmdir()
            log.info("removed abandoned claim %s", vurl)
    return removed


def _claim_time(reg: Registry, url: str) -> dt.datetime | None:
    """When a claim was taken: its `created` field, else the store's modification time; None
    if the claim is gone."""
    try:
        body = storage.read_bytes(url, reg.storage)
    except FileNotFoundError:
        return None
    try:
        created = dt.datetime.fromisoformat(json.loads(body)["created"])
    except (ValueError, KeyError, TypeError):
        fs, path = storage.filesystem(url, reg.storage)
        try:
            created = fs.modified(path)
        except FileNotFoundError:
            return None
    return created if created.tzinfo else created.replace(tzinfo=dt.timezone.utc)
