"""The one typed schema for every setting, YAML presets and dotted overrides.

A config is built as: defaults <- preset YAML (which may `extends:` another preset) <- `--set
key=value` overrides, then validated once. Errors name the dotted key that is wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.jpeg import MAX_PIXELS

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config that cannot work; the message names the key."""


class Section(BaseModel):
    # no inf/nan anywhere: a non-finite rate or size is a typo that would only show up as NaN losses
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _crop_scale(v: tuple[float, float]) -> tuple[float, float]:
    if not 0 < v[0] <= v[1] <= 1:
        raise ValueError("must be (low, high) with 0 < low <= high <= 1 (fractions of the image area)")
    return v


def _betas(v: tuple[float, float]) -> tuple[float, float]:
    if not all(0 <= b < 1 for b in v):
        raise ValueError("each of Adam's betas must be in [0, 1)")
    return v


CropScale = Annotated[tuple[float, float], AfterValidator(_crop_scale)]
Betas = Annotated[tuple[float, float], AfterValidator(_betas)]
# Upper bounds far above any real run: they catch a typo (1e23, an extra digit) at config time,
# not as an allocation failure or a fork bomb an hour in.
MAX_BATCH = 1 << 20
MAX_WORKERS = 1024


class ModelConfig(Section):
    name: str = "vit_tiny_patch16_224"  # any timm encoder
    img_size: int = Field(224, gt=0)
    patch_size: int | None = Field(None, gt=0)  # ViT only: override the name's patch size
    drop_path: float = Field(0.0, ge=0, lt=1)
    # extra timm create_model arguments (e.g. {depth: 4, embed_dim: 96, num_heads: 3}) for
    # CPU-sized encoders; exported in model_args, so fine-tuning and evaluation rebuild the same shape
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)

    @property
    def stride(self) -> int | None:
        """Output stride of the encoder's feature map, when it can be known without building it."""
        if self.patch_size:
            return self.patch_size
        m = re.search(r"patch(\d+)", self.name)
        if m:
            return int(m.group(1))
        if re.match(r"(resnet|resnext|seresnet|regnet|convnext|efficientnet)", self.name):
            return 32
        return None


class CorruptionConfig(Section):
    kind: Literal["mfm", "sr", "deblur", "denoise"] = "mfm"
    radius: int = Field(16, gt=0)
    radius2: int | None = Field(None, gt=0)  # optional band: low-pass also keeps d >= radius2
    low_pass_prob: float = Field(0.5, ge=0, le=1)
    sr_factor: int = Field(8, gt=1)
    blur_sigma: float = Field(5.0, gt=0)
    blur_kernel_sizes: list[int] = Field(default_factory=lambda: list(range(7, 22, 2)))
    noise_std: float = Field(75 / 255, gt=0)
    focal_alpha: float | None = Field(None, gt=0)  # focal frequency weighting; off in the paper

    @model_validator(mode="after")
    def _check(self):
        if self.radius2 is not None and self.radius2 <= self.radius:
            raise ValueError(
                f"corruption.radius2 ({self.radius2}) must be larger than corruption.radius ({self.radius})"
            )
        bad = [k for k in self.blur_kernel_sizes if k < 1 or k % 2 == 0]
        if bad or not self.blur_kernel_sizes:
            raise ValueError(f"corruption.blur_kernel_sizes must be odd positive sizes, got {self.blur_kernel_sizes}")
        return self


class StorageConfig(Section):
    """fsspec options for s3:// URLs. Credentials come from the AWS environment, never from here."""

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    retries: int = Field(5, ge=0)


class TrainSource(Section):
    """One of several training splits (`data.train` as a list), drawn with `weight`."""

    url: str  # a sharded split (the folder holding manifest.json)
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)  # share of each epoch, relative to the others


