"""Prefect flow `mfm-retrain`: shard -> pretrain -> fine-tune -> evaluate -> register (gated promotion).

Each stage is one task run with retries for transient failures. A stage's result is persisted
and cached under a key made of everything it depends on (the flow's inputs, the source's
fingerprint and every earlier stage's result), so a rerun with the same inputs after a failure
loads the finished stages from the cache and continues at the one that failed. Behind the
cache the stages are idempotent on their own: sharding keeps a split whose manifest matches
(and adds a revision with only the new files when the source grew), pretraining resumes from
the newest complete checkpoint. `warm_start` continues pretraining from a registered model.

The stage list is data: a stage is "module:function" taking the context dict and returning the
keys it adds, plus the module it needs; a stage whose module is not installed is skipped with a
log line, as is fine-tuning when `finetune_preset` is None.

Over the ~400-line guide: the stages, their cache keys and the growth/warm-start decisions
form one flow whose keys must agree with each other; each stage itself is a call into pipeline.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS

from pipeline import storage
from pipeline.config import load_flow_config, override_strings

# Fault-injection drill: a stage named here raises InjectedFailure (retried like any
# transient error) so that "fails, then the rerun continues here" can be rehearsed and tested.
FAIL_ENV = "MFM_RETRAIN_FAIL_STAGE"


@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # "module:function", (ctx: dict) -> dict merged into ctx
    requires: str | None = None  # a module that must be installed, else the stage is skipped
    # Flow parameters only this stage reads: they join its input (and cache key) but not the
    # earlier stages', so changing e.g. eval_options re-runs evaluation, not training.
    params: tuple[str, ...] = ()


STAGES: tuple[Stage, ...] = (
    Stage("shard", "flows.retrain:shard_stage", "pipeline.sharding"),
    Stage("pretrain", "flows.retrain:pretrain_stage", "pipeline.training"),
    Stage("finetune", "flows.retrain:finetune_stage", "pipeline.finetune", ("finetune_preset", "finetune_overrides")),
    Stage("evaluate", "flows.retrain:evaluate_stage", "pipeline.evaluation", ("eval_options", "promote_metric")),
    Stage(
        "register",
        "flows.retrain:register_stage",
        "pipeline.registry",
        ("registry", "registry_name", "promote_metric", "promote_to", "higher_is_better"),
    ),
)


class InjectedFailure(RuntimeError):
    pass


def _config_error_types() -> tuple[type[BaseException], ...]:
    from pipeline.config import ConfigError
    from pipeline.registry import RegistryError
    from pipeline.sharding import ShardingError, SourceError

    # A wrong setting fails the same way every time: retrying only delays the report.
    return (
        ConfigError,
        ShardingError,
        SourceError,
        RegistryError,
        ValueError,
        TypeError,
        KeyError,
        ModuleNotFoundError,
        FileNotFoundError,
        PermissionError,
    )


def is_transient(exc: BaseException | None) -> bool:
    """Whether a failed stage is worth retrying (I/O hiccups, a crashed training process)."""
    if exc is None or isinstance(exc, _config_error_types()):
        return False
    from pipeline.training.launcher import LaunchError
    from pipeline.training.trainer import EXIT_NON_FINITE

    if isinstance(exc, LaunchError):
        return exc.code != EXIT_NON_FINITE  # a diverged run diverges again from the same checkpoint
    return True


def retry_condition(task, task_run, state) -> bool:
    return is_transient(state.result(raise_on_failure=False) if state.is_failed() else None)


def _installed(module: str | None) -> bool:
    try:
        return module is None or importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _stage_function(stage: Stage):
    module, func = stage.function.split(":")
    return getattr(importlib.import_module(module), func)


# `runtime` (where a stage runs, e.g. the Dask cluster) is no part of the cache key: the result
# is the same wherever it was computed.
@task(
    name="stage",
    persist_result=True,
    cache_policy=INPUTS - "runtime",
    retries=2,
    retry_condition_fn=retry_condition,
)
def run_stage(name: str, function: str, ctx: dict[str, Any], runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one stage on the context (and `runtime`); returns the keys it adds."""
    if os.environ.get(FAIL_ENV) == name:
        raise InjectedFailure(f"{FAIL_ENV}={name}: injected failure of stage {name!r}")
    return _stage_function(Stage(name, function))({**ctx, **(runtime or {})})


# ---------------------------------------------------------------------------- stages


def _storage(ctx: dict):
    from pipeline.config import load_config

    return load_config(ctx["preset"], override_strings(ctx["overrides"])).storage


