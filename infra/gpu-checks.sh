#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA device: the Triton kernels against the
# literal spec, the kernel, data and training benchmarks, a short bf16 pretraining run through the
# real CLI, and the DALI GPU data path (docs/data-gpu.md): its tests, `mfm bench data --device
# cuda` (DALI GPU vs the torch backend vs torchvision's nvJPEG, hw_decoder_load swept) and a short
# ViT-B/16 pretraining with data.backend=dali reporting the data-wait share.
# Usage: bash infra/gpu-checks.sh [LOG_DIR [STEP...]]
#   steps: tests kernels data train pretrain dali-tests dali-data dali-pretrain
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
steps=${*:-tests kernels data train pretrain dali-tests dali-data dali-pretrain}
mkdir -p "$log"
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
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
  tail -n 25 "$log/$name.txt"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
}

pretrain() {
  local d
  d=$(mktemp -d)
  mfm sample-data --dest "$d/data" --per-class 40 &&
    mfm shard --source "$d/data/ilsvrc" --dest "$d/shards" &&
    mfm pretrain --config tiny_cpu --set data.train="$d/shards/train" --set data.val="$d/shards/val" \
      --set train.run_dir="$d/run" --set train.precision=bf16 --set data.backend=torch \
      --set optim.epochs=3 --set train.picture_every=5 --set train.checkpoint_every=5 &&
    tail -n 3 "$d/run/metrics.jsonl" && ls "$d/run" "$d/run/export"
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

export -f mfm pretrain synthetic dali_pretrain
step tests 150 'python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_kernels_bench.py'
step kernels 120 'mfm bench kernels --device cuda --repeats 20 --warmup 3'
step data 120 'mfm bench data --backends pil,torch --workers 8 --downscale bicubic --images 2048'
step train 150 'mfm bench train --gpu --steps 10 --warmup 3'
step pretrain 150 pretrain
if python3 -c 'import nvidia.dali' 2>/dev/null; then
  step dali-tests 150 'python3 -m pytest -q -p no:cacheprovider tests/test_data_dali.py tests/test_data_dali_cuda.py'
  step dali-data 240 'synthetic && mfm bench data --split /tmp/mfm-synthetic/train --device cuda \
    --backends torch,dali,nvjpeg --workers 12 --batch 256 --epochs 4 --downscale bicubic --hw-decoder-load 0.5,0.75,0.9,1.0'
  step dali-pretrain 200 dali_pretrain
else
  echo "== dali-*: DALI is not installed here (see the header), skipped"
fi