class DataConfig(Section):
    # URL of a sharded split (the folder holding manifest.json), or a list of {url, weight}: each
    # epoch then draws every source in proportion to its weight (pipeline/data/sampling.py, Mix)
    train: str | list[TrainSource] = "demo-out/shards/train"
    # draws per epoch of a list; default: all its samples (bounded: sample ids are int64 and the shares float64)
    epoch_samples: int | None = Field(None, gt=0, le=2**40)
    val: str | None = None  # held-out split: pretraining val_loss, fine-tuning top-1
    backend: Literal["auto", "dali", "torch"] = "auto"  # auto: DALI when installed
    batch_size: int = Field(64, gt=0, le=MAX_BATCH)  # global, across all ranks and accumulation steps
    workers: int = Field(2, ge=0, le=MAX_WORKERS)  # loader workers per rank
    shuffle_buffer: int = Field(1000, ge=0)
    crop_scale: CropScale = (0.2, 1.0)
    # remote shards downloading beyond those a reader needs within 150 samples (at first its 4
    # interleaved ones): 0 measured best (first batch 0.34 vs 0.38 s with 1, 2 workers, README)
    prefetch_shards: int = Field(0, ge=0, le=64)
    # local copies of remote shards, read from there in later epochs: "auto" is $MFM_CACHE/shards
    # (~/.cache/mfm/shards), null turns it off; a local data.train is read in place
    cache_dir: str | None = "auto"
    # its size limit (10^9 bytes): least recently used shards are evicted, shards being read never
    cache_limit_gb: float | None = Field(100, gt=0, allow_inf_nan=False)
    # filter when a crop is shrunk to the image size (enlarging is always bicubic): bicubic is the
    # paper's; bilinear (antialiased) is much cheaper on CPUs, DALI's CPU resize especially
    downscale: Literal["bicubic", "bilinear"] = "bicubic"
    # a sample whose JPEG/PNG header claims more pixels is skipped and counted before any decoder
    # (Pillow, DALI) sees it; null: no limit
    max_pixels: int | None = Field(MAX_PIXELS, gt=0)
    # share of each batch's JPEGs the DALI GPU decoder gives the hardware decoder (NVJPG engines;
    # A100, H100/H200), the rest to its CUDA decoder. 0.65 is DALI's default (A100); measure
    # with `mfm bench data --device cuda --hw-decoder-load 0.5,0.75,0.9,1.0`
    dali_hw_decoder_load: float = Field(0.65, ge=0, le=1)
    # the DALI GPU decoder's chroma upsampling: libjpeg-turbo's "fancy" one (Pillow's and DALI's CPU
    # decoder's, so that the views match the torch backend's) or nvJPEG's cheaper plain one; measure
    # with `mfm bench data --device cuda --hw-decoder-load ... --fancy-upsampling on,off`
    dali_fancy_upsampling: bool = True

    @model_validator(mode="after")
    def _check_sources(self):
        if isinstance(self.train, list):
            if not self.train:
                raise ValueError("data.train: an empty list of sources")
            urls = [t.url for t in self.train]
            if len(set(urls)) != len(urls):
                raise ValueError(f"data.train: a source listed twice ({urls})")
        return self


def train_sources(data: DataConfig) -> list[TrainSource]:
    """data.train as a list of sources (a plain URL is one source of weight 1)."""
    return [TrainSource(url=data.train)] if isinstance(data.train, str) else list(data.train)


def single_train_split(data: DataConfig, who: str) -> str:
    """data.train for stages that read one split; a ConfigError naming the key for a list."""
    if isinstance(data.train, str):
        return data.train
    raise ConfigError(f"data.train: {who} reads one split; a list of sources is for pretraining")


class OptimConfig(Section):
    base_lr: float = Field(3e-4, gt=0)  # scaled by global batch / lr_base_batch
    lr_base_batch: int = Field(512, gt=0, le=MAX_BATCH)
    betas: Betas = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    epochs: int = Field(300, gt=0)
    warmup_epochs: float = Field(20, ge=0)
    warmup_lr: float = Field(2.5e-7, ge=0)  # scaled like base_lr
    min_lr: float = Field(2.5e-6, ge=0)  # scaled like base_lr
    clip_grad: float | None = Field(3.0, gt=0)


