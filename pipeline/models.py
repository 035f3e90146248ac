"""MFMModel: a timm encoder and the spec's lightweight decoder (1x1 conv + PixelShuffle).

The encoder sees only the corrupted image; the decoder predicts normalised pixels at full
resolution; the loss compares them to the target in the frequency domain (kernels/).
"""

from __future__ import annotations

import math

import timm
import torch
from torch import nn

from kernels.frequency import frequency_loss
from pipeline.config import CorruptionConfig, ModelConfig
from pipeline.corruptions import IMAGENET_MEAN, IMAGENET_STD


def create_encoder(cfg: ModelConfig, **overrides) -> nn.Module:
    """The plain timm model without a classifier head, at the configured image size."""
    return timm.create_model(cfg.name, pretrained=False, **encoder_args(cfg), **overrides)


def encoder_args(cfg: ModelConfig) -> dict:
    """The timm `create_model` keyword arguments that rebuild this encoder (also exported)."""
    args: dict = {"num_classes": 0}
    if is_vit(cfg.name):
        args["img_size"] = cfg.img_size
        if cfg.patch_size:
            args["patch_size"] = cfg.patch_size
    if cfg.drop_path:
        args["drop_path_rate"] = cfg.drop_path
    args.update(cfg.timm_kwargs)
    return args


def is_vit(name: str) -> bool:
    return name.startswith(("vit_", "deit_", "eva", "beit"))


def _feature_stride(encoder: nn.Module) -> int:
    if hasattr(encoder, "patch_embed"):
        ps = encoder.patch_embed.patch_size
        return ps[0] if isinstance(ps, (tuple, list)) else int(ps)
    info = getattr(encoder, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.info[-1]
        return int(last["reduction"])
    raise ValueError(f"cannot tell the feature-map stride of {type(encoder).__name__}")


def _vit_init(encoder: nn.Module, decoder: nn.Module) -> None:
    """Paper init: trunc-normal 0.02, then attention proj and MLP fc2 of block i scaled by
    1/sqrt(2 i) so that the residual stream's variance does not grow with depth."""
    for name in ("pos_embed", "cls_token"):
        if getattr(encoder, name, None) is not None:
            nn.init.trunc_normal_(getattr(encoder, name), std=0.02)
    for m in [*encoder.modules(), *decoder.modules()]:
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not getattr(encoder.patch_embed, "proj", None):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for i, block in enumerate(encoder.blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))


class MFMModel(nn.Module):
    def __init__(self, encoder: nn.Module, *, vit: bool, focal_alpha: float | None = None):
        super().__init__()
        self.encoder = encoder
        self.vit = vit
        self.stride = _feature_stride(encoder)
        self.focal_alpha = focal_alpha
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride**2 * 3, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D, H/stride, W/stride) feature map."""
        feats = self.encoder.forward_features(x)
        if not self.vit:
            return feats
        tokens = feats[:, self.encoder.num_prefix_tokens :]  # drop cls (and register) tokens
        n, length, dim = tokens.shape
        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        return tokens.transpose(1, 2).reshape(n, dim, h, w)

    def predict(self, encoder_input: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (N, 3, H, W) predicted from the corrupted image."""
        return self.decoder(self.features(encoder_input))

    def compile(self, *args, **kwargs) -> None:
        """torch.compile the prediction (encoder and decoder: all the matmuls) in place. The
        loss stays eager: its FFTs are cuFFT calls that inductor would not fuse either, the
        rest is hand-fused Triton (kernels/), about 2% of a step at 3,000 images/s (bench
        kernels: 6 us per image forward and backward), and a Python autograd.Function around
        Triton launches would break the graph."""
        self.predict = torch.compile(self.predict, *args, **kwargs)

    def forward(
        self, encoder_input: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, prediction); keep is None for the plain-loss baselines."""
        pred = self.predict(encoder_input)
        # cuFFT has no half precision at 224 px, and the loss is defined in float32.
        loss = frequency_loss(pred.float(), target.float(), keep, focal_alpha=self.focal_alpha)
        return loss, pred


def build_model(model_cfg: ModelConfig, corruption_cfg: CorruptionConfig | None = None) -> MFMModel:
    vit = is_vit(model_cfg.name)
    encoder = create_encoder(model_cfg) if vit else create_encoder(model_cfg, global_pool="")
    model = MFMModel(encoder, vit=vit, focal_alpha=corruption_cfg.focal_alpha if corruption_cfg else None)
    if vit:
        _vit_init(model.encoder, model.decoder)
    return model


# safetensors' metadata as torch and transformers write it: loaders that check it (transformers)
# refuse a file without it
SAFETENSORS_METADATA = {"format": "pt"}
EVAL_PREPROCESSING = {"interpolation": "bicubic", "crop_pct": 224 / 256, "crop_mode": "center"}  # pipeline.data's view


def export_weights(state: dict[str, torch.Tensor]) -> bytes:
    """model.safetensors bytes of a state dict, with the metadata timm and transformers expect."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata=SAFETENSORS_METADATA)


def export_tag(model_args: dict, img_size: int) -> str:
    """The pretrained tag, in timm's style (`r160` for 160 px): the entrypoint's name keeps timm's
    default patch size and resolution, the tag says what these weights were trained at."""
    patch = model_args.get("patch_size")
    return "mfm" + (f"_p{patch}" if patch else "") + f"_r{img_size}"


def timm_config(
    net: nn.Module, architecture: str, model_args: dict, img_size: int, label_names: list[str] | None = None, **extra
) -> dict:
    """config.json in the layout timm's `save_for_hf` writes, so that
    `timm.create_model("local-dir:DIR", pretrained=True[, num_classes=N])` rebuilds `net`.

    Written here rather than by timm's save_config_for_hf, whose output changes with timm's version
    and carries the source checkpoint's tag and licence, which these weights do not have."""
    source = getattr(net, "pretrained_cfg", None) or {}
    pool = getattr(net, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    num_classes = int(getattr(net, "num_classes", 0) or 0)
    config = {"architecture": architecture, "num_classes": num_classes, "num_features": int(net.num_features)}
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    if label_names:
        config["label_names"] = list(label_names)
    config["model_args"] = dict(model_args)
    config["pretrained_cfg"] = {
        "tag": export_tag(model_args, img_size),
        "custom_load": False,
        "input_size": [3, img_size, img_size],
        "fixed_input_size": bool(source.get("fixed_input_size", False)),
        **EVAL_PREPROCESSING,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "num_classes": num_classes,
        "first_conv": source.get("first_conv"),
        "classifier": source.get("classifier") or "head",
    }
    return {**config, **extra}


def export_encoder(model: MFMModel, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, timm config.json) of the encoder: contiguous fp32 CPU tensors, loadable with
    `timm.create_model("local-dir:DIR", pretrained=True)` (see `timm_config`). The pooling is
    timm's default for the architecture (a CNN encoder is trained unpooled; pooling holds no weights)."""
    state = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()  # BN counters stay int
        for k, v in model.encoder.state_dict().items()
    }
    model_args = {k: v for k, v in encoder_args(model_cfg).items() if k not in ("num_classes", "drop_path_rate")}
    encoder = model.encoder
    if not model.vit:
        with torch.device("meta"):  # the pooled model, for its pooling and first conv: no memory, no init
            encoder = timm.create_model(model_cfg.name, pretrained=False, **encoder_args(model_cfg))
    return state, timm_config(encoder, model_cfg.name, model_args, model_cfg.img_size)
