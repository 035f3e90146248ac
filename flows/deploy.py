"""`mfm deploy`: create or update the Prefect deployments of the MFM flows on a work pool.

One machine: a process work pool (`mfm-process`, created if missing); the deployments run the
flows from this checkout (`flow.from_source(<repo>, "flows/x.py:fn")`, so the worker changes into
the repo) with the worker's Python. Clusters (`--kubernetes`): a Kubernetes work pool
(`mfm-k8s`, base job template infra/k8s-work-pool.json) and flows addressed by module path
inside the image built from infra/Dockerfile.

    mfm deploy                                  # mfm-process, deployments named "local"
    mfm deploy --kubernetes --image REG/mfm-pipeline:TAG
    prefect deployment run 'mfm-pretrain/local' --param preset=tiny_cpu --watch

`mfm-retrain` gets a weekly cron schedule, inactive unless --schedule-active (switch it on
later with `prefect deployment schedule resume`). The same deployments, declaratively:
prefect.yaml (`prefect deploy --all`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
K8S_TEMPLATE = REPO / "infra" / "k8s-work-pool.json"
RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00 UTC: after the weekly data drop, before the working week


@dataclass(frozen=True)
class FlowSpec:
    entrypoint: str  # "flows/x.py:function"
    description: str
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return self.entrypoint.split(":")[0].removesuffix(".py").replace("/", ".")

    @property
    def function(self) -> str:
        return self.entrypoint.split(":")[1]


FLOWS: tuple[FlowSpec, ...] = (
    FlowSpec("flows/shard.py:shard_flow", "shard a dataset into WebDataset tars + manifest", ("data",)),
    FlowSpec("flows/pretrain.py:pretrain_flow", "MFM pretraining with DeepSpeed (resumes)", ("train", "gpu")),
    FlowSpec("flows/finetune.py:finetune_flow", "fine-tune a pretrained encoder", ("train", "gpu")),
    FlowSpec("flows/evaluate.py:evaluate_flow", "accuracy, robustness, k-NN, linear probe", ("eval",)),
    FlowSpec("flows/register.py:register_flow", "register an export, gated promotion", ("registry",)),
    FlowSpec(
        "flows/retrain.py:retrain_flow", "shard -> pretrain -> fine-tune -> evaluate -> register", ("retrain", "gpu")
    ),
)


def available(spec: FlowSpec):
    """The flow object, or None when its module is not part of this checkout yet."""
    try:
        return getattr(importlib.import_module(spec.module), spec.function)
    except ModuleNotFoundError as e:
        if e.name == spec.module:
            return None
        raise


def ensure_pool(name: str, kind: str) -> bool:
    """Create the work pool if missing (process: Prefect's default template; kubernetes: ours).
    Returns True when it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        if kind == "kubernetes":
            template = json.loads(K8S_TEMPLATE.read_text())
        else:
            from prefect.workers.process import ProcessWorker

            template = ProcessWorker.get_default_base_job_template()
        client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
        return True


def build_deployments(
    *,
    kubernetes: bool,
    name: str,
    pool: str,
    schedule_active: bool,
    retrain_parameters: dict[str, Any] | None,
    image: str | None = None,
) -> list:
    from prefect import Flow
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    out = []
    for spec in FLOWS:
        flow = available(spec)
        if flow is None:
            print(f"mfm deploy: {spec.entrypoint} is not in this checkout; {spec.module} not deployed", file=sys.stderr)
            continue
        kwargs: dict[str, Any] = {
            "name": name,
            "description": spec.description,
            "work_pool_name": pool,
            "tags": ["mfm", *spec.tags],
            "parameters": dict(spec.parameters),
        }
        if spec.function == "retrain_flow":
            kwargs["parameters"].update(retrain_parameters or {})
            kwargs["schedules"] = [Cron(RETRAIN_CRON, timezone="UTC", active=schedule_active)]
        if kubernetes:
            # Code is in the image (infra/Dockerfile), installed as a package: address it by module.
            kwargs["job_variables"] = {"image": image} if image else {}
            out.append(flow.to_deployment(entrypoint_type=EntrypointType.MODULE_PATH, **kwargs))
        else:
            # The worker changes into this checkout and loads the file, so relative store paths
            # such as demo-out resolve here, as they do for `make demo`.
            out.append(Flow.from_source(str(REPO), spec.entrypoint).to_deployment(**kwargs))
    return out


def deploy(
    *,
    pool: str | None = None,
    kubernetes: bool = False,
    name: str | None = None,
    schedule_active: bool = False,
    retrain_parameters: dict[str, Any] | None = None,
    image: str | None = None,
) -> list[str]:
    """Create the pool if missing and apply every deployment; returns "flow/deployment" names."""
    from prefect import deploy as prefect_deploy

    pool = pool or ("mfm-k8s" if kubernetes else "mfm-process")
    name = name or ("k8s" if kubernetes else "local")
    if ensure_pool(pool, "kubernetes" if kubernetes else "process"):
        print(f"created work pool {pool!r}")
    deployments = build_deployments(
        kubernetes=kubernetes,
        name=name,
        pool=pool,
        schedule_active=schedule_active,
        retrain_parameters=retrain_parameters,
        image=image,
    )
    # build/push False: images come from infra/Dockerfile through CI, never from a deploy command.
    prefect_deploy(
        *deployments,
        work_pool_name=pool,
        image=image if kubernetes else None,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )
    return [f"{d.flow_name}/{d.name}" for d in deployments]


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mfm deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pool", help="work pool name (default mfm-process, or mfm-k8s with --kubernetes)")
    p.add_argument("--kubernetes", action="store_true", help="Kubernetes work pool, flows from the image")
    p.add_argument("--image", help="image for --kubernetes (default: the pool template's)")
    p.add_argument("--name", help="deployment name (default: local, or k8s with --kubernetes)")
    p.add_argument("--schedule-active", action="store_true", help=f"switch on mfm-retrain's cron ({RETRAIN_CRON} UTC)")
    p.add_argument(
        "--retrain-param",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="default parameter of the mfm-retrain deployment (the schedule's runs use these), "
        "e.g. source='\"s3://bucket/imagenet\"'",
    )
    args = p.parse_args(argv)
    params = {}
    for item in args.retrain_param:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--retrain-param {item!r}: expected KEY=JSON")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value  # a bare string, as with `prefect deployment run --param`
    names = deploy(
        pool=args.pool,
        kubernetes=args.kubernetes,
        name=args.name,
        schedule_active=args.schedule_active,
        retrain_parameters=params,
        image=args.image,
    )
    for n in names:
        print(f"deployed {n}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
