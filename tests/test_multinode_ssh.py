"""The hostfile path on one machine: `mfm pretrain --hostfile` naming two "hosts" (127.0.0.1 and
127.0.0.2), the DeepSpeed launcher reaching both through pdsh and ssh to a real sshd (Debian's
openssh-server, started here on a free port with throwaway keys). Skipped, with the reason,
where sshd or pdsh is missing or sshd cannot run; on CI (which installs them) that fails instead."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from environment import missing
from test_multinode import REPO, _free_port, _overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> str:
    """The same 80 images on a local folder: on one machine both "hosts" see it, like NFS."""
    from pipeline import sample_data
    from pipeline.sharding import shard_dataset

    root = tmp_path_factory.mktemp("local-data")
    sample = sample_data.build(str(root / "sample"), per_class=8, size=32)
    shard_dataset(sample["folder"], str(root / "shards"), shard_size_mb=1)
    return str(root / "shards")


class Sshd:
    """Debian's sshd on a free port of 127.0.0.1 and 127.0.0.2 with a throwaway host key and
    client key, and an `ssh` on PATH that uses them (pdsh and the DeepSpeed launcher run `ssh`)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.port = _free_port()
        for key in ("client", "host"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
        (root / "authorized_keys").write_bytes((root / "client.pub").read_bytes())
        (root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {root}/host\n"
            f"AuthorizedKeysFile {root}/authorized_keys\nPidFile {root}/sshd.pid\nUsePAM no\nStrictModes no\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        )
        (root / "ssh_config").write_text(
            f"Host 127.0.0.1 127.0.0.2\n  Port {self.port}\n  IdentityFile {root}/client\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
        )
        self.bin = root / "bin"
        self.bin.mkdir()
        (self.bin / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root}/ssh_config "$@"\n')
        (self.bin / "ssh").chmod(0o755)
        self.log = open(root / "sshd.log", "wb")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=self.log, stderr=subprocess.STDOUT
        )

    def ready(self, timeout: float = 10) -> str | None:
        """None once both addresses answer, else why not (sshd's own words)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                for host in ("127.0.0.1", "127.0.0.2"):
                    socket.create_connection((host, self.port), timeout=1).close()
                return None
            except OSError:
                time.sleep(0.1)
        return (self.root / "sshd.log").read_text().strip() or f"sshd exited with {self.proc.poll()}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


SSHD = "/usr/sbin/sshd"


def _ssh_unavailable() -> str | None:
    absent = [p for p, found in (("openssh-server", Path(SSHD).exists()), ("pdsh", shutil.which("pdsh"))) if not found]
    if absent:
        return f"{' and '.join(absent)} not installed (apt-get install -y openssh-server pdsh; make venv does)"
    if not Path("/run/sshd").is_dir():
        # Debian's sshd refuses to start without its privilege separation directory.
        if os.geteuid() != 0:
            return "sshd needs /run/sshd (its privilege separation directory), which only root can create"
        Path("/run/sshd").mkdir(mode=0o755)
    return None


def test_hostfile_path_trains_two_hosts_over_ssh(local_data, tmp_path):
    reason = _ssh_unavailable()
    if reason:
        missing(reason)
    sshd = Sshd(tmp_path / "ssh")
    try:
        reason = sshd.ready()
        if reason:
            missing(f"sshd could not listen on 127.0.0.1/127.0.0.2:{sshd.port}: {reason}")
        # Two "hosts" of one machine; 2 slots on the first so that its share of the cores shows.
        (tmp_path / "hosts").write_text("127.0.0.1 slots=2\n127.0.0.2 slots=1\n")
        launch_dir = tmp_path / "launch"  # remote ranks `cd` here; its .deepspeed_env reaches every host
        launch_dir.mkdir()
        # DeepSpeed JIT-builds its CPU shm op in each rank's environment; ranks started over ssh
        # rebuilt the shared build folder that local runs then rebuilt again (minutes each on 2
        # cores), so this test keeps a build folder of its own.
        extensions = Path(os.environ.get("TORCH_EXTENSIONS_DIR", REPO / ".cache" / "torch_extensions"))
        (launch_dir / ".deepspeed_env").write_text(
            f"TORCH_EXTENSIONS_DIR={extensions.with_name(extensions.name + '-ssh')}\nDS_BUILD_OPS=0\n"
        )
        run_dir = tmp_path / "run"
        overrides = {
            **_overrides(local_data, str(run_dir)),
            "data.batch_size": 12,
            "train.max_steps": 4,
            "train.dist_timeout_s": 60,
        }
        env = {
            **os.environ,
            "PATH": os.pathsep.join([str(sshd.bin), str(Path(sys.executable).parent), os.environ["PATH"]]),
            "PYTHONPATH": str(REPO),  # exported to every host by the launcher (PYTHON*)
        }
        args = ["--hostfile", str(tmp_path / "hosts"), "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
        for k, v in overrides.items():
            args += ["--set", f"{k}={v}"]
        log = tmp_path / "launcher.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "pretrain", "--config", "tiny_cpu", *args],
                cwd=launch_dir,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            code = proc.wait(timeout=540)  # a first run JIT-builds DeepSpeed's shm op
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out = log.read_text()
        assert code == 0, out[-4000:]
    finally:
        for p in psutil.process_iter():  # the ranks and launch.py of both "hosts" run in launch_dir
            try:
                if Path(p.cwd()).is_relative_to(tmp_path):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                pass
        sshd.stop()
    marker = json.loads((run_dir / "step-4" / "COMPLETE").read_text())
    assert marker["world_size"] == 3 and {"client-rank0.pt", "client-rank2.pt"} <= set(marker["files"])
    assert (run_dir / "export" / "model.safetensors").exists()
    # Both hosts were reached through sshd (pdsh prefixes each host's lines) ...
    assert "127.0.0.1: " in out and "127.0.0.2: " in out
    # ... and the first host's ranks shared its cores (the launcher sets no OMP_NUM_THREADS there).
    cores = len(os.sched_getaffinity(0))
    assert f"OMP_NUM_THREADS unset: {max(1, cores // 2)} threads per rank ({cores} cores / 2 ranks" in out, out[-3000:]
