"""The run folder: `step-N/` checkpoints with a completion marker, logs, and the export.

Layout of `<run_dir>` (any fsspec URL):
    config.yaml                 the resolved config of the latest start
    metrics.jsonl               one JSON row per logged step
    tensorboard/                SummaryWriter event files
    pictures/step-N.png         input / corrupted / prediction and their spectra
    profile/                    torch.profiler trace of train.profile_steps steps (TensorBoard)
    step-N/                     DeepSpeed's checkpoint (tag step-N), client-rank-R.pt, COMPLETE
    export/model.safetensors    consolidated fp32 encoder; export/config.json (timm)

`COMPLETE` is written last and records the sha256 of every file of the step folder; a folder
without it is ignored and removed on the next start, and a file whose hash differs refuses
the checkpoint before anything is unpickled (DeepSpeed's loader unpickles its step files).
DeepSpeed writes to a local folder; when run_dir is remote that folder is a staging mirror
whose step folders are uploaded (and whose logs are synced) at every checkpoint, in the
background (pipeline.training.saver). Remote keys are downloaded only to paths inside the
folder they belong to. `load` also resumes on another number of ranks
(pipeline.training.universal).
The mirror is `$MFM_STAGING_DIR` (or the temp folder) / `mfm-run-<hash of run_dir>`: a fresh
run starts from an empty one and a finished run removes it; a killed run leaves it for its restart.

Over the ~400-line guide: the marker, its checksums, staging and the remote copy are one
contract (what counts as a complete step-N), kept in one place; the background upload and
the world-size conversion already live beside it (saver.py, universal.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.config import Config, StorageConfig

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
FORMAT_VERSION = 2  # 2: "sha256" {file: hex digest}; 1 had only the file names
_STEP = re.compile(r"^step-(\d+)$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
LOG_ITEMS = ("metrics.jsonl", "tensorboard", "pictures", "profile")
UPLOADS = ".uploads"  # per-node digests of a step folder still being finalised (saver.py)


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (damaged, altered, or escaping its folder)."""


@dataclass(frozen=True)
class RunFolder:
    url: str
    storage: StorageConfig
    local: Path  # where DeepSpeed and the loggers write: run_dir itself, or a staging mirror

    @property
    def remote(self) -> bool:
        return not storage.is_local(self.url)

    def step_url(self, step: int) -> str:
        return storage.join(self.url, f"step-{step}")

    def fs(self):
        return storage.filesystem(self.url, self.storage)


def run_folder(run_dir: str, storage_cfg: StorageConfig, *, create: bool = True) -> RunFolder:
    if storage.is_local(run_dir):
        local = Path(run_dir.removeprefix("file://"))
    else:
        # Same run_dir -> same mirror, so a restart on this machine finds its own logs.
        root = Path(os.environ.get("MFM_STAGING_DIR", tempfile.gettempdir()))
        local = root / f"mfm-run-{hashlib.sha1(run_dir.encode()).hexdigest()[:12]}"
    if create and storage.is_local(run_dir):
        local.mkdir(parents=True, exist_ok=True)
    elif create:
        private_dir(local)
    return RunFolder(run_dir, storage_cfg, local)


def private_dir(path: Path) -> Path:
    """`path` as a folder only this user can enter: created 0700, or refused if it is there and is
    a link, someone else's or open to others. Staging names are predictable (a restart must find
    its mirror), so another local user could create one first and swap files in it between the
    sha256 check and DeepSpeed's unpickling load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    why = None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        why = "is a link or not a folder"
    elif st.st_uid != os.getuid():
        why = f"is not owned by this user (uid {st.st_uid})"
    elif st.st_mode & 0o077:
        why = f"is not private (mode {stat.S_IMODE(st.st_mode):o})"
    if why:
        raise CheckpointError(
            f"{path}: staging folder {why}; another user may have made it. Remove it, or set "
            "MFM_STAGING_DIR to a folder of your own"
        )
    return path


def universal_dir(folder: RunFolder, *, create: bool = True) -> Path:
    """Where a step folder is converted for another world size (pipeline.training.universal)."""
    root = Path(os.environ.get("MFM_STAGING_DIR", tempfile.gettempdir()))
    path = root / f"mfm-universal-{hashlib.sha1(folder.url.encode()).hexdigest()[:12]}"
    return private_dir(path) if create else path


def reset_mirror(folder: RunFolder) -> None:
    """A fresh run (no complete checkpoint at run_dir) starts from an empty staging mirror: what
    an earlier run at the same URL left there would otherwise be uploaded as this run's logs."""
    if folder.remote:
        shutil.rmtree(folder.local, ignore_errors=True)
        private_dir(folder.local)


