"""The run folder as untrusted input, without training processes: remote keys that try to leave
the staging folder, step files that differ from their recorded sha256, and the proof that
nothing the project loads is an arbitrary pickle (the end-to-end runs are in test_training.py)."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.training import checkpoint as ckpt


def _s3_run_dir(name: str) -> str:
    return f"s3://mfm-test/runs/{name}-{time.time_ns()}"


def _put(s3_endpoint, url: str, key: str, body: bytes = b"x") -> None:
    import boto3

    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    boto3.client("s3", endpoint_url=s3_endpoint.url).put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body)


def _outside(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("*") if p.is_file() and "staging" not in p.parts]


@pytest.mark.parametrize("key", ["pictures/../../escaped.png", "pictures/../../../escaped.png"])
def test_remote_log_keys_cannot_leave_the_staging_folder(s3_endpoint, tmp_path, monkeypatch, key):
    monkeypatch.setenv("MFM_STAGING_DIR", str(tmp_path / "staging"))
    url = _s3_run_dir("escape-logs")
    _put(s3_endpoint, url, "pictures/step-2.png")
    _put(s3_endpoint, url, key, b"attacker")
    folder = ckpt.run_folder(url, StorageConfig())
    with pytest.raises(ckpt.CheckpointError, match=r"leads outside"):
        ckpt.sync_logs_down(folder)
    assert _outside(tmp_path) == []
    # refused as a whole: not even the honest file was written
    assert not (folder.local / "pictures" / "step-2.png").exists()


def test_remote_step_keys_cannot_leave_the_staging_folder_on_load(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MFM_STAGING_DIR", str(tmp_path / "staging"))
    url = _s3_run_dir("escape-step")
    _put(s3_endpoint, url, "step-4/COMPLETE", json.dumps({"format_version": 2, "step": 4, "sha256": {}}).encode())
    _put(s3_endpoint, url, "step-4/../../../escaped.pt", b"attacker")
    folder = ckpt.run_folder(url, StorageConfig())
    with pytest.raises(ckpt.CheckpointError, match=r"'\.\./\.\./\.\./escaped\.pt' leads outside"):
        ckpt.load(None, folder, 4, rank=0, local_rank=0)
    assert _outside(tmp_path) == []


def test_a_symlink_in_the_staging_folder_is_no_way_out(tmp_path):
    """Locally the staging folder is the last line: a link planted there does not redirect a download."""
    source = tmp_path / "remote" / "pictures"
    (source / "link").mkdir(parents=True)
    (source / "link" / "x.png").write_bytes(b"x")
    staging = tmp_path / "staging"
    (staging / "pictures").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (staging / "pictures" / "link").symlink_to(tmp_path / "elsewhere")
    folder = ckpt.RunFolder(str(tmp_path / "remote"), StorageConfig(), staging)
    with pytest.raises(ckpt.CheckpointError, match="leads outside"):
        ckpt._download_tree(folder, str(tmp_path / "remote" / "pictures"), staging / "pictures")
    assert not (tmp_path / "elsewhere" / "x.png").exists()


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "../x", "a/../../x", "a/./../../x"])
def test_inside_refuses_every_way_out(tmp_path, rel):
    with pytest.raises(ckpt.CheckpointError):
        ckpt.inside(tmp_path, rel, "test")


def _step_folder(root: Path) -> tuple[Path, dict]:
    step = root / "step-4"
    step.mkdir(parents=True)
    torch.save({"w": torch.arange(64.0)}, step / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    torch.save({"m": torch.ones(8)}, step / "mp_rank_00_model_states.pt")
    marker = {"format_version": ckpt.FORMAT_VERSION, "step": 4, "sha256": ckpt.digests(step)}
    (step / ckpt.MARKER).write_text(json.dumps(marker))
    return step, marker


def test_digests_verify_and_a_flipped_byte_is_refused_naming_the_file(tmp_path):
    step, marker = _step_folder(tmp_path)
    assert set(marker["sha256"]) == {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"}
    ckpt.verify(step, marker, "run/step-4")  # intact: accepted
    optim = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0x01
    optim.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"run/step-4/zero_pp_rank_1_mp_rank_00_optim_states\.pt: sha256"):
        ckpt.verify(step, marker, "run/step-4")


@pytest.mark.parametrize("change", ["missing", "extra", "symlink"])
def test_verify_refuses_missing_extra_and_special_files(tmp_path, change):
    step, marker = _step_folder(tmp_path)
    if change == "missing":
        (step / "mp_rank_00_model_states.pt").unlink()
        expected = "mp_rank_00_model_states.pt: listed in COMPLETE but missing"
    elif change == "extra":
        torch.save({}, step / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
        expected = "zero_pp_rank_2_mp_rank_00_optim_states.pt: not listed in COMPLETE"
    else:
        target = step / "mp_rank_00_model_states.pt"
        (tmp_path / "real.pt").write_bytes(target.read_bytes())
        target.unlink()
        target.symlink_to(tmp_path / "real.pt")
        expected = "mp_rank_00_model_states.pt: not a regular file"
    with pytest.raises(ckpt.CheckpointError, match=expected):
        ckpt.verify(step, marker, "run/step-4")


def test_load_refuses_a_tampered_local_checkpoint_before_deepspeed_sees_it(tmp_path):
    step, _ = _step_folder(tmp_path / "run")
    (step / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x04tampered")
    folder = ckpt.run_folder(str(tmp_path / "run"), StorageConfig())
    # engine None: reaching DeepSpeed would fail differently
    with pytest.raises(ckpt.CheckpointError, match="mp_rank_00_model_states.pt: sha256"):
        ckpt.load(None, folder, 4, rank=0, local_rank=0)


@pytest.fixture
def no_pickles(monkeypatch):
    """Any unpickling in this process raises: pickle's loaders, its Unpickler (which torch.load
    uses unless weights_only) and torch.load without weights_only."""

    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    class Refused(pickle.Unpickler):  # a class still, so modules that subclass it import
        def __init__(self, *a, **k):
            refuse()

    real_torch_load = torch.load

    def torch_load(*a, weights_only=None, **k):
        if weights_only is not True:
            refuse()
        return real_torch_load(*a, weights_only=True, **k)

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refused)
    monkeypatch.setattr(torch, "load", torch_load)


def test_nothing_consumers_load_is_a_pickle(tmp_path, no_pickles):
    """Client state (step, loader, RNG, schedule), an export (registry load, finetune.init from a
    folder and from a registry ref): all load with every unpickler disabled."""
    from safetensors.torch import save

    from pipeline.config import load_config
    from pipeline.finetune import read_init_state
    from pipeline.models import build_model, export_encoder
    from pipeline.registry import Registry, load_export, load_model
    from pipeline.training.optim import build_optimizer, build_scheduler, scaled_lrs

    cfg = load_config("tiny_cpu", [])
    model = build_model(cfg.model, cfg.corruption)
    optimizer = build_optimizer(model, cfg.optim, 1e-3)
    scheduler = build_scheduler(optimizer, cfg.optim, scaled_lrs(cfg.optim, 16), 5)
    scheduler.step_update(3)
    client = {
        "step": 3,
        "loader": {"version": 1, "seed": 0, "epoch": 1, "segments": [{"world_size": 2, "micro_batch": 8}]},
        "rng": ckpt.rng_state(),
        "scheduler": scheduler.state_dict(),
    }
    torch.save(client, tmp_path / "client-rank0.pt")  # writing pickles; reading is under test
    with pytest.raises(AssertionError, match="unpickled"):  # the guard is on
        torch.load(tmp_path / "client-rank0.pt", weights_only=False)
    back = ckpt.read_client_state(tmp_path / "client-rank0.pt")
    assert back["step"] == 3 and back["scheduler"] == scheduler.state_dict()
    ckpt.set_rng_state(back["rng"])

    tensors, config = export_encoder(model, cfg.model)
    export = tmp_path / "export"
    storage.write_bytes(str(export / "model.safetensors"), save(tensors))
    storage.write_bytes(str(export / "config.json"), json.dumps(config).encode())
    encoder, _ = load_export(str(export))
    reg = Registry(str(tmp_path / "registry"))
    reg.register("tiny", str(export))
    assert load_model("tiny@latest", reg) is not None
    for init in (str(export), "tiny@latest"):
        c = load_config("tiny_cpu", [f"finetune.init={init}", f"finetune.registry={tmp_path / 'registry'}"])
        state = read_init_state(c)
        assert torch.equal(state[next(iter(tensors))], tensors[next(iter(tensors))])
