"""Model registry on any fsspec store: immutable numbered versions, movable aliases, verified pulls.

Layout (`<registry>` is a local folder or `s3://bucket/prefix`):
```
<registry>/<name>/v<N>/.claim            who took version N (written first, create-if-absent)
<registry>/<name>/v<N>/model.safetensors the weights (never a pickle)
<registry>/<name>/v<N>/config.json       timm config of the export
<registry>/<name>/v<N>/README.md         model card
<registry>/<name>/v<N>/metrics.json      optional evaluation results
<registry>/<name>/v<N>/manifest.json     written LAST: sha256 + size of every file, lineage
<registry>/<name>/aliases/<alias>.json   pointer {"version": N}, moved by compare-and-swap
```
A version exists only once its manifest exists. Version numbers are claimed with a
create-if-absent write, so racing registrations get distinct numbers; aliases are moved with a
compare-and-swap, so no racing move is lost (`latest` only ever moves to a larger version).

Modules, each importing only those before it: `refs` (names, refs, errors, JSON shapes: pure),
`gate` (promotion gate: pure), `architecture` (what a config.json may ask timm to build), `card`
(model card), `lineage` (what a version records), `store` (`Registry`: reads, conditional writes),
`gc` (abandoned claims), `cache` (verified downloads, the local cache), `loading` (pulls, timm
models), `comparison` (a version beside production), `commands` (the CLI).
"""

from pipeline.registry.cache import cached_version, fetch_verified
from pipeline.registry.card import code_version, model_card
from pipeline.registry.commands import cli, pull_cli
from pipeline.registry.comparison import Comparison, compare_with_production
from pipeline.registry.gate import flatten_metrics, gate_decision
from pipeline.registry.gc import collect_abandoned_claims
from pipeline.registry.loading import (
    is_registry_ref,
    load_export,
    load_model,
    model_from_export,
    model_from_folder,
    pull,
    pull_version,
    read_init_weights,
)
from pipeline.registry.refs import (
    ALIAS_FORMAT_VERSION,
    CARD,
    CLAIM,
    CONFIG,
    DEFAULT_REGISTRY,
    FORMAT_VERSION,
    MANIFEST,
    METRICS,
    WEIGHTS,
    IntegrityError,
    PromotionRefused,
    Ref,
    RegistryError,
    check_name,
    check_safetensors,
    parse_ref,
    sha256_bytes,
)
from pipeline.registry.store import Registry, default_registry

__all__ = [
    "is_registry_ref",
    "read_init_weights",
    "ALIAS_FORMAT_VERSION",
    "CARD",
    "CLAIM",
    "CONFIG",
    "DEFAULT_REGISTRY",
    "FORMAT_VERSION",
    "MANIFEST",
    "METRICS",
    "WEIGHTS",
    "IntegrityError",
    "PromotionRefused",
    "Ref",
    "Registry",
    "RegistryError",
    "check_name",
    "check_safetensors",
    "cached_version",
    "cli",
    "code_version",
    "Comparison",
    "compare_with_production",
    "collect_abandoned_claims",
    "default_registry",
    "fetch_verified",
    "flatten_metrics",
    "gate_decision",
    "load_export",
    "load_model",
    "model_card",
    "model_from_export",
    "model_from_folder",
    "parse_ref",
    "pull",
    "pull_cli",
    "pull_version",
    "sha256_bytes",
]
