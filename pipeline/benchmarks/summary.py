"""`mfm bench summary FILE`: a `infra/gpu-checks.sh` summary.json as the README's GPU table.

gpu-checks.sh records each figure in summary.json the moment it is measured (`python -m
pipeline.benchmarks.summary record-* ...`, rewritten atomically), so a call cut short by its
time limit keeps everything measured before. The recorders also write the synthetic data the
checks read: many samples from a small pool of distinct JPEGs, so that 50k images take seconds
to write and an epoch end never falls inside a measurement.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from pathlib import Path

NOT_MEASURED = "not measured"


def load(path: str | Path) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


def record(path: str | Path, key: str, value) -> None:
    """summary[key] = value, written atomically, and printed."""
    p = Path(path)
    summary = load(p)
    summary[key] = value
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, p)
    print(f"summary.json: {key} = {json.dumps(value)}", flush=True)


def train_figures(result: dict) -> dict:
    """The fastest row of a `mfm bench train --gpu --json` result."""
    rows = [r for r in result.get("rows", []) if "error" not in r and r.get("images_per_s_per_gpu")]
    if not rows:
        return {"error": next((r["error"] for r in result.get("rows", []) if "error" in r), "no row measured")}
    best = max(rows, key=lambda r: r["images_per_s_per_gpu"])
    keys = (
        "name",
        "images_per_s_per_gpu",
        "tflops",
        "mfu",
        "matmul_utilization",
        "peak_memory_gib",
        "host_syncs_per_step",
        "host_reads_per_step",
        "warmup_s",
    )
    speed = result.get("speed") or {}
    return {
        **{k: best.get(k) for k in keys},
        "model": result.get("model"),
        "precision": result.get("precision"),
        "datasheet_tflops": speed.get("datasheet_tflops"),
        "measured_peak_tflops": speed.get("peak_tflops"),
    }


_ROW = re.compile(r"^(?P<loader>\S+)\s+(?P<device>cpu|cuda)\s+(?P<down>\S+)\s+(?P<rate>[0-9.]+)\s")


def data_figures(log: str) -> dict:
    """images/s per loader (e.g. "dali@0.5 cuda") from the final table of `mfm bench data`."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("loader ")), None)
    if start is None:
        return {}
    out = {}
    for line in lines[start + 1 :]:
        m = _ROW.match(line)
        if m:
            out[f"{m['loader']} {m['device']}"] = float(m["rate"])
    return out


def pretrain_figures(metrics_jsonl: str) -> dict:
    """The data-wait share of each logged window of a run, and its mean after the first (which
    holds the start: compiling, the loader's first batches)."""
    rows = [json.loads(line) for line in metrics_jsonl.splitlines() if line.strip()]
    logged = [r for r in rows if r.get("data_wait") is not None]
    waits = [r["data_wait"] for r in logged]
    later = waits[1:] or waits
    return {
        "steps": logged[-1]["step"] if logged else 0,
        "data_wait_per_window": waits,
        "data_wait_share": sum(later) / len(later) if later else None,
        "images_per_s": logged[-1].get("images_per_s") if logged else None,
        "mfu": logged[-1].get("mfu") if logged else None,
    }


def synthetic(dest: str, images: int, width: int, height: int, *, distinct: int = 256, per_shard: int = 1024) -> str:
    """A split of `images` samples (the shard contract: tars, .idx, manifest.json) cut from
    `distinct` photo-like JPEGs; made once (an existing manifest is kept)."""
    import numpy as np
    from PIL import Image

    from pipeline.sharding.tarfmt import TarWriter

    root = Path(dest)
    if (root / "manifest.json").exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(distinct):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    shards, i = [], 0
    while i < images:
        count = min(per_shard, images - i)
        name = f"train-{len(shards):06d}.tar"
        with open(root / name, "wb") as f, TarWriter(f) as tar:
            for _ in range(count):
                tar.add_sample(f"s{i:08d}", [("jpg", pool[i % distinct]), ("cls", str(i % 10).encode())])
                i += 1
        (root / name.replace(".tar", ".idx")).write_bytes(tar.index())
        size = (root / name).stat().st_size
        shards.append({"name": name, "index": name.replace(".tar", ".idx"), "samples": count, "bytes": size})
    manifest = {"format_version": 1, "split": "train", "num_samples": images, "shards": shards}
    (root / "manifest.json.tmp").write_text(json.dumps(manifest))
    os.replace(root / "manifest.json.tmp", root / "manifest.json")
    return dest


