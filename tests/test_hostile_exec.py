"""Hostile launch input (issue 26, items 1, 2, 5, 9): a hostfile line, --master-addr or a flow
parameter never reaches a shell as a command, secrets never reach the launcher's output, the
staging folders another local user could plant are refused, and a COMPLETE without checksums
is refused unless allowed by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from environment import missing

from pipeline.config import ConfigError, StorageConfig, load_config
from pipeline.training import checkpoint as ckpt
from pipeline.training import launcher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def launchable(tmp_path, monkeypatch):
    """A config that passes launcher.validate (a split with a manifest, a timm model), a home
    without .deepspeed_env, and a working folder of its own."""
    split = tmp_path / "shards"
    split.mkdir()
    (split / "manifest.json").write_text("{}")
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    monkeypatch.chdir(work)
    return load_config("tiny_cpu", [f"data.train={split}", f"train.run_dir={tmp_path / 'run'}"])


# --- 1: hostfiles and --master-addr -------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "-oProxyCommand=touch${IFS}%s slots=1",
        "evil.host,node1 slots=1",
        "node1;touch${IFS}%s slots=1",
        "$(touch${IFS}%s) slots=1",
        "user@node1 slots=1",
        "fe80::1%%eth0;touch${IFS}%s slots=1",
        "node1 slots=1 slots=2",
        "node1 slots=0",
        "node1 slots=²",
        "node1 slots=99999",
        "node1",
    ],
)
def test_hostfile_lines_that_are_not_hosts_are_refused(tmp_path, line):
    target = tmp_path / "pwned"
    hosts = tmp_path / "hosts"
    hosts.write_text("# the cluster\nnode0 slots=8\n" + (line % target if "%s" in line else line % ()) + "\n")
    with pytest.raises(ConfigError, match=rf"hostfile.*{hosts}:3: ") as e:
        launcher.parse_hostfile(str(hosts))
    assert "touch" not in str(e.value)  # the line is named, not echoed (a flow may name any file)
    assert not target.exists()


def test_good_hostfiles_parse():
    assert launcher.is_host("10.0.0.1") and launcher.is_host("fd00::1") and launcher.is_host("gpu-node_0.cluster")
    assert not launcher.is_host("-oX") and not launcher.is_host("fe80::1%eth0") and not launcher.is_host("a b")


def test_good_hostfile_parses(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-node-0 slots=8  # first\n\n  10.0.0.12 slots=8\nfd00::3 slots=1\n")
    assert launcher.parse_hostfile(str(hosts)) == {"gpu-node-0": 8, "10.0.0.12": 8, "fd00::3": 1}


@pytest.mark.parametrize("kind", ["fifo", "zero", "dir", "missing"])
def test_hostfile_that_is_not_a_file_is_named_not_hung(tmp_path, kind):
    path = tmp_path / "hosts"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        os.symlink("/dev/zero", path)
    elif kind == "dir":
        path.mkdir()
    with pytest.raises(ConfigError, match=rf"hostfile.*{path}: cannot be read"):
        launcher.parse_hostfile(str(path))


def test_hostfile_option_injection_runs_nothing(launchable, tmp_path):
    # Before the fix DeepSpeed's ssh check ran `ssh ... -oProxyCommand=touch${IFS}<target> hostname`
    # and ssh ran the proxy command through a shell on this machine.
    target = tmp_path / "pwned"
    hosts = tmp_path / "hosts"
    hosts.write_text(f"-oProxyCommand=touch${{IFS}}{target} slots=1\n")
    with pytest.raises(ConfigError, match="hostfile"):
        launcher.launch(launchable, hostfile=str(hosts), master_addr="127.0.0.1")
    time.sleep(0.5)
    assert not target.exists()


@pytest.mark.parametrize(
    "addr", ["10.0.0.1;touch${IFS}%s;#", "$(touch${IFS}%s)", "-oProxyCommand=touch${IFS}%s", "10.0.0.1 x", ""]
)
def test_master_addr_that_is_not_a_host_is_refused(launchable, tmp_path, addr):
    target = tmp_path / "pwned"
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    with pytest.raises(ConfigError, match="master.addr"):
        launcher.launch(launchable, hostfile=str(hosts), master_addr=addr % target if "%s" in addr else addr)
    assert not target.exists()


# --- 2: secrets stay out of the launcher's command line and output ------------------------------


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD"])
def test_deepspeed_env_with_a_secret_is_refused(launchable, tmp_path, name):
    secret = "wJalrXUtnFEMI-sekrit-value"
    Path(".deepspeed_env").write_text(f"NCCL_DEBUG=WARN\n{name}={secret}\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    with pytest.raises(ConfigError, match=rf"\.deepspeed_env:2: {name} looks like a secret") as e:
        launcher.launch(launchable, hostfile=str(hosts), master_addr="127.0.0.1")
    assert secret not in str(e.value) and "credentials" in str(e.value)


def test_deepspeed_env_value_a_shell_would_expand_is_refused(launchable, tmp_path):
    Path(".deepspeed_env").write_text("NCCL_DEBUG=$(touch /tmp/x)\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    with pytest.raises(ConfigError, match=r"\.deepspeed_env:1: the value of NCCL_DEBUG"):
        launcher.launch(launchable, hostfile=str(hosts), master_addr="127.0.0.1")


def _sshd(tmp_path):
    from test_multinode_ssh import Sshd, _ssh_unavailable

    reason = _ssh_unavailable()
    if reason:
        missing(reason)
    sshd = Sshd(tmp_path / "ssh")
    reason = sshd.ready()
    if reason:
        sshd.stop()
        missing(f"sshd could not listen: {reason}")
    return sshd


def _launch_until(args: list[str], env: dict, cwd: Path, until: str, timeout: float = 240) -> tuple[int | None, str]:
    """`mfm pretrain ARGS` in its own session until its output shows `until` or it exits; then
    its whole process group is killed. (exit code or None, output)."""
    log = cwd / "launcher.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "pretrain", *args],
            cwd=cwd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and until not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        code = proc.poll()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return code, log.read_text()


@pytest.mark.slow
def test_secrets_and_master_addr_through_real_pdsh_and_ssh(launchable, tmp_path):
    """Through DeepSpeed's pdsh runner and a real sshd on 127.0.0.1/127.0.0.2: a secret-looking
    variable DeepSpeed would export never shows in the launcher's output (its `cmd = ...` line
    included), and a --master-addr that is a shell command runs nowhere."""
    sshd = _sshd(tmp_path)
    try:
        hosts = tmp_path / "hosts"
        hosts.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
        secret = "sekrit-4f1c-value"
        env = {
            **os.environ,
            "PATH": os.pathsep.join([str(sshd.bin), str(Path(sys.executable).parent), os.environ["PATH"]]),
            "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_PASSWORD": secret,
            "NCCL_IB_SECRET_TOKEN": secret,
        }
        split = launchable.data.train
        common = ["--config", "tiny_cpu", "--set", f"data.train={split}", "--set", f"train.run_dir={tmp_path / 'r'}"]
        common += ["--hostfile", str(hosts), "--master-port", "29999"]
        target = tmp_path / "pwned"
        code, out = _launch_until(
            [*common, "--master-addr", f"127.0.0.1;touch${{IFS}}{target};#"], env, Path.cwd(), until="\0"
        )
        assert code != 0 and "--master-addr" in out
        time.sleep(1)
        assert not target.exists(), out[-3000:]

        code, out = _launch_until([*common, "--master-addr", "127.0.0.1"], env, Path.cwd(), until="cmd = ")
        assert "cmd = " in out and "pdsh" in out, out[-3000:]  # DeepSpeed logged the command it runs
        assert secret not in out
        assert "MLFLOW_TRACKING_PASSWORD is not passed to the other hosts" in out
    finally:
        sshd.stop()


# --- 5: private staging folders ---------------------------------------------------------------


@pytest.mark.parametrize("plant", ["open", "other-owner", "symlink"])
def test_a_planted_staging_mirror_is_refused(tmp_path, monkeypatch, plant):
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setenv("MFM_STAGING_DIR", str(staging))
    url = "s3://bucket/runs/victim"
    planted = ckpt.run_folder(url, StorageConfig(), create=False).local
    if plant == "symlink":
        (tmp_path / "attacker").mkdir()
        planted.symlink_to(tmp_path / "attacker")
    else:
        planted.mkdir()
        planted.chmod(0o777)
        if plant == "other-owner":
            planted.chmod(0o700)
            os.chown(planted, 65534, 65534)
    with pytest.raises(ckpt.CheckpointError, match=rf"{planted}: .*(not private|not owned|a link)"):
        ckpt.run_folder(url, StorageConfig())
    assert list((tmp_path / "attacker").iterdir() if plant == "symlink" else planted.iterdir()) == []


def test_staging_mirror_is_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MFM_STAGING_DIR", str(tmp_path / "staging"))
    a = ckpt.run_folder("s3://bucket/runs/mine", StorageConfig()).local
    assert (a.stat().st_mode & 0o777) == 0o700 and a.stat().st_uid == os.getuid()
    (a / "metrics.jsonl").write_text("{}\n")
    b = ckpt.run_folder("s3://bucket/runs/mine", StorageConfig()).local  # a restart finds its logs
    assert b == a and (b / "metrics.jsonl").exists()
    ckpt.reset_mirror(ckpt.run_folder("s3://bucket/runs/mine", StorageConfig()))
    assert (a.stat().st_mode & 0o777) == 0o700 and not (a / "metrics.jsonl").exists()


def test_a_planted_universal_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MFM_STAGING_DIR", str(tmp_path))
    folder = ckpt.run_folder(str(tmp_path / "run"), StorageConfig())
    planted = ckpt.universal_dir(folder, create=False)
    assert planted.parent == tmp_path and planted.name.startswith("mfm-universal-")
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    with pytest.raises(ckpt.CheckpointError, match="not private"):
        ckpt.universal_dir(folder)
    planted.rmdir()
    mine = ckpt.universal_dir(folder)
    assert mine == planted and (mine.stat().st_mode & 0o777) == 0o700


# --- 9: a COMPLETE without checksums ------------------------------------------------------------


def _old_step(tmp_path) -> tuple[Path, dict]:
    step = tmp_path / "run" / "step-4"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"state")
    marker = {"step": 4, "format_version": 1, "world_size": 1, "files": ["mp_rank_00_model_states.pt"]}
    (step / "COMPLETE").write_text(json.dumps(marker))
    return step, marker


def test_complete_without_checksums_is_refused(tmp_path):
    step, marker = _old_step(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"step-4.*no sha256.*train\.allow_unverified_checkpoints=true"):
        ckpt.verify(step, marker, "run/step-4")


def test_complete_without_checksums_loads_when_allowed(tmp_path, caplog):
    step, marker = _old_step(tmp_path)
    ckpt.verify(step, marker, "run/step-4", allow_unverified=True)
    assert "unverified" in caplog.text


def test_allow_unverified_is_a_config_key():
    cfg = load_config("tiny_cpu", ["train.allow_unverified_checkpoints=true"])
    assert cfg.train.allow_unverified_checkpoints is True
    assert load_config("tiny_cpu").train.allow_unverified_checkpoints is False


@pytest.mark.parametrize(
    "raw",
    [b"", b"[]", b'"x"', b'{"sha256": []}', b'{"sha256": {"a": 1}}', b'{"sha256": {}, "world_size": "2"}', b"\xff"],
)
def test_complete_of_the_wrong_shape_is_named(raw):
    with pytest.raises(ckpt.CheckpointError, match=r"run/step-4/COMPLETE"):
        ckpt.parse_marker(raw, "run/step-4")


# --- 1: flow parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["/root/.aws/credentials", "../../etc/passwd", "tiny_cpu.yaml", None, 3])
def test_flow_preset_must_be_a_shipped_name(tmp_path, preset):
    from pipeline.config import load_flow_config

    with pytest.raises(ConfigError, match=r"flow parameter preset=.*not a shipped preset"):
        load_flow_config(preset, None)


@pytest.mark.parametrize(
    "overrides", [{"train.run_dir=/x\ntrain.nprocs": 1}, {"a b": 1}, {"": 1}, {1: 2}, ["train.nprocs=2"]]
)
def test_flow_override_keys_must_be_dotted_keys(overrides):
    from pipeline.config import load_flow_config

    with pytest.raises(ConfigError, match="overrides"):
        load_flow_config("tiny_cpu", overrides)


@pytest.mark.parametrize("loader", ["os:system", "pipeline.data:build_eval_loader"])
def test_flow_overrides_cannot_choose_code_to_import(loader):
    from pipeline.config import load_flow_config

    with pytest.raises(ConfigError, match=r"overrides: train.loader=.*cannot be set by a flow run"):
        load_flow_config("tiny_cpu", {"train.loader": loader})
    assert load_flow_config("tiny_cpu", {"train.max_steps": 3}).train.max_steps == 3


@pytest.mark.parametrize(
    "params",
    [{"preset": "/etc/passwd"}, {"overrides": {"train.loader": "os:system"}}, {"finetune_preset": "../../etc/passwd"}],
)
def test_retrain_flow_parameters_are_checked_before_any_stage(tmp_path, params):
    from flows.retrain import retrain_flow

    with pytest.raises(ConfigError, match="flow parameter"):
        retrain_flow.fn(str(tmp_path / "source"), str(tmp_path / "store"), **params)
    assert not (tmp_path / "store").exists()


def test_evaluate_flow_preset_must_be_a_shipped_name(tmp_path):
    from flows.evaluate import evaluate_flow

    planted = tmp_path / "planted.yaml"
    planted.write_text("storage: {endpoint_url: 'http://attacker:9000'}\n")
    with pytest.raises(ConfigError, match=r"flow parameter preset=.*not a shipped preset"):
        evaluate_flow.fn(str(tmp_path / "export"), str(tmp_path / "val"), preset=str(planted))


def test_flow_parameters_reaching_the_launcher_are_checked(launchable, tmp_path):
    from flows.pretrain import pretrain_task

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    overrides = {"data.train": launchable.data.train, "train.run_dir": launchable.train.run_dir}
    with pytest.raises(ConfigError, match=r"flow parameter master_addr.*'10.0.0.1;reboot'"):
        pretrain_task.fn("tiny_cpu", overrides, str(hosts), "10.0.0.1;reboot")
    hosts.write_text("evil.host,node1 slots=1\n")
    with pytest.raises(ConfigError, match=rf"flow parameter hostfile\) {hosts}:1: the host is not"):
        pretrain_task.fn("tiny_cpu", overrides, str(hosts), "10.0.0.1")


def test_a_planted_log_folder_of_a_remote_run_is_refused(tmp_path, monkeypatch):
    from pipeline import logs

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv(logs.LOG_DIR_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    planted = logs.log_dir("s3://bucket/runs/victim")
    assert planted.parent == tmp_path
    (tmp_path / "victim-file").write_text("")
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    os.symlink(tmp_path / "victim-file", planted / "rank0.log")
    with pytest.raises(ckpt.CheckpointError, match="not private"):
        launcher.spawn_local("this_module_does_not_exist", [], 1, log_dir=planted)
    assert (tmp_path / "victim-file").read_text() == ""
