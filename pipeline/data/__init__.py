"""Streaming data: manifest-listed shards from any fsspec URL to batches on the training device.

`build_train_loader` (pretraining, pretext corruption inline, resumable), `build_labelled_train_loader`
(fine-tuning, any per-sample transform, resumable) and `build_eval_loader` (labelled batches).
Backends: DALI (`dali_backend`) or pure PyTorch (`torch_backend`); the sample assignment,
shuffling and state live in `sampling` and are shared by both.

What holds (the modules say why):
- Each epoch is one seeded global order of (shard, sample) ids (`sampling.epoch_order`), cut
  into equal per-rank batch lists; every sample at most once per epoch across the world, and
  only the global remainder (< world_size x micro_batch samples, different each epoch) dropped.
- Crops, flips and corruption draws come from (seed, epoch, sample id): any backend, rank,
  worker count or resume gives a sample the same view (up to decoder rounding between backends).
- `state_dict()` after k batches + `load_state_dict()` on a new loader: the same next batches,
  bit for bit. A different world size / micro batch / worker count finishes the epoch with
  the samples not consumed yet, re-dealt on the new layout; later epochs follow the new layout.
- Each shard is read in one sequential pass by one reader (rank x worker) per epoch, but where
  the deal cuts one (`sampling.deal`), by one GET, parsed as it arrives (`shards.SampleReader`);
  a transient failure resumes, with backoff, at the byte where it stopped: nothing lost, nothing
  repeated. A sample whose bytes are not an
  image is replaced by the next good sample of its batch, logged and counted (`loader.skipped`,
  `loader.skipped_keys`).
"""

from pipeline.data.loader import (
    Batch,
    EvalLoader,
    LabelledBatch,
    TrainLoader,
    build_eval_loader,
    build_labelled_train_loader,
    build_train_loader,
    resolve_backend,
)

__all__ = [
    "Batch",
    "EvalLoader",
    "LabelledBatch",
    "TrainLoader",
    "build_eval_loader",
    "build_labelled_train_loader",
    "build_train_loader",
    "resolve_backend",
]
