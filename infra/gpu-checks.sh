#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA device: the Triton kernels against the
# literal spec, the kernel, data and training benchmarks (ViT-B/16 eager vs compiled x ZeRO
# stages x micro batches, TFLOP/s and MFU; ResNet-50; the loader-wait share), a short bf16
# ViT-B/16 pretraining run through the real CLI (compiled, profiled, MFU in its metrics), and
# the DALI GPU data path (docs/data-gpu.md): its tests, `mfm bench data --device cuda` (DALI
# GPU vs the torch backend vs torchvision's nvJPEG, hw_decoder_load swept) and a short
# ViT-B/16 pretraining with data.backend=dali reporting the data-wait share.
# Usage: bash infra/gpu-checks.sh [LOG_DIR [STEP...]]
#   steps: tests kernels data train pretrain train-resnet train-real dali-tests dali-data dali-pretrain
# Each step has a time limit and keeps what it measured before it (the training matrix writes
# its JSON row by row).
#
# Python packages the machine lacks (deepspeed, pydantic, hjson, webdataset, ...) travel as
# wheels in .whl/, made here by `bash infra/gpu-wheels.sh`; carry .whl and they are installed
# first. Issue 14's measurement in one call of at most 10 minutes (carry .whl, timeout_s 600):
#   bash infra/gpu-checks.sh $OUT/gpu train pretrain
# then, with device time left, a second call: bash infra/gpu-checks.sh $OUT/gpu train-resnet train-real
#
# DALI on a machine that cannot fetch it (the lent GPU machine takes at most 64 MiB per call):
#   1. here, from the repo root: bash ../shared/tools/dali-device-parts.sh   (-> .dali/part-XX,
#      .dali/install.sh, .dali/wheels.sha256; .dali/ is git-ignored)
#   2. back to back on the warm machine: one call per part carrying it (the first also carries
#      .dali/install.sh and .dali/wheels.sha256), command `ls -la .dali`
#   3. last call: bash infra/gpu-checks.sh gpu-checks dali-tests dali-data dali-pretrain
# This script installs DALI from .dali/ when the parts are there (install.sh checks their sha256
# first). A cold start between the calls loses the parts: install.sh then says which are missing;
# start again from 2. Without DALI the dali-* steps say so and are skipped.
set -uo pipefail
log=${1:-gpu-checks}
shift || true
steps=${*:-tests kernels data train pretrain train-resnet train-real dali-tests dali-data dali-pretrain}
mkdir -p "$log"
log=$(cd "$log" && pwd)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)
export log work
mfm() { python3 -m pipeline.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$log/gpu.txt"
if [ -f .dali/install.sh ] && ! python3 -c 'import nvidia.dali' 2>/dev/null; then
  bash .dali/install.sh 2>&1 | tee -a "$log/gpu.txt" && export PYTHONPATH="$PWD/.dali/site:$PYTHONPATH"
fi
python3 -c 'import nvidia.dali as d; print("DALI", d.__version__)' 2>&1 | tail -n 1 | tee -a "$log/gpu.txt"

step() {  # step NAME TIMEOUT_S 'COMMAND'
  local name=$1 limit=$2 cmd=$3
  [[ " $steps " == *" $name "* ]] || return 0
  echo "== $name"
  local t0=$SECONDS
  timeout "$limit" bash -c "$cmd" > "$log/$name.txt" 2>&1
  local rc=$?
  tail -n 30 "$log/$name.txt"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
}

shards() {  # sample ImageNet-like shards at 256 px, made once
  [[ -f "$work/shards/train/manifest.json" ]] && return 0
  mfm sample-data --dest "$work/data" --per-class 64 --size 256 > "$work/sample.txt" &&
    mfm shard --source "$work/data/ilsvrc" --dest "$work/shards" > "$work/shard.txt"
}

pretrain() {  # ViT-B/16 as the preset trains it (compile auto = on), 30 steps, 3 profiled
  shards || return 1
  mfm pretrain --config vit_b16_mfm --set data.train="$work/shards/train" --set data.val="$work/shards/val" \
    --set train.run_dir="$work/run" --set train.nprocs=1 --set data.batch_size=128 --set data.backend=torch \
    --set data.workers=12 --set optim.epochs=20 --set optim.warmup_epochs=1 --set train.max_steps=30 \
    --set train.log_every=10 --set train.checkpoint_every=30 --set train.picture_every=30 \
    --set train.profile_steps=3 &&
    cat "$work/run/metrics.jsonl" && ls -R "$work/run/profile" && cp "$work/run/metrics.jsonl" "$log/pretrain-metrics.jsonl"
}

synthetic() {  # 500x375 ImageNet-like JPEGs, written once for dali-data and dali-pretrain
  [ -f /tmp/mfm-synthetic/train/manifest.json ] ||
    python3 -c "from pipeline.benchmarks.data import synthetic_split as s; s('/tmp/mfm-synthetic/train', 6144, 1024, 500, 375)"
}

dali_pretrain() {  # ViT-B/16, bf16, one GPU, data.backend=dali: the data-wait share of each logged window
  local d
  d=$(mktemp -d)
  synthetic &&
    mfm pretrain --config vit_b16_mfm --set data.train=/tmp/mfm-synthetic/train --set data.val="$d/none" \
      --set train.run_dir="$d/run" --set train.nprocs=1 --set train.precision=bf16 --set data.backend=dali \
      --set data.batch_size=256 --set data.workers=12 --set train.max_steps=120 --set train.log_every=20 \
      --set train.checkpoint_every=100000 --set train.picture_every=100000 &&
    python3 -c "import json, sys; rows = [json.loads(l) for l in open('$d/run/metrics.jsonl')]
w = [r['data_wait'] for r in rows if r.get('data_wait') is not None]
print('data-wait share per window:', ['%.3f' % x for x in w]); print('after the first window: %.3f' % (sum(w[1:]) / max(1, len(w) - 1)))"
}

export -f mfm pretrain shards synthetic dali_pretrain
step tests 150 'python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_kernels_bench.py'
step kernels 120 'mfm bench kernels --device cuda --repeats 20 --warmup 3'
step data 120 'mfm bench data --backends pil,torch --workers 8 --downscale bicubic --images 2048'
# ViT-B/16: eager and compiled x ZeRO 0, 1, 2 x micro batch 64, 128, 256
step train 370 'mfm bench train --gpu --steps 10 --warmup 3 --json "$log/train.json"'
step pretrain 180 pretrain
step train-resnet 150 'mfm bench train --gpu --preset resnet50_mfm --stages 2 --micro-batches 128,256 --steps 10 --warmup 3 --json "$log/train-resnet.json"'
step train-real 150 'shards && mfm bench train --gpu --compile on --stages 2 --micro-batches 256 --steps 20 --warmup 5 --real-data "$work/shards/train" --workers 12 --json "$log/train-real.json"'
if python3 -c 'import nvidia.dali' 2>/dev/null; then
  step dali-tests 150 'python3 -m pytest -q -p no:cacheprovider tests/test_data_dali.py tests/test_data_dali_cuda.py'
  step dali-data 240 'synthetic && mfm bench data --split /tmp/mfm-synthetic/train --device cuda \
    --backends torch,dali,nvjpeg --workers 12 --batch 256 --epochs 4 --downscale bicubic --hw-decoder-load 0.5,0.75,0.9,1.0'
  step dali-pretrain 200 dali_pretrain
else
  echo "== dali-*: DALI is not installed here (see the header), skipped"
fi