def shard_stage(ctx: dict) -> dict:
    from flows.shard import dask_runner
    from pipeline.sharding import shard_dataset

    log = get_run_logger()
    cfg = _storage(ctx)
    current = {s: _revision(storage.join(ctx["shards"], s), cfg) for s in ctx["splits"]}
    # shard_dataset keeps a split whose manifest matches the source fingerprint, adds a revision
    # with only the new files to one whose source grew, and refuses other options.
    manifests = shard_dataset(
        ctx["source"],
        ctx["shards"],
        splits=ctx["splits"],
        storage=cfg,
        progress=None,
        runner=dask_runner(ctx.get("dask_address")),
        **ctx["shard_options"],
    )
    for split, before in current.items():
        m = manifests[split]
        rec = (m.get("revisions") or [{}])[-1]
        log.info(
            "shard %s: revision %d, %d samples in %d shards (%s)",
            split,
            m.get("revision", 1),
            m["num_samples"],
            len(m["shards"]),
            "current, nothing to do"
            if before == m.get("revision", 1)
            else f"{rec.get('shards', 0)} new shards of {rec.get('samples', 0)} samples",
        )
    return {
        "data": {s: storage.join(ctx["shards"], s) for s in manifests},
        "manifests": {
            s: {
                "num_samples": m["num_samples"],
                "shards": len(m["shards"]),
                "fingerprint": m["source"]["fingerprint"],
                "revision": m.get("revision", 1),
                # what this revision added (all of it for a first or rebuilt one)
                "new_shards": (m.get("revisions") or [{}])[-1].get("shards", len(m["shards"])),
                "new_samples": (m.get("revisions") or [{}])[-1].get("samples", m["num_samples"]),
            }
            for s, m in manifests.items()
        },
    }


def _revision(split_url: str, cfg) -> int | None:
    from pipeline.sharding import read_manifest

    try:
        return read_manifest(split_url, cfg).get("revision", 1)
    except FileNotFoundError:
        return None


def pretrain_stage(ctx: dict) -> dict:
    from dataclasses import asdict

    from pipeline.config import load_config
    from pipeline.training.launcher import launch

    cfg = load_config(ctx["preset"], override_strings(ctx["train_overrides"]))
    result = asdict(launch(cfg))
    get_run_logger().info(
        "pretrain: %d checkpoints in %s, export %s", len(result["checkpoints"]), result["run_dir"], result["export"]
    )
    if not result["export"]:
        raise RuntimeError(f"{result['run_dir']}: training finished without an export")
    return {
        "run_dir": result["run_dir"],
        "checkpoints": result["checkpoints"],
        "export": result["export"],
        "pretrained_export": result["export"],
        "model_run_dir": result["run_dir"],
        "pictures": result["pictures"],
    }


def _data_and_storage(overrides: dict[str, Any]) -> dict[str, Any]:
    # Loader and storage settings apply to every stage; model/optim/train keys are pretraining's.
    return {k: v for k, v in overrides.items() if k.startswith(("data.", "storage."))}


def finetune_stage(ctx: dict) -> dict:
    from pipeline.config import load_config
    from pipeline.finetune import launch

    overrides = {
        **_data_and_storage(ctx["train_overrides"]),
        "finetune.init": ctx["pretrained_export"],
        "train.run_dir": ctx["run_dir"] + "-finetune",
        **ctx["finetune_overrides"],
    }
    result = launch(load_config(ctx["finetune_preset"], override_strings(overrides)))
    get_run_logger().info(
        "finetune: top1 %.4f on %s; export %s", result.metrics["top1"], ctx["data"]["val"], result.export
    )
    if not result.export:
        raise RuntimeError(f"{result.run_dir}: fine-tuning finished without an export")
    return {"export": result.export, "model_run_dir": result.run_dir, "finetune_metrics": result.metrics_url}


def evaluate_stage(ctx: dict) -> dict:
    from pipeline.evaluation import run

    data_keys = override_strings(_data_and_storage(ctx["train_overrides"]))
    # Beside the evaluated run, not in its export/: fine-tuning keeps its own export/metrics.json.
    out = storage.join(ctx["model_run_dir"], "evaluation", "metrics.json")
    metrics, url = run(
        ctx["export"],
        ctx["data"]["val"],
        train_data=ctx["data"]["train"],
        preset=ctx["preset"],
        overrides=data_keys,
        out=out,
        **ctx["eval_options"],
    )
    from pipeline.registry import flatten_metrics

    flat = flatten_metrics(metrics)
    get_run_logger().info("evaluate: %s=%s -> %s", ctx["promote_metric"], flat.get(ctx["promote_metric"]), url)
    # The digest puts the report's contents (not just its URL) into the register stage's cache key.
    return {
        "metrics": url,
        "metrics_digest": _digest(metrics),
        "headline": {k: flat[k] for k in ("top1", "top5", ctx["promote_metric"]) if k in flat},
    }