def _pct(x) -> str:
    return NOT_MEASURED if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = "{:,.0f}") -> str:
    return NOT_MEASURED if x is None else fmt.format(x)


def table(summary: dict) -> str:
    """The README's GPU table (markdown); every figure missing from the summary reads "not measured"."""
    env = summary.get("env") or {}
    train = summary.get("train") or {}
    data = summary.get("data") or {}
    dali = summary.get("dali_pretrain") or {}
    device = env.get("device") or NOT_MEASURED
    config = train.get("name") or "compiled, best stage and micro batch"
    sheet = train.get("datasheet_tflops")
    peak = train.get("measured_peak_tflops")
    loads = sorted(k for k in data if k.startswith("dali@") and k.endswith(" cuda"))
    rows = [
        ("device", device),
        (f"ViT-B/16 MFM 224 px bf16, {config}: images/s per GPU", _num(train.get("images_per_s_per_gpu"))),
        (
            f"MFU (model FLOPs / datasheet dense bf16 peak{f', {sheet:g} TFLOP/s' if sheet else ''})",
            _pct(train.get("mfu")),
        ),
        (
            f"matmul utilization (vs the measured bf16 matmul peak{f', {peak:.0f} TFLOP/s' if peak else ''})",
            _pct(train.get("matmul_utilization")),
        ),
        ("peak memory (GiB, cuda max allocated)", _num(train.get("peak_memory_gib"), "{:.1f}")),
        ("host syncs per ordinary step (CUDA sync debug mode)", _num(train.get("host_syncs_per_step"), "{:g}")),
        ("DALI GPU images/s, torch backend (CPU decode)", _num(data.get("torch cuda"))),
        *[(f"DALI GPU images/s, nvJPEG hw_decoder_load={k[5:-5]}", _num(data[k])) for k in loads],
        *([] if loads else [("DALI GPU images/s (hw_decoder_load sweep)", NOT_MEASURED)]),
        ("torchvision nvJPEG images/s", _num(data.get("nvjpeg cuda"))),
        ("ViT-B/16 with data.backend=dali: data-wait share", _pct(dali.get("data_wait_share"))),
    ]
    lines = ["| figure (`bash infra/gpu-checks.sh $OUT`) | value |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm bench summary", description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", help="summary.json written by infra/gpu-checks.sh (none: all 'not measured')")
    args = p.parse_args(argv)
    summary = load(args.file) if args.file else {}
    if args.file and not summary:
        print(f"mfm bench summary: {args.file} does not exist or holds nothing", file=sys.stderr)
        return 2
    print(table(summary))
    return 0


def _record_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.summary")
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("env", "train", "data", "pretrain", "step"):
        s = sub.add_parser(name)
        s.add_argument("summary")
        s.add_argument("values", nargs="*")
    s = sub.add_parser("synthetic")
    s.add_argument("dest")
    s.add_argument("images", type=int)
    s.add_argument("size", help="WxH")
    s.add_argument("--distinct", type=int, default=256)
    args = p.parse_args(argv)
    if args.what == "synthetic":
        w, h = (int(v) for v in args.size.split("x"))
        synthetic(args.dest, args.images, w, h, distinct=args.distinct)
        return 0
    v = args.values
    if args.what == "env":  # KEY=VALUE ...
        record(args.summary, "env", {**load(args.summary).get("env", {}), **dict(x.split("=", 1) for x in v)})
    elif args.what == "train":  # RESULT_JSON [KEY]
        record(args.summary, v[1] if len(v) > 1 else "train", train_figures(json.loads(Path(v[0]).read_text())))
    elif args.what == "data":  # BENCH_DATA_LOG
        record(args.summary, "data", data_figures(Path(v[0]).read_text()))
    elif args.what == "pretrain":  # METRICS_JSONL
        record(args.summary, "dali_pretrain", pretrain_figures(Path(v[0]).read_text()))
    else:  # NAME EXIT SECONDS LIMIT
        steps = load(args.summary).get("steps", {})
        steps[v[0]] = {"exit": int(v[1]), "seconds": int(v[2]), "limit_s": int(v[3])}
        record(args.summary, "steps", steps)
    return 0


if __name__ == "__main__":
    sys.exit(_record_main(sys.argv[1:]))