class TrainConfig(Section):
    run_dir: str = "demo-out/runs/demo"  # URL: checkpoints, logs and the export go here
    seed: int = 0
    nprocs: int = Field(1, gt=0)  # processes on this node
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    grad_accum: int = Field(1, gt=0)
    # steps outright, winning over optim.epochs: shorter, the run stops inside the epochs' schedule;
    # longer, the lr schedule is stretched to it (training.optim.step_budget)
    max_steps: int | None = Field(None, gt=0)
    checkpoint_every: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0)
    log_every: int = Field(10, gt=0)
    picture_every: int = Field(1000, gt=0)
    loader: str = "pipeline.data:build_train_loader"  # "module:function" obeying the batch contract
    # torch.compile of the model's prediction path: auto = on for CUDA (ZeRO 0-2), off on CPU
    compile: Literal["auto"] | bool = "auto"
    profile_steps: int = Field(0, ge=0)  # >0: a torch.profiler trace of that many steps into <run_dir>/profile/
    # How long a rank waits in a collective or barrier for a peer (a frozen or unreachable node)
    # before it fails the run; longer than any one-rank pause, such as a checkpoint upload.
    dist_timeout_s: float = Field(300, gt=0)
    # Resume from a step folder whose COMPLETE records no sha256 (written before checksums were
    # recorded): its files are then loaded unverified, and DeepSpeed unpickles them. Off: refused.
    allow_unverified_checkpoints: bool = False


class PretrainConfig(Section):
    """Warm starts: continue pretraining from a registered (or exported) model's weights instead
    of a random init. Weights only: the optimiser and the schedule start fresh, optim.warmup_epochs
    of warmup then cosine over optim.epochs, which is then the new budget (docs/architecture.md)."""

    init: str | None = None  # registry ref NAME@ALIAS / NAME@vN (pinned to vN at start), or an export URL
    registry: str | None = None  # registry URL for refs (default: $MFM_REGISTRY)


