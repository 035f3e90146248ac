"""FLOPs, peak and MFU: what a training image costs and how much of the chip a run uses.

FLOPs per image are counted once by torch's FlopCounterMode on a meta-device copy of the real
model, through the task's real forward, loss and backward (matmuls and convolutions: what MFU
counts; FFTs and elementwise work are free by that convention), never by a hand formula. The
peak is measured once by the run itself (a large bf16 matmul on a GPU, fp32 on a CPU) and,
for GPUs we know, also taken from the datasheet.
"""

from __future__ import annotations

import copy
import random
import resource
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

# Dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's datasheets. Matched as substrings
# of torch.cuda.get_device_name(), first match wins: longer names before their prefixes.
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def datasheet_tflops(device_name: str) -> float | None:
    return next((tflops for key, tflops in DATASHEET_BF16_TFLOPS if key in device_name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} threads"


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device: shapes only, no
    memory. Take it before torch.compile and DeepSpeed touch the model."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


class _Engine:
    """What a Task's forward expects of the DeepSpeed engine: callable, with `.module`."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def count_step_flops(meta_model: nn.Module, batch, forward) -> int:
    """FLOPs of forward + loss + backward of `forward(engine, batch) -> (loss, output)` (a
    trainer Task's) on the meta copy; `batch` may live anywhere, only its shapes are used."""
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import FlopCounterMode

    def to_meta(t):
        return torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t

    meta_batch = tree_map(to_meta, batch)
    meta_model.train()
    # A task's forward may draw random numbers (mixup): leave the run's draws as they were.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            loss, _ = forward(_Engine(meta_model), meta_batch)
            loss.backward()
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    meta_model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@dataclass(frozen=True)
class Peak:
    tflops: float
    source: str  # what was measured, e.g. "measured: bf16 matmul 8192^3"


def measure_peak(device: torch.device) -> Peak:
    """The dense matmul rate this process reaches: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU
    (with this rank's threads); the best of a few timed products after warm-up, since a peak is
    what the chip can do, and a busy moment only makes one product slower."""
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 10) if cuda else (1024, torch.float32, 6)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    kind = "bf16" if cuda else "fp32"
    return Peak(2 * n**3 / best / 1e12, f"measured: {kind} matmul {n}^3 on {device_name(device)}")


def peak_memory_gib(device: torch.device) -> float:
    """GPU: the caching allocator's peak of allocated memory; CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass(frozen=True)
class Speed:
    """The per-run constants behind TFLOP/s and MFU."""

    flops_per_image: float  # forward + backward of model and loss
    peak_tflops: float
    peak_source: str
    datasheet_tflops: float | None
    device: str
    memory: str  # what peak_memory_gib means on this device

    @classmethod
    def of(cls, flops_per_image: float, peak: Peak, device: torch.device) -> Speed:
        name = device_name(device)
        return cls(
            flops_per_image,
            peak.tflops,
            peak.source,
            datasheet_tflops(name) if device.type == "cuda" else None,
            name,
            "cuda max allocated" if device.type == "cuda" else "process max RSS",
        )

    def figures(self, images_per_s_per_device: float | None) -> dict:
        """tflops (achieved, per device), mfu (vs the measured peak), mfu_datasheet."""
        if not images_per_s_per_device:
            return {"tflops": None, "mfu": None, "mfu_datasheet": None}
        tflops = self.flops_per_image * images_per_s_per_device / 1e12
        return {
            "tflops": tflops,
            "mfu": tflops / self.peak_tflops,
            "mfu_datasheet": tflops / self.datasheet_tflops if self.datasheet_tflops else None,
        }

    def row(self) -> dict:
        return asdict(self)
