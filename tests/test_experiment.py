"""`mfm experiment pretext-comparison` end to end at a microscopic scale: real sample data,
shards, DeepSpeed pretraining, registry, fine-tuning and frozen evaluation; then a rerun that
skips finished runs and redoes only a missing one."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline import sample_data
from pipeline.experiment import Settings, run_experiment

pytestmark = pytest.mark.skipif(not sample_data.fashion_mnist_available(), reason="Fashion-MNIST not installed")

ARGS = [
    "--pretexts",
    "mfm,denoise",
    "--seeds",
    "0",
    "--fractions",
    "0.5",
    "--per-class",
    "8",
    "--per-class-test",
    "4",
    "--pretrain-steps",
    "2",
    "--finetune-steps",
    "2",
    "--pretrain-batch",
    "16",
    "--finetune-batch",
    "8",
    "--probe-epochs",
    "2",
    "--pretrain-set",
    "optim.lr_base_batch=16",
    "--finetune-set",
    "finetune.label_smoothing=0.2",
]


def test_comparison_end_to_end_then_rerun_skips_finished_runs(tmp_path, caplog, capsys):
    from pipeline.cli import main
    from pipeline.experiment import parser
    from pipeline.registry import Registry

    out = tmp_path / "exp"
    assert main(["experiment", "pretext-comparison", "--out", str(out), *ARGS]) == 0

    res = out / "results"
    arms = ["random", "mfm", "denoise"]
    names = [f"{stage}-{a}-s0" for a in arms for stage in ("pretrain", "frozen")] + [
        f"finetune-{a}-s0-50pct" for a in arms
    ]
    assert sorted(p.stem for p in res.glob("*.json")) == sorted(names)
    for a in arms:
        ft = json.loads((res / f"finetune-{a}-s0-50pct.json").read_text())
        assert 0 <= ft["top1"] <= 1 and ft["num_samples"] == 40 and ft["labels_per_class"] == 4
        frozen = json.loads((res / f"frozen-{a}-s0.json").read_text())
        assert frozen["num_samples"] == 40 and 0 <= frozen["knn"]["top1"] <= 1 and "linear_probe" in frozen
        pre = json.loads((res / f"pretrain-{a}-s0.json").read_text())
        assert pre["ref"] == f"pretext-comparison-{a}-s0@v1"
    # the pretexts really trained (checkpoints at the last step); random init did not
    assert (out / "runs" / "pretrain-mfm-s0" / "step-2").is_dir()
    assert not list((out / "runs" / "pretrain-random-s0").glob("step-*"))

    table = (out / "pretext-comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "pretraining" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["none (random init)", "mfm", "denoise"]
    for arm, row in zip(arms, rows):  # the table shows the result files' numbers, as percent
        top1 = 100 * json.loads((res / f"finetune-{arm}-s0-50pct.json").read_text())["top1"]
        assert row.split("|")[2].strip() == f"{top1:.1f} ± 0.0"
    assert (
        "--pretexts mfm,denoise" in table
        and "--seeds 0" in table
        and "--finetune-set finetune.label_smoothing=0.2" in table
    )
    # the overrides reached the runs
    ft_config = (out / "runs" / "finetune-mfm-s0-50pct" / "config.yaml").read_text()
    assert "label_smoothing: 0.2" in ft_config and "mixup: 0.0" in ft_config and "randaugment: null" in ft_config
    png = (out / "pretext-comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # rerun after "an interruption" that lost one fine-tune's result: only that one runs again
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in res.glob("*.json")}
    (res / "finetune-denoise-s0-50pct.json").unlink()
    s = Settings(**vars(parser().parse_args(["--out", str(out), *ARGS])))
    with caplog.at_level(logging.INFO, logger="mfm.experiment"):
        run_experiment(s)
    ran = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run ")]
    assert ran == ["run finetune-denoise-s0-50pct"]
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in res.glob("*.json")}
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if "finetune-denoise" not in k} == {
        k: v for k, v in before.items() if "finetune-denoise" not in k
    }
    assert Registry(str(out.resolve() / "registry")).versions("pretext-comparison-mfm-s0") == [1]

    # results made with other settings are never mixed in
    with pytest.raises(ValueError, match="pretrain_steps"):
        run_experiment(Settings(**{**vars(s), "pretrain_steps": 3}))

    # the Prefect flow of the same name: same settings, so every run is found finished
    from prefect.testing.utilities import prefect_test_harness

    from flows.experiment import pretext_comparison_flow

    caplog.clear()
    with prefect_test_harness(server_startup_timeout=120):
        means = pretext_comparison_flow(
            out=str(out),
            pretexts=["mfm", "denoise"],
            seeds=[0],
            fractions=[0.5],
            pretrain_steps=2,
            finetune_steps=2,
            per_class=8,
            per_class_test=4,
            pretrain_batch=16,
            finetune_batch=8,
            probe_epochs=2,
            pretrain_set=["optim.lr_base_batch=16"],
            finetune_set=["finetune.label_smoothing=0.2"],
        )
    assert not [r for r in caplog.records if r.getMessage().startswith("run ")]
    top1 = 100 * json.loads((res / "finetune-mfm-s0-50pct.json").read_text())["top1"]
    assert list(means) == arms and means["mfm"]["finetune_50pct"] == round(top1, 2)
