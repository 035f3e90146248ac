"""Two nodes on one machine, launched exactly as infra/k8s-multinode-pretrain.yaml launches them:
the Job's container command, read from the manifest, run twice as two "pods" (node rank =
JOB_COMPLETION_INDEX 0 and 1, one rank each, rendezvous at 127.0.0.1), each in its own process
group with its own TMPDIR (its checkpoint staging), data and run_dir on the S3 endpoint.

Node loss: a node killed (its whole process group) and a node frozen (SIGSTOP on all of its
processes, as a hung machine keeps its sockets open): the survivor exits with a clear error
within train.dist_timeout_s, no rank of either node is left, and the same two commands resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "infra" / "k8s-multinode-pretrain.yaml"
STEPS = 6
TIMEOUT_S = 20  # train.dist_timeout_s here; a few minutes by default
# The pod environment a node replaces (tests/test_cluster_files.py checks that the Job sets them)
POD_OVERRIDES = (
    "NNODES",
    "GPUS_PER_NODE",
    "JOB_COMPLETION_INDEX",
    "MASTER_ADDR",
    "MASTER_PORT",
    "MFM_PRESET",
    "MFM_OVERRIDES",
    "OMP_NUM_THREADS",
)
pytestmark = pytest.mark.slow


def job_container(manifest: Path = MANIFEST) -> dict:
    """The trainer container of the manifest's Job."""
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def pod_command(manifest: Path = MANIFEST) -> tuple[list[str], dict[str, str]]:
    """The pod's argv (command + args) and its literal environment."""
    c = job_container(manifest)
    return [*c["command"], *c.get("args", [])], {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One simulated pod: the Job's command in its own session, TMPDIR and log."""

    def __init__(self, index: int, root: Path, port: int, overrides: dict, attempt: str):
        argv, pod_env = pod_command()
        self.tmp = root / f"node-{index}"  # the pod's local disk: survives between attempts here
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log = root / f"node-{index}-{attempt}.log"
        bindir = str(Path(sys.executable).parent)
        pod = {
            "NNODES": "2",
            "GPUS_PER_NODE": "1",
            "JOB_COMPLETION_INDEX": str(index),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "MFM_PRESET": "tiny_cpu",
            "MFM_OVERRIDES": "\n".join(f"{k}={v}" for k, v in overrides.items()),
            "OMP_NUM_THREADS": "1",
        }
        assert set(pod) == set(POD_OVERRIDES)
        env = {
            **os.environ,  # AWS_* from the s3_endpoint fixture: the pod's envFrom secret
            **pod_env,
            **pod,
            # what differs between pods on one machine, not in the manifest
            "TMPDIR": str(self.tmp),
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": str(REPO),
        }
        env.pop("MFM_STAGING_DIR", None)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def processes(self) -> list[psutil.Process]:
        """Every live process of this node (torchrun and its ranks), found by its TMPDIR."""
        mine = []
        for p in psutil.process_iter():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("TMPDIR") == str(self.tmp):
                    mine.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return mine

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """The node's whole process group, as when its pod or machine goes."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def freeze(self) -> list[psutil.Process]:
        procs = self.processes()
        for p in procs:
            p.suspend()
        return procs


def _start(root: Path, overrides: dict, attempt: str) -> list[Node]:
    port = _free_port()
    return [Node(i, root, port, overrides, attempt) for i in range(2)]


def _cleanup(nodes: list[Node]) -> None:
    for n in nodes:
        for p in n.processes():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if n.proc.poll() is None:
            n.kill()


def _finish(nodes: list[Node], timeout: float = 300) -> None:
    try:
        for n in nodes:
            assert n.wait(timeout) == 0, n.output()[-4000:]
    finally:
        _cleanup(nodes)


def _s3_keys(prefix: str) -> set[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="mfm-test", Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", [])}


def _s3_text(key: str) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return s3.get_object(Bucket="mfm-test", Key=key)["Body"].read().decode()


def _losses(metrics: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, metrics.splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def s3_data(s3_endpoint, tmp_path_factory) -> str:
    """80 training images (32 px) sharded straight onto the S3 endpoint."""
    from pipeline import sample_data
    from pipeline.sharding import shard_dataset

    root = tmp_path_factory.mktemp("data")
    sample = sample_data.build(str(root / "sample"), per_class=8, size=32)
    url = f"s3://mfm-test/multinode-data-{time.time_ns()}"
    shard_dataset(sample["folder"], url, shard_size_mb=1)
    return url


def _overrides(data: str, run_dir: str) -> dict:
    return {
        "data.train": f"{data}/train",
        "data.val": f"{data}/val",
        "train.run_dir": run_dir,
        "train.nprocs": 1,
        "data.backend": "torch",
        "data.workers": 0,
        "data.batch_size": 16,
        "train.max_steps": STEPS,
        "train.checkpoint_every": 2,
        "train.keep_last": 2,
        "train.log_every": 1,
        "train.picture_every": 100,
        "train.dist_timeout_s": TIMEOUT_S,
        "optim.warmup_epochs": 0,
    }


@pytest.fixture(scope="module")
def two_node_run(s3_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-node")
    run_dir = f"s3://mfm-test/runs/two-node-{time.time_ns()}"
    nodes = _start(root, _overrides(s3_data, run_dir), "first")
    _finish(nodes)
    return run_dir, nodes


def test_two_nodes_through_the_job_command_reach_a_checkpoint_and_an_export(two_node_run):
    run_dir, nodes = two_node_run
    prefix = run_dir.removeprefix("s3://mfm-test/")
    keys = _s3_keys(prefix)
    assert {k.split("/")[0] for k in keys if k.startswith("step-")} == {f"step-{STEPS - 2}", f"step-{STEPS}"}
    assert {"export/model.safetensors", "export/config.json", "metrics.jsonl", "config.yaml"} <= keys
    marker = json.loads(_s3_text(f"{prefix}/step-{STEPS}/COMPLETE"))
    assert marker["world_size"] == 2
    # Each rank's files reached S3, and each from its own node's staging folder: node 1 staged
    # only what rank 1 wrote, so rank 1's files on S3 prove that node 1 uploaded them.
    assert {"client-rank0.pt", "client-rank1.pt"} <= set(marker["files"])
    rank_files = {f for f in marker["files"] if "rank" in f}
    assert any("zero_pp_rank_1" in f for f in rank_files), rank_files
    assert set(marker["files"]) == {k.split("/", 1)[1] for k in keys if k.startswith(f"step-{STEPS}/")} - {"COMPLETE"}
    assert sorted(_losses(_s3_text(f"{prefix}/metrics.jsonl"))) == list(range(1, STEPS + 1))
    out = nodes[0].output()
    assert "2 ranks" in out and "done:" in out
    # and each node's staging folder is emptied after its upload, not only the first node's
    for n in nodes:
        assert not list(n.tmp.glob("mfm-run-*/step-*")), sorted(n.tmp.rglob("step-*"))


def _complete_steps(prefix: str) -> set[int]:
    return {int(k.split("/")[0][5:]) for k in _s3_keys(prefix) if k.startswith("step-") and k.endswith("/COMPLETE")}


def _wait_for_checkpoint(nodes: list[Node], prefix: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not _complete_steps(prefix):
        assert time.monotonic() < deadline, "no checkpoint in time:\n" + nodes[0].output()[-3000:]
        assert all(n.proc.poll() is None for n in nodes), "a node ended early:\n" + nodes[0].output()[-3000:]
        time.sleep(0.2)


def _no_rank_left(nodes: list[Node], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while any(n.processes() for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(p.pid, " ".join(p.cmdline())[:120]) for n in nodes for p in n.processes()]
    assert not left, left


@pytest.mark.parametrize("loss", ["killed", "frozen"])
def test_lost_node_fails_the_survivor_in_bounded_time_and_a_rerun_resumes(loss, s3_data, tmp_path, two_node_run):
    run_dir = f"s3://mfm-test/runs/{loss}-{time.time_ns()}"
    prefix = run_dir.removeprefix("s3://mfm-test/")
    overrides = _overrides(s3_data, run_dir)
    nodes = _start(tmp_path, overrides, "first")
    # The killed node is a worker node; the frozen one is node 0, which also hosts torchrun's
    # rendezvous store: the survivor must not wait on it either.
    victim, survivor = (nodes[1], nodes[0]) if loss == "killed" else (nodes[0], nodes[1])
    try:
        _wait_for_checkpoint(nodes, prefix)
        assert len(victim.processes()) >= 2  # torchrun and its rank
        start = time.monotonic()
        if loss == "killed":
            victim.kill()
        else:
            frozen = victim.freeze()
        code = survivor.wait(TIMEOUT_S + 60)
        elapsed = time.monotonic() - start
        out = survivor.output()
        assert code != 0, out[-3000:]
        print(f"{loss}: the survivor exited {elapsed:.1f} s after the loss")
        assert elapsed < (10 if loss == "killed" else TIMEOUT_S + 30), (elapsed, out[-3000:])
        assert "lost contact with" in out, out[-3000:]
        if loss == "frozen":
            assert all(p.status() == psutil.STATUS_STOPPED for p in frozen)
            victim.kill()  # the operator deletes the Job: its pods go, stopped or not
        _no_rank_left(nodes)
    finally:
        _cleanup(nodes)
    newest = max(_complete_steps(prefix))

    rerun = _start(tmp_path, overrides, "rerun")
    _finish(rerun)
    assert f"resuming at step {newest}" in rerun[0].output()
    resumed = _losses(_s3_text(f"{prefix}/metrics.jsonl"))
    uninterrupted = _losses(_s3_text(f"{two_node_run[0].removeprefix('s3://mfm-test/')}/metrics.jsonl"))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), (step, resumed, uninterrupted)
    assert "export/model.safetensors" in _s3_keys(prefix)