def register_stage(ctx: dict) -> dict:
    from pipeline.registry import PromotionRefused, Registry

    log = get_run_logger()
    reg = Registry(ctx["registry"], _storage(ctx))
    ref = reg.register(
        ctx["registry_name"],
        ctx["export"],
        metrics_url=ctx["metrics"],
        data_manifest_url=storage.join(ctx["data"]["train"], "manifest.json"),
        run_config_url=storage.join(ctx["run_dir"], "config.yaml"),
    )
    out = {"model": str(ref), "promoted": None, "refused": None}
    if ctx["promote_to"]:
        try:
            out["promoted"] = reg.promote(
                ref, ctx["promote_to"], gate_metric=ctx["promote_metric"], higher_is_better=ctx["higher_is_better"]
            )
            log.info("register: %s is now %s@%s (%s)", ref, ctx["registry_name"], ctx["promote_to"], out["promoted"])
        except PromotionRefused as e:  # a worse model stays registered, not promoted: not a failure
            out["refused"] = str(e)
            log.info("register: %s registered, not promoted: %s", ref, e)
    return out


# ---------------------------------------------------------------------------- flow


def _abs(url: str) -> str:
    return url if "://" in url else str(Path(url).resolve())


def _fingerprints(source: str, splits: list[str], cfg) -> dict[str, str]:
    from pipeline.sharding.remote import source_listing

    # Part of every cache key: new or changed source files mean new shards, a new run, a new model.
    return {s: source_listing(source, s, cfg).fingerprint for s in splits}


