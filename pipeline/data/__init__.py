"""Streaming data: manifest-listed shards from any fsspec URL to batches on the training device.

`build_train_loader` (pretraining, pretext corruption inline, resumable) and `build_eval_loader`
(labelled batches). Backends: DALI (`dali_backend`) or pure PyTorch (`torch_backend`); the
sample assignment, shuffling and state live in `sampling` and are shared by both.
"""
from pipeline.data.loader import (Batch, EvalLoader, LabelledBatch, TrainLoader, build_eval_loader,
                                  build_labelled_train_loader, build_train_loader, resolve_backend)

__all__ = ["Batch", "EvalLoader", "LabelledBatch", "TrainLoader", "build_eval_loader", "build_labelled_train_loader",
           "build_train_loader", "resolve_backend"]
