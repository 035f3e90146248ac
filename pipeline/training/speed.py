"""The fast training step: torch.compile, channels_last, and a meter that keeps the loop off the host.

The loop reads nothing back from the device on ordinary steps: loss, grad norm and the first
non-finite step are summed on the device by `StepMeter` and reduced over ranks in one
collective (`read`) only on the steps that log or checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

from pipeline.config import Config, ConfigError


class CompileError(ConfigError):
    """torch.compile failed; never answered by quietly training eagerly."""


def resolve_compile(setting: str | bool, cuda: bool, zero_stage: int) -> bool:
    """train.compile: auto = on for CUDA with ZeRO 0-2, off on CPU (compiling costs minutes
    there and buys little); true works on CPU too."""
    if setting is True and zero_stage == 3:
        raise ConfigError(
            "train.compile=true does not work with train.zero_stage=3 (ZeRO-3 gathers parameters in "
            "module hooks that the compiled graph would skip); use zero_stage 0-2 or train.compile=false"
        )
    if setting == "auto":
        return cuda and zero_stage < 3
    return bool(setting)


def _channels_last(_module, args):
    return tuple(
        a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a
        for a in args
    )


def prepare_model(model: nn.Module, cfg: Config, device: torch.device) -> bool:
    """Before DeepSpeed wraps it: channels_last inputs for conv encoders on GPUs, and
    torch.compile when train.compile says so (in place: state dict keys stay as they are).
    Returns whether the model is compiled."""
    from pipeline.models import is_vit

    cuda = device.type == "cuda"
    if cuda and not is_vit(cfg.model.name):
        # cuDNN runs a convolution in NHWC when its input or its weight is channels_last. The
        # input is the one to convert: ZeRO flattens the weights into contiguous buffers.
        model.register_forward_pre_hook(_channels_last)
    compiled = resolve_compile(cfg.train.compile, cuda, cfg.train.zero_stage)
    if compiled:
        # Past the recompile limit dynamo would run eagerly without a word; stop instead.
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        model.compile()
    return compiled


@contextlib.contextmanager
def compile_errors(compiled: bool):
    """Turn a torch.compile failure (raised at the first forward or backward) into an error
    that names the setting."""
    if not compiled:
        yield
        return
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as e:
        cause = getattr(e, "inner_exception", None) or e  # a backend's own error, when it raised one
        lines = str(cause).strip().splitlines()
        raise CompileError(
            f"train.compile: torch.compile of the model failed ({type(cause).__name__}: "
            f"{lines[0] if lines else type(e).__name__}); "
            "fix the model or set train.compile=false to train eagerly"
        ) from e


@dataclass
class Reading:
    loss: float  # mean over steps and ranks since the last read
    grad_norm: float | None  # mean over those steps
    first_non_finite: int | None  # the first step whose loss or grad norm was not finite, on any rank


class StepMeter:
    """Per-step loss and grad norm summed on the device; `read` is the only sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        # loss sum, steps, grad-norm sum, grad-norm count
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.first_bad = torch.zeros((), dtype=torch.float64, device=self.device)
        self.host_grad = [0.0, 0]  # engines that hand out the norm as a Python float

    def add(self, loss: torch.Tensor, grad_norm, step: int) -> None:
        loss = loss.detach().to(torch.float64).reshape(())
        one = torch.ones((), dtype=torch.float64, device=self.device)
        finite = torch.isfinite(loss)
        if isinstance(grad_norm, torch.Tensor):
            norm = grad_norm.detach().to(device=self.device, dtype=torch.float64).reshape(())
            self.sums.add_(torch.stack([loss, one, norm, one]))
            finite = finite & torch.isfinite(norm)  # a step the trainer's clipping did not skip
        else:
            self.sums[:2].add_(torch.stack([loss, one]))
            if grad_norm is not None:
                self.host_grad[0] += float(grad_norm)
                self.host_grad[1] += 1
        bad = (self.first_bad == 0) & ~finite
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def read(self) -> Reading:
        """Collective (every rank): reduce, read once, reset."""
        totals = self.sums.clone()
        dist.all_reduce(totals)  # gloo has no AVG: sum, then divide
        loss_sum, steps, norm_sum, norm_n = totals.tolist()
        first_bad = None
        if not (math.isfinite(loss_sum) and math.isfinite(norm_sum)):
            # Every rank sees the same non-finite total, so every rank joins this collective.
            bad = torch.where(self.first_bad > 0, self.first_bad, torch.full_like(self.first_bad, float("inf")))
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            first_bad = int(bad.item()) if bad.item() != float("inf") else None
        host_sum, host_n = self.host_grad
        grad = norm_sum / norm_n if norm_n else (host_sum / host_n if host_n else None)
        self.reset()
        return Reading(loss_sum / steps if steps else float("nan"), grad, first_bad)


# Tensor methods that hand a tensor's value to Python: on a GPU each waits for the device.
_READS = frozenset({"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"})
_TORCH = str(Path(torch.__file__).parent)
# torch's optimizers read their CPU step counter (`_get_value` in torch/optim/optimizer.py):
# a Python int on the host, no device sync; a CUDA run keeps it on the host too.
_NOT_A_SYNC = (str(Path(torch.__file__).parent / "optim"),)


def _is_cpu(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


class HostReads(TorchFunctionMode):
    """Counts the reads of tensor values into Python made while it is active (item, bool(),
    float(), int(), tolist, numpy, .cpu(), .to("cpu") off a device), by the first caller outside
    torch ("file:line"): on a GPU each is a host sync. The CPU proxy of torch's sync debug mode,
    which only CUDA has; it counts the trainer's and DeepSpeed's reads alike."""

    def __init__(self):
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READS or (name == "to" and _to_cpu(args, kwargs)):
            site = _caller()
            if site is not None:
                self.sites[site] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.sites.values())


def _to_cpu(args, kwargs) -> bool:
    """A copy from another device to the host. On a CPU run every tensor is on the host, where
    DeepSpeed's `.to(accelerator device)` is `.to("cpu")` too: only `.cpu()` counts there."""
    source = args[0] if args else None
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    on_device = isinstance(source, torch.Tensor) and source.device.type != "cpu"
    return on_device and target is not None and _is_cpu(target)


def _caller() -> str | None:
    """The first frame outside torch and this module, as "path:line"; None for a read that is
    no sync (torch's optimizers' host step counter)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_NOT_A_SYNC):
            return None
        if not path.startswith(_TORCH) and path != __file__:
            return f"{path}:{frame.f_lineno}"
        frame = frame.f_back
    return None
