"""Resume on another world size: a step folder written by N ranks, loaded by M.

ZeRO 1-3 partition the fp32 master weights and Adam's moments over the data-parallel ranks,
so N ranks' shard files do not fit M ranks. DeepSpeed's universal checkpoint solves this:
`ds_to_universal` rewrites the shards as one folder per parameter (fp32, exp_avg,
exp_avg_sq, step), and an engine started with `checkpoint.load_universal` slices each of
those for its own partition. Chosen over torch DCP because DCP would need the ZeRO
optimizers' flat partitions mapped to DTensors by hand, while this is DeepSpeed's own,
maintained path for the same engine; on CPU/gloo it reproduces the losses of the uninterrupted
run to float rounding (2 -> 1 and 2 -> 3 ranks, ZeRO-1 and ZeRO-3). ZeRO-0 needs no
conversion: its optimizer state is whole in mp_rank_00_model_states.pt.

The conversion runs on the verified local copy (one process per node) and is dropped after
the load; the run folder keeps the format it was written in.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def client_state() -> dict:
    """What ds_to_universal requires in every ZeRO-1/2 checkpoint (Megatron records TP
    merge patterns here; a data-parallel-only model has none)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def convert(step_dir: Path, out_dir: Path) -> None:
    """Write the universal form of a DeepSpeed step folder to out_dir (replacing it)."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out_dir, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(step_dir),
        output_folder=str(out_dir),
        num_extract_workers=1,  # in this process: the files are small per parameter, and no fork
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", chatter.getvalue())


@contextlib.contextmanager
def loading_universal(engine):
    """DeepSpeed reads `checkpoint.load_universal` only inside load_checkpoint (checked for
    0.19): switch it on for one load instead of starting the engine differently."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
