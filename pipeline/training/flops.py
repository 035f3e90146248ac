"""FLOPs, peak and MFU: what a training image costs and how much of the chip a run uses.

FLOPs per image are counted once by torch's FlopCounterMode on a meta-device copy of the real
model, through the task's real forward, loss and backward (matmuls and convolutions: what MFU
counts; FFTs and elementwise work are free by that convention), never by a hand formula. MFU is
the standard definition: against the datasheet's dense bf16 peak of the exact device (GPUs in
DATASHEETS); beside it, matmul utilization: against the rate a large matmul reaches in this very
process (bf16 on a GPU, fp32 on a CPU), the figure a CPU run has.
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


@dataclass(frozen=True)
class Datasheet:
    name: str  # exactly as torch.cuda.get_device_name() reports it
    memory_gb: float  # the datasheet's memory (GB): one name may cover several parts
    bf16_tflops: float  # dense (no sparsity) bf16 tensor-core peak
    source: str


# NVIDIA's datasheets give bf16 "with sparsity"; the dense figure is half of it. Keyed on the
# exact name and the memory: an H100 NVL or H200 NVL (lower clocks and power) is no H100/H200 SXM,
# and an unknown part gets no figure rather than a guess.
_H100 = "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100)"
_H200 = "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200)"
_A100 = "NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100)"
DATASHEETS: tuple[Datasheet, ...] = (
    Datasheet("NVIDIA H100 80GB HBM3", 80, 989.0, f"H100 SXM: 1,979 sparse; {_H100}"),
    Datasheet("NVIDIA H100 PCIe", 80, 756.0, f"H100 PCIe: 1,513 sparse; {_H100}"),
    Datasheet("NVIDIA H100 NVL", 94, 835.0, f"H100 NVL: 1,671 sparse; {_H100}"),
    Datasheet("NVIDIA H200", 141, 989.0, f"H200 SXM: 1,979 sparse; {_H200}"),
    Datasheet("NVIDIA H200 NVL", 141, 835.0, f"H200 NVL: 1,671 sparse; {_H200}"),
    Datasheet("NVIDIA A100-SXM4-80GB", 80, 312.0, f"A100 SXM: 624 sparse; {_A100}"),
    Datasheet("NVIDIA A100-SXM4-40GB", 40, 312.0, f"A100 SXM: 624 sparse; {_A100}"),
    Datasheet("NVIDIA A100 80GB PCIe", 80, 312.0, f"A100 PCIe: 624 sparse; {_A100}"),
    Datasheet("NVIDIA A100-PCIE-40GB", 40, 312.0, f"A100 PCIe: 624 sparse; {_A100}"),
    Datasheet("NVIDIA L40S", 48, 362.0, "L40S: 733 sparse; NVIDIA L40S datasheet"),
    Datasheet("NVIDIA L4", 24, 121.0, "L4: 242 sparse; NVIDIA L4 datasheet"),
    Datasheet("NVIDIA A10", 24, 125.0, "A10: 250 sparse; NVIDIA A10 datasheet"),
)


def datasheet(device_name: str, memory_gib: float | None) -> Datasheet | None:
    """The row for this exact name whose memory is the device's: total_memory in GiB within 10% of
    the datasheet's GB (an 80 GB H100 reports 79.6 GiB, a 141 GB H200 140.4, a 48 GB L40S 45.0)."""
    for row in DATASHEETS:
        if row.name != device_name.strip():
            continue
        if memory_gib is None or abs(memory_gib / row.memory_gb - 1) <= 0.10:
            return row
    return None


def cuda_datasheet(device: torch.device) -> Datasheet | None:
    props = torch.cuda.get_device_properties(device)
    return datasheet(props.name, props.total_memory / 2**30)


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
    peak_tflops: float  # measured: the matmul rate this process reached
    peak_source: str
    datasheet_tflops: float | None  # the device's dense bf16 datasheet peak (None: CPU, unknown GPU)
    datasheet_source: str | None
    device: str
    memory: str  # what peak_memory_gib means on this device

    @classmethod
    def of(cls, flops_per_image: float, peak: Peak, device: torch.device) -> Speed:
        sheet = cuda_datasheet(device) if device.type == "cuda" else None
        return cls(
            flops_per_image,
            peak.tflops,
            peak.source,
            sheet.bf16_tflops if sheet else None,
            sheet.source if sheet else None,
            device_name(device),
            "cuda max allocated" if device.type == "cuda" else "process max RSS",
        )

    def figures(self, images_per_s_per_device: float | None) -> dict:
        """tflops (achieved, per device); mfu, the standard definition: model FLOPs against the
        datasheet's dense bf16 peak (None without one); matmul_utilization: against the bf16
        matmul rate this process measured, which tells how much of what the chip reaches today
        the model uses."""
        if not images_per_s_per_device:
            return {"tflops": None, "mfu": None, "matmul_utilization": None}
        tflops = self.flops_per_image * images_per_s_per_device / 1e12
        return {
            "tflops": tflops,
            "mfu": tflops / self.datasheet_tflops if self.datasheet_tflops else None,
            "matmul_utilization": tflops / self.peak_tflops,
        }

    def row(self) -> dict:
        return asdict(self)
