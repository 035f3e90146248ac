"""`mfm demo`: the main job on the embedded defaults, on a CPU, everything under one folder.

A picture of the frequency masking on real photos, then the sample data and the whole
mfm-retrain chain (shard -> pretrain -> fine-tune -> evaluate -> register) with the tiny CPU
preset, a local folder as object storage and Prefect in ephemeral mode (no server).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Settings sized for about 10 minutes on 2 cores.
PRETRAIN = {
    "optim.epochs": 10,
    "optim.warmup_epochs": 1,
    "train.max_steps": 60,
    "train.checkpoint_every": 20,
    "train.picture_every": 20,
}
FINETUNE = {"train.max_steps": 40, "train.checkpoint_every": 20}
EVALUATE = {"corruptions": "gaussian_noise,contrast", "severities": "3", "probe_epochs": 10}


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    p.add_argument("--per-class", type=int, default=40, help="sample images per class (10 classes)")
    args = p.parse_args(argv)
    # The first start of Prefect's ephemeral server migrates a database: slow on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from flows.retrain import retrain_flow
    from pipeline import sample_data
    from pipeline.pictures import demo_photos, save_masking_figure

    out = Path(args.out).resolve()
    figure = out / "masking.png"
    save_masking_figure(figure, demo_photos())
    print(f"== frequency masking of real photos: {figure}", flush=True)

    sample = out / "sample"
    if not (sample / "folder").is_dir():
        summary = sample_data.build(str(sample), per_class=args.per_class, size=32)
        print(
            f"== sample data ({summary['source']}): {summary['train']} train / {summary['val']} val images", flush=True
        )

    result = retrain_flow(
        str(sample / "folder"), str(out), overrides=PRETRAIN, finetune_overrides=FINETUNE, eval_options=EVALUATE
    )
    print("== mfm-retrain finished; where everything is:")
    print(json.dumps(result, indent=1, default=str))
    return 0
