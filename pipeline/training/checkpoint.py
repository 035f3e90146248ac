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
whose step folders are uploaded (and whose logs are synced) at every checkpoint. Remote keys
are downloaded only to paths inside the folder they belong to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
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
LOG_ITEMS = ("metrics.jsonl", "tensorboard", "pictures", "profile")


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


def run_folder(run_dir: str, storage_cfg: StorageConfig) -> RunFolder:
    if storage.is_local(run_dir):
        local = Path(run_dir.removeprefix("file://"))
    else:
        # Same run_dir -> same mirror, so a restart on this machine finds its own logs.
        root = Path(os.environ.get("MFM_STAGING_DIR", tempfile.gettempdir()))
        local = root / f"mfm-run-{hashlib.sha1(run_dir.encode()).hexdigest()[:12]}"
    local.mkdir(parents=True, exist_ok=True)
    return RunFolder(run_dir, storage_cfg, local)


def _retry(folder: RunFolder, fn, what: str):
    return storage.retry(fn, attempts=folder.storage.retries, what=what)


def list_steps(folder: RunFolder) -> dict[int, bool]:
    """step -> complete, for every step-N folder under run_dir."""
    fs, path = folder.fs()
    if not _retry(folder, lambda: fs.exists(path), f"stat {folder.url}"):
        return {}
    out: dict[int, bool] = {}
    for entry in _retry(folder, lambda: fs.ls(path, detail=False), f"list {folder.url}"):
        m = _STEP.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if m:
            step = int(m.group(1))
            out[step] = _retry(folder, lambda: fs.exists(f"{path}/step-{step}/{MARKER}"), f"stat step-{step}")
    return out


def latest_complete(folder: RunFolder) -> int | None:
    done = [s for s, complete in list_steps(folder).items() if complete]
    return max(done) if done else None


def read_marker(folder: RunFolder, step: int) -> dict:
    return json.loads(storage.read_bytes(storage.join(folder.step_url(step), MARKER), folder.storage))


def _remove(folder: RunFolder, step: int) -> None:
    fs, path = folder.fs()
    _retry(folder, lambda: fs.rm(f"{path}/step-{step}", recursive=True), f"remove step-{step}")
    if folder.remote:
        shutil.rmtree(folder.local / f"step-{step}", ignore_errors=True)


def remove_incomplete(folder: RunFolder) -> list[int]:
    """Drop step folders a killed run left half-written (rank 0, before anyone saves)."""
    gone = [s for s, complete in list_steps(folder).items() if not complete]
    for step in gone:
        log.warning("removing incomplete checkpoint %s", folder.step_url(step))
        _remove(folder, step)
    return gone


def prune(folder: RunFolder, keep_last: int) -> None:
    done = sorted(s for s, complete in list_steps(folder).items() if complete)
    for step in done[:-keep_last]:
        _remove(folder, step)


def _barrier() -> None:
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


def _client_name(rank: int) -> str:
    return f"client-rank{rank}.pt"


def _upload_tree(folder: RunFolder, local: Path, url: str) -> None:
    fs, path = storage.filesystem(url, folder.storage)
    for file in sorted(p for p in local.rglob("*") if p.is_file() and ".tmp-" not in p.name):
        rel = file.relative_to(local).as_posix()
        _retry(folder, lambda: fs.put_file(str(file), f"{path}/{rel}"), f"upload {rel}")


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
    if not _retry(folder, lambda: fs.exists(path), f"stat {url}"):
        return
    path = path.rstrip("/")
    remotes = _retry(folder, lambda: fs.find(path), f"list {url}")
    # Check every key before writing any, so a hostile listing leaves nothing behind.
    plan = [(remote, inside(local, remote[len(path) :].lstrip("/"), url)) for remote in remotes]
    for remote, dest in plan:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _retry(folder, lambda: fs.get_file(remote, str(dest)), f"download {remote}")


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


def verify(local_step: Path, marker: dict, url: str) -> None:
    """Refuse a step folder whose files differ from what its COMPLETE recorded: a changed
    byte, a missing file, an extra file or anything but a regular file."""
    recorded = marker.get("sha256")
    if recorded is None:
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