def _pin_warm_start(warm_start: str | None, name: str, registry: str, preset: str, overrides: dict, log) -> str | None:
    """NAME@vN that `warm_start` names now, or None (not asked, or nothing registered there yet)."""
    if not warm_start:
        return None
    from pipeline.config import load_config
    from pipeline.registry import Registry, RegistryError

    ref = warm_start if "@" in warm_start else f"{name}@{warm_start}"
    reg = Registry(registry, load_config(preset, override_strings(overrides)).storage)
    try:
        pinned = str(reg.resolve(ref))
    except RegistryError as e:
        log.info("warm start: %s does not resolve (%s); pretraining from a random init", ref, e)
        return None
    log.info("warm start: pretraining continues from %s (%s now)", pinned, ref)
    return pinned


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@flow(name="mfm-retrain")
def retrain_flow(
    source: str,
    store: str = "demo-out",
    preset: str = "tiny_cpu",
    overrides: dict[str, Any] | None = None,
    finetune_preset: str | None = "finetune_tiny_cpu",
    finetune_overrides: dict[str, Any] | None = None,
    registry_name: str = "mfm-tiny",
    promote_metric: str = "knn.top1",
    promote_to: str | None = "production",
    higher_is_better: bool = True,
    registry: str | None = None,
    splits: list[str] | None = None,
    shard_options: dict[str, Any] | None = None,
    eval_options: dict[str, Any] | None = None,
    retry_delay_seconds: float = 30.0,
    refresh: bool = False,
    warm_start: str | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Shard `source` into `<store>/shards/<key>`, pretrain into `<store>/runs/<name>-<key>`,
    fine-tune into `...-finetune` (finetune_preset None: skipped), evaluate the resulting model,
    register it in `<store>/registry` (or `registry`) and promote it to `promote_to` when
    `promote_metric` beats the current holder. Returns where everything is.

    overrides: config keys (as for mfm-pretrain), e.g. {"train.max_steps": 50}; their data.* and
    storage.* keys apply to fine-tuning and evaluation too. finetune_overrides: fine-tuning's own.
    shard_options / eval_options: keyword arguments of shard_dataset / pipeline.evaluation.run.
    refresh: ignore cached stage results and run every stage again.
    warm_start: continue pretraining from a registered model instead of a random init: an alias
    of `registry_name` ("production") or a ref NAME@ALIAS. Pinned to the version it names when
    the flow starts (pretrain.init=NAME@vN, in the run's config.yaml and the new version's
    lineage); when it does not exist yet (a first run), pretraining starts from scratch.
    dask_address: a Dask scheduler (tcp://scheduler:8786) whose workers write the shards (as in
    mfm-shard); not part of any cache key, since the shards are the same wherever they are written.
    """
    # Parameters are untrusted, as in mfm-pretrain and mfm-finetune: shipped presets only, no train.loader
    load_flow_config(preset, overrides)
    if finetune_preset is not None:
        load_flow_config(finetune_preset, finetune_overrides)
    log = get_run_logger()
    store = _abs(store)
    splits = splits or ["train", "val"]
    overrides = dict(overrides or {})
    shard_options = dict(shard_options or {})
    fingerprints = _fingerprints(_abs(source), splits, _storage({"preset": preset, "overrides": overrides}))
    # One shard folder per sharding options, stable as the source grows: each run adds a revision
    # holding only the new files, and shards a running job reads are never rewritten.
    shards = storage.join(store, "shards", _digest({"options": shard_options}))
    base = {
        "source": _abs(source),
        "store": store,
        "preset": preset,
        "overrides": overrides,
        "splits": splits,
        "shards": shards,
        "shard_options": shard_options,
        "fingerprints": fingerprints,
    }
    registry_url = _abs(registry) if registry else storage.join(store, "registry")
    base["warm_start"] = _pin_warm_start(warm_start, registry_name, registry_url, preset, overrides, log)
    key = _digest({k: base[k] for k in ("shards", "fingerprints", "preset", "overrides", "warm_start")})
    # A run folder per (data, config): new data starts a new run instead of resuming a finished one.
    train_overrides = {
        "data.train": storage.join(shards, "train"),
        "data.val": storage.join(shards, "val"),
        "train.run_dir": storage.join(store, "runs", f"{registry_name}-{key}"),
        **({"pretrain.init": base["warm_start"], "pretrain.registry": registry_url} if base["warm_start"] else {}),
        **overrides,
    }
    ctx: dict[str, Any] = {**base, "train_overrides": train_overrides}
    params = {
        "eval_options": dict(eval_options or {}),
        "promote_metric": promote_metric,
        "registry": registry_url,
        "registry_name": registry_name,
        "promote_to": promote_to,
        "higher_is_better": higher_is_better,
        "finetune_preset": finetune_preset,
        "finetune_overrides": dict(finetune_overrides or {}),
    }
    if dask_address:
        from pipeline.sharding.cluster import check_address

        check_address(dask_address)  # before any stage runs
    runtime = {"dask_address": dask_address}
    options: dict[str, Any] = {"retry_delay_seconds": retry_delay_seconds, "refresh_cache": refresh}
    if "://" not in store:  # the cache lives with the run; on object storage, Prefect's local default
        options["result_storage"] = Path(store) / ".prefect-results"
    states: dict[str, str] = {}
    seconds: dict[str, float] = {}  # wall time per stage (a cached one: its loading)
    for stage in STAGES:
        why = (
            f"{stage.requires} is not installed"
            if not _installed(stage.requires)
            else "finetune_preset is None"
            if stage.name == "finetune" and not finetune_preset
            else None
        )
        if why:
            log.info("stage %s: skipped (%s)", stage.name, why)
            states[stage.name] = "Skipped"
            continue
        inputs = {**ctx, **{k: params[k] for k in stage.params}}
        started = time.monotonic()
        state = run_stage.with_options(name=stage.name, task_run_name=stage.name, **options)(
            stage.name, stage.function, inputs, runtime, return_state=True
        )
        states[stage.name] = state.name
        seconds[stage.name] = round(time.monotonic() - started, 1)
        if state.name == "Cached":
            log.info("stage %s: finished in an earlier run; result loaded from the cache", stage.name)
        ctx.update(state.result())  # raises for a failed stage, failing the flow
    result = {
        "shards": ctx["data"],
        "data": ctx["manifests"],
        "warm_start": ctx["warm_start"],
        "run_dir": ctx["run_dir"],
        "checkpoints": ctx["checkpoints"],
        "pretrained_export": ctx["pretrained_export"],
        "finetune_run_dir": ctx["model_run_dir"] if "finetune_metrics" in ctx else None,
        "export": ctx["export"],
        "pictures": ctx["pictures"],
        "metrics": ctx["metrics"],
        "headline": ctx["headline"],
        "registry": params["registry"],
        "model": ctx["model"],
        "promoted": ctx["promoted"],
        "refused": ctx["refused"],
        "stages": states,
        "seconds": seconds,
    }
    create_markdown_artifact(
        key="mfm-retrain",
        description="where mfm-retrain put everything",
        markdown="# mfm-retrain\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in result.items()),
    )
    return result


if __name__ == "__main__":
    import sys

    print(json.dumps(retrain_flow(*sys.argv[1:3]), indent=1))