def remove_mirror(folder: RunFolder) -> None:
    """A finished run's staging mirror: everything in it is on run_dir now."""
    if folder.remote:
        shutil.rmtree(folder.local, ignore_errors=True)


def retry(folder: RunFolder, fn, what: str):
    return storage.retry(fn, attempts=folder.storage.retries, what=what)


def list_steps(folder: RunFolder) -> dict[int, bool]:
    """step -> complete, for every step-N folder under run_dir."""
    fs, path = folder.fs()
    if not retry(folder, lambda: fs.exists(path), f"stat {folder.url}"):
        return {}
    out: dict[int, bool] = {}
    for entry in retry(folder, lambda: fs.ls(path, detail=False), f"list {folder.url}"):
        m = _STEP.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if m:
            step = int(m.group(1))
            out[step] = retry(folder, lambda: fs.exists(f"{path}/step-{step}/{MARKER}"), f"stat step-{step}")
    return out


def latest_complete(folder: RunFolder) -> int | None:
    done = [s for s, complete in list_steps(folder).items() if complete]
    return max(done) if done else None


def read_marker(folder: RunFolder, step: int) -> dict:
    url = folder.step_url(step)
    return parse_marker(storage.read_capped(storage.join(url, MARKER), folder.storage, max_bytes=MAX_MARKER), url)


MAX_MARKER = 16 << 20  # a marker lists every file of a step folder: kilobytes


def parse_marker(raw: bytes, url: str) -> dict:
    """A step folder's COMPLETE, checked for the shape `verify` and `load` rely on; a
    CheckpointError naming it otherwise (it is read from shared storage)."""
    where = f"{url}/{MARKER}"
    try:
        marker = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: not JSON ({e}); refusing the checkpoint") from None
    if not isinstance(marker, dict):
        raise CheckpointError(f"{where}: not a JSON object; refusing the checkpoint")
    sha = marker.get("sha256")
    if sha is not None and not (
        isinstance(sha, dict)
        and all(isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v) for k, v in sha.items())
    ):
        raise CheckpointError(f"{where}: sha256 is not a map of file -> hex digest; refusing the checkpoint")
    world = marker.get("world_size")
    if world is not None and (type(world) is not int or world < 1):
        raise CheckpointError(f"{where}: world_size {world!r} is not a positive integer; refusing the checkpoint")
    return marker


def _remove(folder: RunFolder, step: int) -> None:
    fs, path = folder.fs()
    retry(folder, lambda: fs.rm(f"{path}/step-{step}", recursive=True), f"remove step-{step}")
    if folder.remote:
        shutil.rmtree(folder.local / f"step-{step}", ignore_errors=True)


def remove_incomplete(folder: RunFolder) -> list[int]:
    """Drop step folders a killed run left half-written (rank 0, before anyone saves)."""
    gone = [s for s, complete in list_steps(folder).items() if not complete]
    for step in gone:
        log.warning("removing incomplete checkpoint %s", folder.step_url(step))
        _remove(folder, step)
    fs, path = folder.fs()
    if retry(folder, lambda: fs.exists(f"{path}/{UPLOADS}"), f"stat {UPLOADS}"):
        retry(folder, lambda: fs.rm(f"{path}/{UPLOADS}", recursive=True), f"remove {UPLOADS}")
    return gone


def prune(folder: RunFolder, keep_last: int) -> None:
    done = sorted(s for s, complete in list_steps(folder).items() if complete)
    for step in done[:-keep_last]:
        _remove(folder, step)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def client_name(rank: int) -> str:
    return f"client-rank{rank}.pt"


def upload_tree(folder: RunFolder, local: Path, url: str) -> None:
    fs, path = storage.filesystem(url, folder.storage)
    for file in sorted(p for p in local.rglob("*") if p.is_file() and ".tmp-" not in p.name):
        rel = file.relative_to(local).as_posix()
        retry(folder, lambda: fs.put_file(str(file), f"{path}/{rel}"), f"upload {rel}")


def inside(root: Path, rel: str, what: str) -> Path:
    """`root/rel`, refused unless it is a path strictly inside `root` (no `..`, no absolute
    path, no way out through a symlink already there): remote listings are untrusted."""
    base = root.resolve()
    dest = (base / rel).resolve()
    if not rel or rel.startswith("/") or ".." in rel.split("/") or not dest.is_relative_to(base) or dest == base:
        raise CheckpointError(f"{what}: key {rel!r} leads outside {root}; refusing to download it")
    return dest


