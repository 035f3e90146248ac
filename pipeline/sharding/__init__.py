"""Shard ImageNet-format datasets into WebDataset tars with DALI indices and a manifest.

Layout and manifest: docs/architecture.md, "Contract: a sharded split".
"""

from pipeline.sharding.job import ShardingError, shard_dataset
from pipeline.sharding.manifest import read_manifest, verify_split
from pipeline.sharding.sources import SourceError

__all__ = ["shard_dataset", "read_manifest", "verify_split", "ShardingError", "SourceError"]
