"""The Triton kernels of kernels.triton_frequency on CPU through Triton's interpreter, against the
literal formulation. TRITON_INTERPRET must be set before triton is imported, so the checks run
in a fresh interpreter (this file run as a script) and print their worst differences as JSON."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

CASES = [(2, 9, 7), (4, 15, 16), (2, 12, 14), (3, 32, 33)]  # 14: W//2+1 = 8 fills a tile; 33: several programs


def _check_all() -> dict:
    import torch

    from kernels import frequency as F
    from kernels import triton_frequency as T

    worst = {"corrupt": 0.0, "keep": 0.0, "loss": 0.0, "grad": 0.0, "target_grad": 0.0, "kernel_sum": 0.0}

    def note(key, value):
        worst[key] = max(worst[key], float(value.detach()))

    g = torch.Generator().manual_seed(0)
    for n, h, w in CASES:
        x = torch.rand(n, 3, h, w, generator=g)
        if h == 15:  # channels_last input must reach the kernels as a dense spectrum
            x = x.to(memory_format=torch.channels_last)
        hp = torch.arange(n) % 2 == 1
        for r, r2 in [(2, None), (3, 6)]:
            want, want_keep = F.literal_mask_frequencies(x, r, hp, radius2=r2)
            got, keep = F._mask_frequencies(x, r, hp, radius2=r2, backend="triton")
            note("corrupt", (got - want).abs().max())
            note("keep", (keep - want_keep).abs().max())
        keeps = [None, want_keep, (torch.rand(n, h, w, generator=g) < 0.3).float()]
        for keep in keeps:
            target = torch.randn(n, 3, h, w, generator=g)
            p1 = torch.randn(n, 3, h, w, generator=g)
            if h == 15:
                p1 = p1.to(memory_format=torch.channels_last)
            p1.requires_grad_(True)
            p2 = p1.detach().clone().requires_grad_(True)
            t2 = target.clone().requires_grad_(True)
            want = F.literal_frequency_loss(p1, target, keep)
            got = F._FrequencyLoss.apply(p2, t2, keep, None, "triton")
            (want * 3).backward()
            (got * 3).backward()
            note("loss", (got - want).abs())
            note("grad", (p2.grad - p1.grad).abs().max())
            note("target_grad", (t2.grad + p1.grad).abs().max())
            # The reduction kernel alone: the full-spectrum masked magnitude sum.
            z = torch.fft.rfft2(p1.detach() - target, norm="ortho")
            full = torch.fft.fft2(p1.detach() - target, norm="ortho").abs()
            removed = 1.0 if keep is None else torch.fft.ifftshift(1 - keep, dim=(-2, -1))[:, None]
            note("kernel_sum", (T.masked_magnitude_sum(z, keep, w) - (full * removed).sum()).abs() / full.sum())
    return worst


def test_triton_kernels_in_interpreter_match_literal():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(worst) == {"corrupt", "keep", "loss", "grad", "target_grad", "kernel_sum"}
    assert all(v <= 1e-4 for v in worst.values()), worst


def test_cpu_path_never_imports_triton(monkeypatch):
    # CPU-only machines may lack triton: kernels.frequency must not need it for CPU tensors.
    import torch

    from kernels import frequency as F

    monkeypatch.setitem(sys.modules, "triton", None)  # any `import triton` now raises
    monkeypatch.delitem(sys.modules, "kernels.triton_frequency", raising=False)
    F = importlib.reload(F)  # a module-level `import triton` would fail here
    x = torch.rand(2, 3, 8, 8)
    out, keep = F.mask_frequencies(x, 2, torch.tensor([False, True]))
    pred = out.clone().requires_grad_(True)
    F.frequency_loss(pred, x, keep).backward()
    assert pred.grad.abs().sum() > 0
    assert "kernels.triton_frequency" not in sys.modules


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(_check_all()))
