#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA device (DALI not needed): the Triton
# kernels against the literal spec, the kernel, data and training benchmarks, and a short bf16
# pretraining run through the real CLI.
# Usage: bash infra/gpu-checks.sh [LOG_DIR [STEP...]]   steps: tests kernels data train pretrain
set -uo pipefail
log=${1:-gpu-checks}
shift || true
steps=${*:-tests kernels data train pretrain}
mkdir -p "$log"
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mfm() { python3 -m pipeline.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$log/gpu.txt"

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

export -f mfm pretrain
step tests 150 'python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_kernels_bench.py'
step kernels 120 'mfm bench kernels --device cuda --repeats 20 --warmup 3'
step data 120 'mfm bench data --backends pil,torch --workers 8 --downscale bicubic --images 2048'
step train 150 'mfm bench train --gpu --steps 10 --warmup 3'
step pretrain 150 pretrain
