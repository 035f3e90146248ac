"""Shard ImageNet-format datasets into WebDataset tars with DALI indices and a manifest.

Layout and manifest: docs/architecture.md, "Contract: a sharded split".
"""

from pipeline.sharding.job import ShardingError, shard_dataset
from pipeline.sharding.sources import SourceError
from pipeline.sharding.verify import verify_split
from pipeline.split_manifest import read_manifest

__all__ = ["shard_dataset", "read_manifest", "verify_split", "ShardingError", "SourceError"]
