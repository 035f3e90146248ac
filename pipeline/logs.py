"""Where output goes: the pipeline's own log lines and progress bars to the terminal; everything
else a training process prints (DeepSpeed's op-builder compiler probes, accelerator and CUDA
warnings, C-level output) and Prefect's temporary-server chatter to log files only.
`mfm -v ...` (MFM_VERBOSE=1) keeps all of it on the terminal, as before.

A launched rank gets its log file as stdout and stderr from the very start (so that imports'
noise lands there too) and the terminal as an extra inherited descriptor (MFM_CONSOLE_FD).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

VERBOSE_ENV = "MFM_VERBOSE"
LOG_DIR_ENV = "MFM_LOG_DIR"
CONSOLE_FD_ENV = "MFM_CONSOLE_FD"
OWN = ("mfm", "pipeline", "flows")  # the project's loggers

_console: TextIO | None = None


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def console() -> TextIO:
    """The terminal: where progress bars and the pipeline's lines go."""
    return _console or sys.stderr


def log_dir(run_dir: str) -> Path:
    """$MFM_LOG_DIR, else `<run_dir>/logs` for a local run_dir, else a folder per run_dir in the
    temp folder (the staging mirror is reset on a fresh start, so not there)."""
    if os.environ.get(LOG_DIR_ENV):
        return Path(os.environ[LOG_DIR_ENV])
    if "://" not in run_dir or run_dir.startswith("file://"):
        return Path(run_dir.removeprefix("file://")) / "logs"
    return Path(tempfile.gettempdir()) / f"mfm-logs-{hashlib.sha1(run_dir.encode()).hexdigest()[:12]}"


class _Own(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".", 1)[0] in OWN


def setup_rank(rank: int) -> None:
    """Logging of a training process: every record to stdout (the rank's log file when launched
    quietly, else the terminal); the project's records also to the terminal descriptor."""
    global _console
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stdout,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        force=True,
    )
    fd = os.environ.get(CONSOLE_FD_ENV)
    if not fd:
        return
    _console = os.fdopen(int(fd), "w", buffering=1)
    handler = logging.StreamHandler(_console)
    handler.addFilter(_Own())
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def quiet_prefect(log_file: Path) -> None:
    """Main process of a flow (the demo), after Prefect is imported: Prefect's own records
    (temporary server start and stop, its docs hints, the server's access log) go to
    `log_file` only; flow-run and task-run lines (the pipeline's, through Prefect) stay."""
    if verbose():
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    divert = _ToFile(handler)
    # a logger's filters see only the records logged on it, never its children's (flow_runs...)
    for name in ("prefect", "prefect.server", "prefect.server.api.server", "uvicorn", "uvicorn.error", "docket"):
        logging.getLogger(name).addFilter(divert)


class _ToFile(logging.Filter):
    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.handler.level:
            self.handler.handle(record)
        return False
