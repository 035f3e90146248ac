#!/usr/bin/env bash
# `make demo-server`: the mfm-retrain demo through a real Prefect server and process worker.
# Starts a local server (127.0.0.1, a free port, its own PREFECT_HOME), the process work pool
# and a worker, deploys every flow (`mfm deploy`), runs 'mfm-retrain/local' with the tiny CPU
# preset on sample data, waits for it, prints where the results are, and stops everything.
#
# Environment: PYTHON (default .venv/bin/python), DEMO_STORE (default demo-out),
# DEMO_PER_CLASS (sample images per class, default 40), DEMO_OVERRIDES / DEMO_FINETUNE /
# DEMO_EVAL (JSON: pretraining and fine-tuning config keys, pipeline.evaluation.run options),
# DEMO_KEEP_SERVER=1 to leave the server and worker running (the UI at the printed URL).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-$REPO/.venv/bin/python}
BIN=$(dirname "$PY")
STORE=$(realpath -m "${DEMO_STORE:-demo-out}")
OVERRIDES=${DEMO_OVERRIDES:-'{"train.max_steps": 60, "train.checkpoint_every": 20, "train.picture_every": 20}'}
EVAL=${DEMO_EVAL:-'{"corruptions": "gaussian_noise,contrast", "severities": "3", "probe_epochs": 10}'}
FINETUNE=${DEMO_FINETUNE:-'{"train.max_steps": 40, "train.checkpoint_every": 20}'}
POOL=mfm-process

export PREFECT_HOME="$STORE/prefect-home"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_API_HOST=127.0.0.1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
LOGS="$STORE/prefect-logs"
mkdir -p "$PREFECT_HOME" "$LOGS"

PIDS=()
stop() {
    [[ "${DEMO_KEEP_SERVER:-0}" == 1 ]] && { echo "server and worker left running: ${PIDS[*]} (kill -- -PID)"; return; }
    # Each was started in its own session: signal the whole group. The worker starts each flow
    # run in a group of its own (and training ranks die with their flow run): those first.
    for pid in "${PIDS[@]}"; do
        for child in $(pgrep -P "$pid" || true); do kill -TERM -- "-$child" 2>/dev/null || true; done
    done
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
}
trap stop EXIT
trap 'exit 130' INT TERM  # so that Ctrl-C and kill also stop the server and worker

echo "== Prefect server on $PREFECT_API_URL (log: $LOGS/server.log)"
setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$LOGS/server.log" 2>&1 &
PIDS+=($!)
"$PY" - "$PREFECT_API_URL/health" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 300  # first start migrates a fresh database: slow on a loaded machine
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=5).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"no Prefect server at {sys.argv[1]} after 300 s")
        time.sleep(1)
PY

echo "== deployments (mfm deploy: creates the $POOL pool if missing)"
"$PY" -m pipeline.cli deploy --pool "$POOL"

echo "== process worker (log: $LOGS/worker.log)"
setsid "$BIN/prefect" worker start --pool "$POOL" --type process >"$LOGS/worker.log" 2>&1 &
PIDS+=($!)

SAMPLE="$STORE/sample"
if [[ ! -d "$SAMPLE/folder" ]]; then
    "$PY" -m pipeline.cli sample-data --dest "$SAMPLE" --per-class "${DEMO_PER_CLASS:-40}" --size 32
fi

echo "== prefect deployment run 'mfm-retrain/local'"
"$BIN/prefect" deployment run 'mfm-retrain/local' \
    --param source="$SAMPLE/folder" --param store="$STORE" --param preset=tiny_cpu \
    --param overrides="$OVERRIDES" --param finetune_overrides="$FINETUNE" --param eval_options="$EVAL" --watch

echo "== results"
"$PY" - <<'PY'
import asyncio
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

async def latest():
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mfm-retrain"])),
                                            sort=ArtifactSort.CREATED_DESC, limit=1)
        return found[0].data if found else "no mfm-retrain artifact"

print(asyncio.run(latest()))
PY