def _download_tree(folder: RunFolder, url: str, local: Path) -> None:
    fs, path = storage.filesystem(url, folder.storage)
    if not retry(folder, lambda: fs.exists(path), f"stat {url}"):
        return
    path = path.rstrip("/")
    remotes = retry(folder, lambda: fs.find(path), f"list {url}")
    # Check every key before writing any, so a hostile listing leaves nothing behind.
    plan = [(remote, inside(local, remote[len(path) :].lstrip("/"), url)) for remote in remotes]
    for remote, dest in plan:
        dest.parent.mkdir(parents=True, exist_ok=True)
        retry(folder, lambda: fs.get_file(remote, str(dest)), f"download {remote}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _step_files(local_step: Path) -> list[Path]:
    return sorted(p for p in local_step.rglob("*") if p.is_file() and ".tmp-" not in p.name and p.name != MARKER)


def digests(local_step: Path) -> dict[str, str]:
    """file (relative to the step folder) -> sha256, for every file of a written step folder."""
    return {p.relative_to(local_step).as_posix(): sha256_file(p) for p in _step_files(local_step)}


def verify(local_step: Path, marker: dict, url: str, *, allow_unverified: bool = False) -> None:
    """Refuse a step folder whose files differ from what its COMPLETE recorded: a changed
    byte, a missing file, an extra file or anything but a regular file. A COMPLETE without
    checksums (format 1) is refused too unless `allow_unverified` (train.allow_unverified_checkpoints)."""
    recorded = marker.get("sha256")
    if recorded is None:
        if not allow_unverified:
            raise CheckpointError(
                f"{url}: its {MARKER} (format {marker.get('format_version')!r}) records no sha256 checksums, so "
                "its files cannot be verified before DeepSpeed unpickles them; refusing it. To resume from a "
                "checkpoint you wrote yourself before checksums were recorded, set "
                "train.allow_unverified_checkpoints=true"
            )
        log.warning("%s: format %s records no checksums; loading it unverified", url, marker.get("format_version"))
        return
    found = {}
    for p in sorted(local_step.rglob("*")):
        rel = p.relative_to(local_step).as_posix()
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise CheckpointError(f"{url}/{rel}: not a regular file; refusing the checkpoint")
        if p.is_file() and p.name != MARKER:
            found[rel] = p
    for rel in sorted(set(recorded) - set(found)):
        raise CheckpointError(f"{url}/{rel}: listed in {MARKER} but missing; refusing the checkpoint")
    for rel in sorted(set(found) - set(recorded)):
        raise CheckpointError(f"{url}/{rel}: not listed in {MARKER}; refusing the checkpoint")
    for rel, p in found.items():
        digest = sha256_file(p)
        if digest != recorded[rel]:
            raise CheckpointError(
                f"{url}/{rel}: sha256 {digest} differs from {recorded[rel]} recorded in {MARKER}: the "
                "checkpoint is damaged or was altered; refusing it (move the folder away to resume "
                "from the previous complete checkpoint)"
            )


def sync_logs_up(folder: RunFolder, metrics: bytes | None = None) -> None:
    """Remote run_dir: metrics (as of the checkpoint, when given), TensorBoard events and
    pictures go up with each checkpoint."""
    if not folder.remote:
        return
    for item in LOG_ITEMS:
        src = folder.local / item
        if item == "metrics.jsonl" and metrics is not None:
            storage.write_bytes(storage.join(folder.url, item), metrics, folder.storage)
        elif src.is_file():
            storage.write_bytes(storage.join(folder.url, item), src.read_bytes(), folder.storage)
        elif src.is_dir():
            upload_tree(folder, src, storage.join(folder.url, item))


def sync_logs_down(folder: RunFolder) -> None:
    """Remote run_dir on resume: start from the logs uploaded with the checkpoint."""
    if not folder.remote:
        return
    for item in LOG_ITEMS:
        url = storage.join(folder.url, item)
        if item.endswith(".jsonl"):
            if storage.exists(url, folder.storage):
                (folder.local / item).write_bytes(storage.read_bytes(url, folder.storage))
        else:
            _download_tree(folder, url, folder.local / item)


def gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agree(error: str | None) -> None:
    """Collective: raise on every rank if any rank found an error (no rank left waiting)."""
    errors = [e for e in gather(error) if e]
    if errors:
        raise CheckpointError(errors[0])


def _read_local_marker(local_step: Path) -> bytes:
    try:
        return storage.read_capped(str(local_step / MARKER), max_bytes=MAX_MARKER)
    except OSError as e:
        raise CheckpointError(f"{local_step / MARKER}: cannot be read ({e}); refusing the checkpoint") from e


def read_client_state(path: Path) -> dict:
    """A rank's client state (step, loader, RNG, schedule): tensors and plain containers only,
    never an arbitrary pickle."""
    return torch.load(path, weights_only=True)


def load(engine, folder: RunFolder, step: int, *, rank: int, local_rank: int, allow_unverified: bool = False) -> dict:
    """Collective: verify step-N against its COMPLETE, restore the engine (model, optimizer)
    and return this rank's client state (step, loader, RNG, scheduler).

    Saved by another number of ranks, ZeRO 1-3 state goes through DeepSpeed's universal
    format (pipeline.training.universal) and every rank gets rank 0's client state with
    `rng` None: the ranks' random streams cannot carry over, the caller reseeds them."""
    from pipeline.training import universal

    tag = f"step-{step}"
    local_step = folder.local / tag
    error = None
    if local_rank == 0:
        try:
            if folder.remote:
                shutil.rmtree(local_step, ignore_errors=True)
                _download_tree(folder, folder.step_url(step), local_step)
            marker = parse_marker(_read_local_marker(local_step), folder.step_url(step))
            verify(local_step, marker, folder.step_url(step), allow_unverified=allow_unverified)
        except CheckpointError as e:
            error = str(e)
    _agree(error)
    marker = parse_marker(_read_local_marker(local_step), folder.step_url(step))
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved = marker.get("world_size", world)
    # Partitioned optimizer state (ZeRO 1-3, or bf16's optimizer) needs the conversion; ZeRO-0's
    # is whole in mp_rank_00_model_states.pt and DeepSpeed loads it on any number of ranks.
    resharded = saved != world and any(local_step.glob("*optim_states.pt"))
    scratch = universal_dir(folder, create=False)
    if resharded:
        log.info(
            "%s was saved by %d ranks, resuming on %d: converting it to DeepSpeed's universal format",
            folder.step_url(step),
            saved,
            world,
        )
        if local_rank == 0:
            try:
                universal.convert(local_step, private_dir(scratch) / tag)
            except CheckpointError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - any failure: say which checkpoint, keep the cause
                error = (
                    f"{folder.step_url(step)}: converting it from {saved} to {world} ranks failed ({e}); "
                    f"resume with {saved} ranks"
                )
        _agree(error)
        with universal.loading_universal(engine):
            path, _ = engine.load_checkpoint(
                str(scratch), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
    else:
        # Verified above: DeepSpeed's loader unpickles these files (not weights_only).
        path, _ = engine.load_checkpoint(
            str(folder.local), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {folder.step_url(step)}")
    if saved == world:
        client = read_client_state(local_step / client_name(rank))
    else:
        client = {**read_client_state(local_step / client_name(0)), "rng": None}
    barrier()
    if local_rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        if folder.remote:
            shutil.rmtree(local_step, ignore_errors=True)
    return client


def gather_fp32_state(engine) -> dict[str, torch.Tensor]:
    """Collective: the full fp32 model state on every rank, from the optimizer's fp32 master
    weights where ZeRO / bf16 keep them (so a bf16 run still exports exact fp32)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        state[name] = (p.detach() if full is None else full).float().cpu().clone()
    for name, b in engine.module.named_buffers():
        state[name] = b.detach().float().cpu().clone() if b.is_floating_point() else b.detach().cpu().clone()
    return state


def export(engine, cfg: Config, folder: RunFolder, *, rank: int) -> str | None:
    """Collective: write `<run_dir>/export/{model.safetensors, config.json}`; rank 0 returns
    the export URL."""
    from pipeline.models import build_model, export_encoder, export_weights

    state = gather_fp32_state(engine)
    url = None
    if rank == 0:
        model = build_model(cfg.model, cfg.corruption)
        model.load_state_dict(state, strict=True)
        tensors, timm_config = export_encoder(model, cfg.model)
        url = storage.join(folder.url, "export")
        storage.write_bytes(storage.join(url, "model.safetensors"), export_weights(tensors), folder.storage)
        storage.write_bytes(
            storage.join(url, "config.json"), json.dumps(timm_config, indent=1).encode(), folder.storage
        )
    barrier()
    return url
