"""`mfm bench kernels` runs end to end on a tiny batch and prints a well-formed table."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.benchmarks import cli as bench_cli
from pipeline.benchmarks import kernels as bench


def test_cpu_table(capsys):
    assert (
        bench_cli(
            [
                "kernels",
                "--device",
                "cpu",
                "--batch",
                "2",
                "--size",
                "16",
                "--radius",
                "3",
                "--repeats",
                "2",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "CPU: batch 2x3x16x16" in out
    assert "[cpu 3/3] loss fwd+bwd" in err  # progress goes to stderr, the table to stdout
    for op in ("corruption", "loss forward", "loss fwd+bwd", "corruption + loss fwd+bwd"):
        row = re.search(rf"^{re.escape(op)}\s+([\d.]+) ms\s+([\d.]+) ms\s+([\d.]+)x$", out, re.M)
        assert row, op
        lit, ours, ratio = map(float, row.groups())
        assert lit > 0 and ours > 0 and ratio == pytest.approx(lit / ours, rel=0.05, abs=0.01)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without CUDA")
def test_gpu_request_without_cuda_says_not_measured(capsys):
    assert bench.cli(["--device", "cuda"]) == 1
    assert "GPU figures not measured" in capsys.readouterr().out


def test_roofline_share_is_bytes_over_time_against_peak(capsys):
    bench._print_table("GPU (test)", 4, 224, [("fused reduction", 0.002, 1500.0, 3000.0, "test")])
    assert "2.000 ms per batch, 1500 GB/s, 50% of 3000 GB/s peak (test)" in capsys.readouterr().out


def test_roofline_share_also_against_measured_copy(capsys):
    bench._print_table(
        "GPU (test)",
        4,
        224,
        [("fused reduction", 0.002, 1500.0, 3000.0, "test"), ("device copy", None, 2000.0, None, "measured")],
    )
    assert "50% of 3000 GB/s peak (test), 75% of the 2000 GB/s a device copy reaches" in capsys.readouterr().out
