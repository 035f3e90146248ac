"""`train.profile_steps=N`: a torch.profiler trace of N training steps, TensorBoard-readable.

The window opens WARMUP steps after the run (re)starts, past torch.compile's first graphs and
the allocator's growth, so that it shows ordinary steps. Rank 0 only: its run folder's
`profile/` goes up with the other logs at each checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("mfm.train")
WARMUP = 5


class StepProfiler:
    def __init__(self, steps: int, folder: Path, *, start_step: int, rank: int, cuda: bool):
        self.steps = steps if rank == 0 else 0
        self.first = start_step + WARMUP  # profiled: steps first+1 .. first+steps
        self.folder = folder
        self.rank = rank
        self.cuda = cuda
        self.prof = None
        self.done = 0

    def after_step(self, step: int) -> None:
        """Call after every optimizer step (`step` is the number of the step just finished)."""
        if not self.steps:
            return
        if self.prof is None and step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(
                activities=activities,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(
                    str(self.folder), worker_name=f"rank{self.rank}"
                ),
            )
            self.prof.start()
        elif self.prof is not None:
            self.prof.step()
            self.done += 1
            if self.done == self.steps:
                self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends inside the window)."""
        if self.prof is not None:
            self.prof.stop()
            log.info("profile of %d steps: %s", self.done, self.folder)
            self.prof, self.steps = None, 0
