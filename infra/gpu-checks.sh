#!/usr/bin/env bash
# The GPU measurements, sized for a lent device (15 minutes in all, 10 per command).
#
#   bash infra/gpu-checks.sh OUT              the first call: at most 8 minutes on a warm machine
#   bash infra/gpu-checks.sh OUT more         the second, optional call: the rest
#   bash infra/gpu-checks.sh OUT STEP...      named steps (setup always runs first)
#   bash infra/gpu-checks.sh --dry-run OUT [STEP...]   every step of both calls on the CPU
#                                             (--device cpu, the tiny preset, a few images; CI runs it)
#
# First call (default), step limits on paper: setup 60 + data-gen 40 + train 150 + dali-data 90
#   + dali-pretrain 140 = 480 s (8 minutes):
#   setup          the carried wheels (.whl/, from `bash infra/gpu-wheels.sh`) and DALI (.dali/, below)
#   data-gen       51,200 synthetic 500x375 JPEG samples (cut from 256 distinct images: seconds to
#                  write) and an 8,192-sample split for the data sweep; 200 batches of 256, so the
#                  runs below never reach an epoch end
#   train          ViT-B/16 MFM, compiled, bf16, at the presets' ZeRO-1 and micro batch 256 per GPU:
#                  images/s, MFU (datasheet dense bf16 peak) and matmul utilization (measured
#                  peak), peak memory, host syncs (CUDA sync debug mode) and host reads per step
#   dali-data      `mfm bench data --device cuda`: DALI GPU at hw_decoder_load 0.5 and 0.9 vs the
#                  torch backend vs torchvision's nvJPEG, images/s
#   dali-pretrain  ViT-B/16 pretraining with data.backend=dali, 60 steps: the data-wait share
# Second call (`more`): setup 60 + tests 120 + kernels 60 + train-matrix 240 + pretrain 90 = 570 s
# (run it with timeout_s 600):
#   tests          the Triton kernels against the literal spec, the no-sync corruption and loss,
#                  DALI's CUDA tests
#   kernels        `mfm bench kernels --device cuda`
#   train-matrix   eager and compiled x ZeRO 0, 1, 2 at micro batch 256
#   pretrain       30 steps through the real CLI, torch backend, 3 of them profiled
#
# Every figure goes into OUT/summary.json the moment it is measured, and is printed, so a call
# cut short keeps what came before; `mfm bench summary OUT/summary.json` prints it as the
# README's GPU table. Each step's full output (DALI's and DeepSpeed's included) is OUT/STEP.txt:
# at most 7 files, within what a device call brings back (8).
#
# DALI on a machine that cannot fetch it (a call carries at most 64 MiB):
#   1. here, from the repo root: bash ../shared/tools/dali-device-parts.sh   (-> .dali/part-XX,
#      .dali/install.sh, .dali/wheels.sha256; .dali/ is git-ignored)
#   2. back to back on the warm machine: one call per part carrying it (the first also carries
#      .dali/install.sh and .dali/wheels.sha256), command `ls -la .dali`
#   3. last call, carrying .whl: bash infra/gpu-checks.sh $OUT
# setup installs DALI from .dali/ when the parts are there (install.sh checks their sha256
# first). A cold start between the calls loses the parts: install.sh then says which are missing.
# Without DALI the dali-* steps say so and record nothing.
set -uo pipefail
dry=0
if [ "${1:-}" = --dry-run ]; then
  dry=1
  shift
fi
out=${1:?usage: bash infra/gpu-checks.sh [--dry-run] OUT [more | STEP...]}
shift
first="data-gen train dali-data dali-pretrain"
more="tests kernels train-matrix pretrain"
steps=${*:-$first}
[ "$steps" = more ] && steps=$more
[ "$steps" = all ] && steps="$first $more"
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.json"
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 PREFECT_SERVER_ANALYTICS_ENABLED=false
py=${PYTHON:-python3}  # PYTHON: another interpreter (a venv's, as the CI test gives)

scale=1
if [ $dry = 1 ]; then  # the same commands at toy size on the CPU, whose limits are 4x (a busy CI machine)
  work=$(mktemp -d) scale=4
  device=cpu preset=tiny_cpu precision=fp32 compile=off micro=8 steps_n=2 warmup=1 workers=1 stages=1
  images=128 sweep=64 image_size=64x48 batch=16 pretrain_steps=4 log_every=2 loads=""
else
  work=/tmp/mfm-gpu-checks  # kept between the calls of one warm machine
  device=cuda preset=vit_b16_mfm precision=bf16 compile=on micro=256 steps_n=10 warmup=3 workers=12 stages=0,1,2
  images=51200 sweep=8192 image_size=500x375 batch=256 pretrain_steps=60 log_every=20 loads=0.5,0.9
fi
mkdir -p "$work"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mfm() { "$py" -m pipeline.cli "$@"; }
rec() { "$py" -m pipeline.benchmarks.summary "$1" "$summary" "${@:2}"; }

