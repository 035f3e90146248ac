"""`mfm demo`: the main job on the embedded defaults, on a CPU, everything under one folder.

A picture of the frequency masking on real photos, then the sample data and the whole
mfm-retrain chain (shard -> pretrain -> fine-tune -> evaluate -> register) with the tiny CPU
preset, a local folder as object storage and Prefect in ephemeral mode (no server).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# Settings sized for under 10 minutes on an idle 2-core machine. train.max_steps sets the steps
# outright; with optim.epochs=1 the lr schedule is stretched to them.
PRETRAIN = {
    "optim.epochs": 1,
    "optim.warmup_epochs": 0.05,
    "train.max_steps": 1200,
    "train.checkpoint_every": 400,
    "train.picture_every": 200,
    "train.log_every": 50,
}
FINETUNE = {
    "optim.epochs": 1,
    "optim.warmup_epochs": 0.1,
    "train.max_steps": 600,
    "train.checkpoint_every": 300,
    "train.log_every": 50,
}
EVALUATE = {"corruptions": "gaussian_noise,contrast", "severities": "3", "probe_epochs": 10}


# What the demo promises, printed beside what it reached (Fashion-MNIST has 10 classes: chance is 10%).
TARGET_TOP1 = 0.60


def cli(argv: list[str]) -> int:
    from pipeline import logs

    p = argparse.ArgumentParser(prog="mfm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    p.add_argument("--per-class", type=int, default=1000, help="sample images per class (10 classes)")
    p.add_argument("-v", "--verbose", action="store_true", help="also show third-party output (else in OUT/logs)")
    args = p.parse_args(argv)
    if args.verbose:
        os.environ[logs.VERBOSE_ENV] = "1"
    # The first start of Prefect's ephemeral server migrates a database: slow on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from flows.retrain import retrain_flow
    from pipeline import sample_data
    from pipeline.pictures import demo_photos, save_masking_figure
    from pipeline.report import write_report

    out = Path(args.out).resolve()
    logs.quiet_prefect(out / "logs" / "prefect.log")
    start = time.monotonic()
    rows: list[tuple[str, float, str, str]] = []  # (stage, seconds, key figure, where)
    t0 = time.monotonic()
    figure = out / "masking.png"
    save_masking_figure(figure, demo_photos())
    rows.append(("masking picture", time.monotonic() - t0, "low- / high-pass spectra of real photos", str(figure)))
    print(f"== frequency masking of real photos: {figure}", flush=True)

    t0 = time.monotonic()
    sample = out / "sample"
    if not (sample / "folder").is_dir():
        summary = sample_data.build(str(sample), per_class=args.per_class, size=32)
        print(
            f"== sample data ({summary['source']}): {summary['train']} train / {summary['val']} val images", flush=True
        )
    rows.append(("sample data", time.monotonic() - t0, _counts(sample / "folder"), str(sample)))

    result = retrain_flow(
        str(sample / "folder"), str(out), overrides=PRETRAIN, finetune_overrides=FINETUNE, eval_options=EVALUATE
    )
    t0 = time.monotonic()
    report = write_report(result["model"], registry=result["registry"])
    rows += _flow_rows(result)
    rows.append(("report", time.monotonic() - t0, "config, curves, pictures, tables, lineage", report))
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(summary_table(rows))
    print(f"total: {(time.monotonic() - start) / 60:.1f} min")
    print(f"\nOpen first: {report}  (the latest reconstructions lead the page)")
    print(f"Everything mfm-retrain returned: {out / 'result.json'}")
    return 0


def _counts(folder: Path) -> str:
    n = {s: sum(1 for p in (folder / s).rglob("*") if p.is_file()) for s in ("train", "val")}
    return f"{n['train']} train / {n['val']} val images"


def _val_losses(run_dir: str) -> tuple[float, float, int] | None:
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return (vals[0][1], vals[-1][1], vals[-1][0]) if len(vals) > 1 else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _flow_rows(result: dict) -> list[tuple[str, float, str, str]]:
    secs, head = result.get("seconds", {}), result.get("headline", {})
    metrics = json.loads(Path(result["metrics"]).read_text())
    knn = (metrics.get("knn") or {}).get("top1")
    probe = (metrics.get("linear_probe") or {}).get("top1")
    robust = (metrics.get("robustness") or {}).get("mean_top1")
    val = _val_losses(result["run_dir"])
    pictures = result["pictures"][-1] if result["pictures"] else result["run_dir"]
    ok = lambda x: "" if x is None else (" (>= 60%: reached)" if x >= TARGET_TOP1 else " (< 60%: NOT reached)")  # noqa: E731
    return [
        ("shard", secs.get("shard", 0), "WebDataset tars + manifest per split", result["shards"]["train"]),
        (
            "pretrain (MFM)",
            secs.get("pretrain", 0),
            f"val_loss {val[0]:.3f} -> {val[1]:.3f} at step {val[2]}" if val else "no val_loss",
            pictures,
        ),
        (
            "fine-tune",
            secs.get("finetune", 0),
            f"top-1 {_pct(head.get('top1'))}{ok(head.get('top1'))}, chance 10%",
            result["finetune_run_dir"] or "",
        ),
        (
            "evaluate",
            secs.get("evaluate", 0),
            f"k-NN top-1 {_pct(knn)}{ok(knn)}; linear probe {_pct(probe)}; corrupted {_pct(robust)}",
            result["metrics"],
        ),
        (
            "register",
            secs.get("register", 0),
            f"{result['model']}, promoted: {bool(result['promoted'])}",
            result["registry"],
        ),
    ]


def summary_table(rows: list[tuple[str, float, str, str]]) -> str:
    """A plain-text table: stage, time, key figure, where the files are."""
    cells = [("stage", "time", "key figure", "where")] + [(s, f"{t:.0f} s", k, w) for s, t, k, w in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 5)
    return "\n== mfm demo: summary\n" + "\n".join(lines)