class FinetuneConfig(Section):
    """`mfm finetune`: a classifier from a pretrained encoder (spec section 5). The recipe's
    optimiser, schedule and drop path are the usual optim.* and model.drop_path; the
    finetune_* presets set them. model.name / patch_size / img_size come from `init`."""

    init: str | None = None  # export folder URL, or a registry ref NAME@ALIAS / NAME@vN
    registry: str | None = None  # registry URL for refs (default: $MFM_REGISTRY)
    num_classes: int | None = Field(None, gt=0)  # default: the train manifest's class list
    recipe: Literal["vit", "resnet"] = "vit"  # resnet: no layer decay, no fc_norm
    layer_decay: float | None = Field(0.8, gt=0, le=1)  # lr_scale = layer_decay ** (L + 1 - layer)
    mixup: float = Field(0.8, ge=0)  # alpha; 0 = off
    cutmix: float = Field(1.0, ge=0)  # alpha; 0 = off
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    randaugment: str | None = "rand-m9-mstd0.5-inc1"  # timm auto_augment string; None = off
    reprob: float = Field(0.25, ge=0, le=1)  # random erasing probability
    remode: Literal["pixel", "const", "rand"] = "pixel"
    crop_scale: CropScale = (0.08, 1.0)  # RandomResizedCrop (timm's default)
    global_pool: Literal["avg", "token"] = "avg"  # ViT: mean-pooled tokens ...
    fc_norm: bool = True  # ... through a new norm (replaces the encoder's final norm)

    @model_validator(mode="after")
    def _check(self):
        if self.recipe == "resnet" and self.layer_decay not in (None, 1.0):
            raise ValueError(
                f"finetune.layer_decay ({self.layer_decay}) is for the vit recipe; "
                "set finetune.layer_decay=null with finetune.recipe=resnet"
            )
        return self


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    corruption: CorruptionConfig = Field(default_factory=CorruptionConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    @model_validator(mode="after")
    def _check(self):
        size, stride = self.model.img_size, self.model.stride
        if stride is not None and size % stride:
            raise ValueError(f"model.img_size ({size}) must be divisible by the encoder stride ({stride})")
        if 2 * self.corruption.radius > size:
            raise ValueError(
                f"corruption.radius ({self.corruption.radius}) must be at most half of model.img_size ({size})"
            )
        if self.corruption.kind == "sr" and size % self.corruption.sr_factor:
            raise ValueError(
                f"model.img_size ({size}) must be divisible by corruption.sr_factor ({self.corruption.sr_factor})"
            )
        if self.optim.warmup_epochs > self.optim.epochs:
            raise ValueError("optim.warmup_epochs must not exceed optim.epochs")
        return self


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


MAX_CONFIG_BYTES = 1 << 20
MAX_NODES = 100_000  # values in a config once YAML's aliases are expanded: a real one has hundreds
MAX_NESTING = 32


def _load_yaml(text: str, where: str) -> Any:
    """YAML text as data, or a ConfigError naming `where`: not YAML, nested past what any config
    needs, or a few aliases expanding to millions of values (which validation would walk)."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an int past Python's 4300-digit limit
        raise ConfigError(f"{where}: not valid YAML: {e}") from e
    stack, seen = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES or depth > MAX_NESTING:
            raise ConfigError(
                f"{where}: more than {MAX_NODES} values or {MAX_NESTING} levels of nesting (YAML aliases count "
                "each time they are used)"
            )
        if isinstance(node, dict):
            stack += [(v, depth + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]
    return data


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a config")
    data = _load_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _resolve_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    if not name_or_path or "\0" in name_or_path:
        raise ConfigError(f"preset {name_or_path!r}: not a preset name or file")
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(list_presets())}")
    elif not path.exists():
        raise ConfigError(f"config file {name_or_path} does not exist")
    if str(path) in seen:
        raise ConfigError(f"{path}: `extends` forms a cycle")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _resolve_preset(str(parent), seen + (str(path),))
    return _merge(base, data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-3` -> (["optim", "lr"], 0.001); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    value = _load_yaml(raw, f"override {item[:200]!r}: its value") if raw.strip() else None
    return key.strip().split("."), value


_DOTTED_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def override_strings(overrides: dict[str, Any] | None) -> list[str]:
    """{"optim.base_lr": 1e-3} (flow parameters) -> ["optim.base_lr=0.001"]. JSON is YAML, so
    each value reaches the config exactly as typed (strings stay strings)."""
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"overrides: expected a mapping of dotted keys to values, got {type(overrides).__name__}")
    for k in overrides or {}:
        if not isinstance(k, str) or not _DOTTED_KEY.fullmatch(k):
            raise ConfigError(f"overrides: {k!r} is not a dotted key such as optim.base_lr")
    try:
        return [f"{k}={json.dumps(v, allow_nan=False)}" for k, v in (overrides or {}).items()]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"overrides: a value is not plain JSON ({e})") from None


def load_flow_config(preset: object, overrides: dict[str, Any] | None) -> Config:
    """A flow run's config. Flow parameters are untrusted (anyone who may start a run sets them):
    `preset` must name a shipped preset, not a file of the worker, whose content an error would
    copy into the run's log; everything else goes through `overrides`."""
    if not isinstance(preset, str) or preset not in list_presets():
        raise ConfigError(
            f"flow parameter preset={preset!r}: not a shipped preset ({', '.join(list_presets())}); "
            "set other values through the overrides parameter"
        )
    cfg = load_config(preset, override_strings(overrides))
    # train.loader names a "module:function" that the trainer imports and calls: from a flow
    # parameter that would run any importable code on the worker
    if cfg.train.loader != TrainConfig.model_fields["loader"].default:
        raise ConfigError(
            f"flow parameter overrides: train.loader={cfg.train.loader!r} cannot be set by a flow run "
            "(it imports code); set it in a preset or on the command line"
        )
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _merge({}, data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def build_config(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            if err["loc"][-1:] == ("str",) and isinstance(err.get("input"), list):
                continue  # data.train given as a list: the plain-URL branch of the union is noise
            # union branches ("str", "list[TrainSource]") are not keys the user wrote
            loc = [p for p in err["loc"] if not (isinstance(p, str) and (p == "str" or p.startswith("list[")))]
            key = ".".join(str(p) for p in loc) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif "input" in err and not isinstance(err["input"], dict):
                try:
                    got = repr(err["input"])
                except ValueError:  # an int past Python's 4300-digit str() limit
                    got = "a number too long to show"
                msg += f" (got {got if len(got) <= 200 else got[:200] + '...'})"
            lines.append(f"  {key}: {msg}")
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then a preset name or YAML file, then dotted `key=value` overrides."""
    data = _resolve_preset(preset) if preset else {}
    return build_config(apply_overrides(data, list(overrides)))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