step() {  # step NAME LIMIT_S COMMAND: output to OUT/NAME.txt, its tail printed, exit and time recorded
  local name=$1 limit=$2 cmd=$3
  [[ " $steps " == *" $name "* ]] || return 0
  echo "== $name (limit $limit s)"
  local t0=$SECONDS
  timeout $((limit * scale)) bash -c "$cmd" > "$out/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.txt"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  rec step "$name" "$rc" "$((SECONDS - t0))" "$limit" > /dev/null
}

# setup, 60 s: wheels (30) and DALI (30)
{
  if [ $dry = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
    timeout 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || echo "setup: the wheels did not install"
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  if [ $dry = 0 ] && [ -f .dali/install.sh ] && ! "$py" -c 'import nvidia.dali' 2> /dev/null; then
    timeout 30 bash .dali/install.sh && export PYTHONPATH="$PYTHONPATH:$PWD/.dali/site"
  fi
  [ $dry = 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  uptime
} > "$out/setup.txt" 2>&1
cat "$out/setup.txt"
dali=$("$py" -c 'import nvidia.dali as d; print(d.__version__)' 2> /dev/null || echo none)
rec env "device=$("$py" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')" \
  "torch=$("$py" -c 'import torch; print(torch.__version__)')" "dali=$dali" "dry_run=$dry"
export py out work summary device preset precision compile micro steps_n warmup workers stages images sweep image_size batch \
  pretrain_steps log_every loads dali
export -f mfm rec

# data-gen: the synthetic splits, written once per machine
step data-gen 40 '"$py" -m pipeline.benchmarks.summary synthetic "$work/train" "$images" "$image_size" &&
  "$py" -m pipeline.benchmarks.summary synthetic "$work/sweep" "$sweep" "$image_size"'

# train: ZeRO-1 and micro batch 256 per GPU are the presets' (vit_b16_mfm: 2048 over 8 GPUs)
step train 150 'mfm bench train --gpu --device "$device" --preset "$preset" --compile "$compile" --stages 1 \
  --micro-batches "$micro" --steps "$steps_n" --warmup "$warmup" --json "$work/train.json"; rc=$?
  [ -f "$work/train.json" ] && rec train "$work/train.json"; exit $rc'

dali_data() {
  local backends=torch,dali,nvjpeg hw=()
  [ "$device" = cpu ] && backends=torch,dali
  # fancy upsampling on only: the on/off sweep would double the step past its limit
  [ -n "$loads" ] && hw=(--hw-decoder-load "$loads" --fancy-upsampling on)
  mfm bench data --split "$work/sweep" --device "$device" --backends "$backends" --workers "$workers" \
    --batch "$batch" --epochs 1 --downscale bicubic "${hw[@]}" | tee "$work/data.txt"
  local rc=$?
  rec data "$work/data.txt"
  return $rc
}

dali_pretrain() {  # data.val does not exist: no validation batch
  local run=$work/run-dali
  rm -rf "$run"
  mfm -v pretrain --config "$preset" --set data.train="$work/train" --set data.val="$work/none" \
    --set train.run_dir="$run" --set train.nprocs=1 --set train.precision="$precision" --set data.backend=dali \
    --set data.batch_size="$batch" --set data.workers="$workers" --set train.max_steps="$pretrain_steps" \
    --set train.log_every="$log_every" --set train.checkpoint_every=100000 --set train.picture_every=100000
  local rc=$?
  [ -f "$run/metrics.jsonl" ] && rec pretrain "$run/metrics.jsonl"
  return $rc
}

pretrain() {  # the real CLI, torch backend, profiled: MFU in metrics.jsonl
  local run=$work/run-torch
  rm -rf "$run"
  mfm -v pretrain --config "$preset" --set data.train="$work/train" --set data.val="$work/none" \
    --set train.run_dir="$run" --set train.nprocs=1 --set train.precision="$precision" --set data.backend=torch \
    --set data.batch_size="$batch" --set data.workers="$workers" --set train.max_steps=$((pretrain_steps / 2)) \
    --set train.log_every="$log_every" --set train.checkpoint_every=100000 --set train.picture_every=100000 \
    --set train.profile_steps=$((pretrain_steps > 10 ? 3 : 0)) && cat "$run/metrics.jsonl"
}
export -f dali_data dali_pretrain pretrain

if [ "$dali" != none ]; then
  step dali-data 90 dali_data
  step dali-pretrain 140 dali_pretrain
else
  echo "== dali-*: DALI is not installed here (see the header), skipped"
fi

step tests 120 '"$py" -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_data_dali_cuda.py'
step kernels 60 'if [ "$device" = cpu ]; then mfm bench kernels --device cpu --batch 2 --size 32 --repeats 1 --warmup 0
  else mfm bench kernels --device cuda --repeats 20 --warmup 3; fi'
step train-matrix 240 'both=both; [ "$device" = cpu ] && both=off
  mfm bench train --gpu --device "$device" --preset "$preset" --compile "$both" --stages "$stages" \
  --micro-batches "$micro" --steps "$steps_n" --warmup "$warmup" --json "$work/matrix.json"; rc=$?
  [ -f "$work/matrix.json" ] && rec train "$work/matrix.json" train_matrix; exit $rc'
step pretrain 90 pretrain

echo "== summary ($summary)"
"$py" -m pipeline.cli bench summary "$summary"
[ $dry = 1 ] && rm -rf "$work"
exit 0
