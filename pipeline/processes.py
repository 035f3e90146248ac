"""The rule for every process the project starts (a rank, a loader, DALI or sharding worker, a
benchmark's server): it dies with the process that started it; and the CPUs they share."""

from __future__ import annotations

import ctypes
import os
import signal


def available_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def die_with_parent(parent: int | None = None) -> None:
    """Linux: SIGKILL this process when its parent exits (PR_SET_PDEATHSIG). A kernel signal, not
    a watchdog thread polling the parent: it fires at once, also while this process is blocked in
    C (a gloo/NCCL wait, DALI's worker loop). `parent`: the pid that started this process (default:
    the current parent); if it died before the signal was armed, exit now. Elsewhere: nothing."""
    parent = os.getppid() if parent is None else parent
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):  # not Linux
        return
    if os.getppid() != parent:
        os._exit(1)