def sync_logs_up(folder: RunFolder) -> None:
    """Remote run_dir: metrics, TensorBoard events and pictures go up with each checkpoint."""
    if not folder.remote:
        return
    for item in LOG_ITEMS:
        src = folder.local / item
        if src.is_file():
            storage.write_bytes(storage.join(folder.url, item), src.read_bytes(), folder.storage)
        elif src.is_dir():
            _upload_tree(folder, src, storage.join(folder.url, item))


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


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save(
    engine,
    folder: RunFolder,
    step: int,
    client: dict,
    *,
    rank: int,
    local_rank: int,
    keep_last: int,
    extra: dict | None = None,
) -> str:
    """Collective: every rank writes its DeepSpeed shard and client state, then rank 0 marks
    the folder complete and prunes old ones. Returns the step folder's URL."""
    tag = f"step-{step}"
    local_step = folder.local / tag
    if folder.remote and local_rank == 0:
        shutil.rmtree(local_step, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(folder.local), tag=tag, client_state={"step": step}, save_latest=False)
    local_step.mkdir(parents=True, exist_ok=True)
    torch.save(client, local_step / _client_name(rank))
    _barrier()
    # One hasher (and uploader) per node: each node's staging folder holds the files its ranks
    # wrote; a local run_dir is one folder that rank 0 hashes.
    mine = digests(local_step) if (local_rank == 0 if folder.remote else rank == 0) else {}
    if folder.remote and local_rank == 0:
        _upload_tree(folder, local_step, folder.step_url(step))
        shutil.rmtree(local_step, ignore_errors=True)  # on every node, not only the first
    hashes = {k: v for part in _gather(mine) for k, v in part.items()}
    if rank == 0:
        sync_logs_up(folder)
        marker = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "time": time.time(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "files": sorted(hashes),
            "sha256": hashes,
            **(extra or {}),
        }
        storage.write_bytes(
            storage.join(folder.step_url(step), MARKER), json.dumps(marker, indent=1).encode(), folder.storage
        )
        prune(folder, keep_last)
    _barrier()
    return folder.step_url(step)


def _agree(error: str | None) -> None:
    """Collective: raise on every rank if any rank found an error (no rank left waiting)."""
    errors = [e for e in _gather(error) if e]
    if errors:
        raise CheckpointError(errors[0])


def read_client_state(path: Path) -> dict:
    """A rank's client state (step, loader, RNG, schedule): tensors and plain containers only,
    never an arbitrary pickle."""
    return torch.load(path, weights_only=True)


def load(engine, folder: RunFolder, step: int, *, rank: int, local_rank: int) -> dict:
    """Collective: verify step-N against its COMPLETE, restore the engine (model, optimizer)
    and return this rank's client state (step, loader, RNG, scheduler)."""
    tag = f"step-{step}"
    local_step = folder.local / tag
    error = None
    if local_rank == 0:
        try:
            if folder.remote:
                shutil.rmtree(local_step, ignore_errors=True)
                _download_tree(folder, folder.step_url(step), local_step)
            verify(local_step, json.loads((local_step / MARKER).read_bytes()), folder.step_url(step))
        except CheckpointError as e:
            error = str(e)
    _agree(error)
    # Verified above: DeepSpeed's loader unpickles these files (not weights_only).
    path, _ = engine.load_checkpoint(
        str(folder.local), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder.step_url(step)}")
    client_file = local_step / _client_name(rank)
    if not client_file.exists():
        raise RuntimeError(
            f"{folder.step_url(step)} has no {client_file.name}: it was written by a "
            "run with fewer ranks; resume with the same number of processes"
        )
    client = read_client_state(client_file)
    _barrier()
    if folder.remote and local_rank == 0:
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
    from safetensors.torch import save as safetensors_bytes

    from pipeline.models import build_model, export_encoder

    state = gather_fp32_state(engine)
    url = None
    if rank == 0:
        model = build_model(cfg.model, cfg.corruption)
        model.load_state_dict(state, strict=True)
        tensors, timm_config = export_encoder(model, cfg.model)
        url = storage.join(folder.url, "export")
        storage.write_bytes(storage.join(url, "model.safetensors"), safetensors_bytes(tensors), folder.storage)
        storage.write_bytes(
            storage.join(url, "config.json"), json.dumps(timm_config, indent=1).encode(), folder.storage
        )
    _barrier()
    return url
