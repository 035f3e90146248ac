"""infra/gpu-checks.sh without a GPU: its step limits fit a lent device on paper, and its dry run
runs every step's command on the CPU (tiny preset, --device cpu), recording each figure in
summary.json, which `mfm bench summary` prints as the README's GPU table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "gpu-checks.sh"
SETUP_S = 60  # the setup block's two timeouts (wheels 30, DALI 30)


def _limits() -> dict[str, int]:
    text = SCRIPT.read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^\s*step ([a-z-]+) (\d+) ", text, re.M)}


def _call(name: str) -> list[str]:
    return re.search(rf'^{name}="([^"]+)"', SCRIPT.read_text(), re.M)[1].split()


def test_each_call_fits_its_budget_on_paper():
    limits = _limits()
    first, more = _call("first"), _call("more")
    assert set(first) | set(more) == set(limits)
    assert SETUP_S + sum(limits[s] for s in first) <= 480  # the default call: 8 minutes on a warm machine
    assert SETUP_S + sum(limits[s] for s in more) <= 600  # the second: one command's limit
    # a call brings back at most 8 files: summary.json, setup.txt and one log per step
    assert len(first) + 2 <= 8 and len(more) + 2 <= 8
    text = SCRIPT.read_text()
    assert "timeout 30 python3 -m pip" in text and "timeout 30 bash .dali/install.sh" in text
    assert f"setup 60 + data-gen {limits['data-gen']} + train {limits['train']}" in text  # the header's sums


def test_summary_table_without_figures_says_not_measured(capsys):
    from pipeline.benchmarks import cli

    assert cli(["summary"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "figure" not in line]
    assert rows and all(line.endswith("| not measured |") for line in rows)


@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out), "all"],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert set(steps) == set(_limits()), steps
    failed = {k: (out / f"{k}.txt").read_text()[-2000:] for k, v in steps.items() if v["exit"]}
    assert not failed, failed
    assert summary["env"]["dry_run"] == "1" and summary["env"]["dali"] != "none"
    for key in ("train", "train_matrix"):
        assert summary[key]["images_per_s_per_gpu"] > 0 and summary[key]["host_reads_per_step"] == 0
        assert summary[key]["mfu"] is None and summary[key]["matmul_utilization"] > 0  # a CPU: no datasheet
    assert summary["data"]["torch cpu"] > 0 and summary["data"]["dali cpu"] > 0
    assert 0 <= summary["dali_pretrain"]["data_wait_share"] <= 1 and summary["dali_pretrain"]["steps"] == 4
    assert "| ViT-B/16 with data.backend=dali: data-wait share |" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"summary.json", "setup.txt", *(f"{k}.txt" for k in steps)}
