"""`train.profile_steps=N`: a torch.profiler trace of N training steps, TensorBoard-readable.

The window opens after WARMUP steps from the run's (re)start, past torch.compile's first
graphs and the allocator's growth, so that it shows ordinary steps; the last of those steps is
the profiler's own warm-up. Rank 0 only: its run folder's `profile/` goes up with the other
logs at each checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("mfm.train")
WARMUP = 5


class StepProfiler:
    def __init__(self, steps: int, folder: Path, *, start_step: int, rank: int, cuda: bool):
        self.prof = None
        self.folder = folder
        self.write = torch.profiler.tensorboard_trace_handler(str(folder), worker_name=f"rank{rank}")
        if not steps or rank != 0:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities,
            # steps start+1 .. start+WARMUP-1 untraced, start+WARMUP the profiler's warm-up
            schedule=torch.profiler.schedule(wait=WARMUP - 1, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._ready,
        )
        self.start_step, self.steps = start_step, steps
        self.prof.start()

    def _ready(self, prof) -> None:
        self.write(prof)
        log.info(
            "profile of steps %d-%d: %s", self.start_step + WARMUP + 1, prof.step_num + self.start_step, self.folder
        )

    def after_step(self, step: int) -> None:
        """Call after every optimizer step."""
        if self.prof is not None:
            self.prof.step()

    def close(self) -> None:
        """Stop (a window cut short by the end of the run is written as it is)."""
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
