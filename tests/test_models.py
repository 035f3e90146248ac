import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.config import load_config
from pipeline.corruptions import corrupt
from pipeline.models import build_model, export_encoder


def tiny():
    return load_config("tiny_cpu")


@pytest.mark.parametrize(
    "name, size, stride, dim",
    [
        ("vit_tiny_patch16_224", 32, 4, 192),
        ("vit_small_patch16_224", 64, 16, 384),
        ("resnet50", 64, 32, 2048),
    ],
)
def test_shapes_and_decoder(name, size, stride, dim):
    overrides = [f"model.name={name}", f"model.img_size={size}", "corruption.radius=4"]
    if name == "vit_tiny_patch16_224":
        overrides.append("model.patch_size=4")
    cfg = load_config(None, overrides)
    model = build_model(cfg.model, cfg.corruption)
    x = torch.rand(2, 3, size, size)
    feats = model.features(x)
    assert model.stride == stride and feats.shape == (2, dim, size // stride, size // stride)
    conv, shuffle = model.decoder
    assert conv.kernel_size == (1, 1) and conv.out_channels == stride * stride * 3 and shuffle.upscale_factor == stride
    enc, target, keep = corrupt(x, cfg.corruption, torch.Generator().manual_seed(0))
    loss, pred = model(enc, target, keep)
    assert pred.shape == x.shape and loss.ndim == 0 and torch.isfinite(loss)


def test_vit_features_drop_cls_token():
    cfg = tiny()
    model = build_model(cfg.model).eval()
    x = torch.rand(1, 3, 32, 32)
    tokens = model.encoder.forward_features(x)
    assert tokens.shape[1] == 1 + 16  # tiny_cpu: 8 px patches on 32 px
    feats = model.features(x)
    # token t (row-major over the 4x4 grid) sits at feats[:, :, t // 4, t % 4]
    torch.testing.assert_close(feats[0, :, 2, 3], tokens[0, 1 + 2 * 4 + 3])


def test_paper_init_rescales_residual_projections():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=vit_base_patch16_224"])
    model = build_model(cfg.model)
    for i, block in enumerate(model.encoder.blocks, start=1):
        expect = 0.02 / math.sqrt(2 * i)
        assert abs(block.attn.proj.weight.std().item() - expect) / expect < 0.05
        assert abs(block.mlp.fc2.weight.std().item() - expect) / expect < 0.05
        assert abs(block.attn.qkv.weight.std().item() - 0.02) / 0.02 < 0.05
    assert abs(model.encoder.pos_embed.std().item() - 0.02) < 0.002


def test_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg.model, cfg.corruption)
    # smooth images: the masked frequencies of white noise cannot be predicted from the rest
    x = torch.nn.functional.interpolate(torch.rand(8, 3, 6, 6), size=32, mode="bicubic").clamp(0, 1)
    batch = corrupt(x, cfg.corruption, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss, _ = model(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


def test_export_loads_into_plain_timm(tmp_path):
    cfg = tiny()
    model = build_model(cfg.model, cfg.corruption)
    state, config = export_encoder(model, cfg.model)
    # strict, except the classifier head that the plain model adds
    plain = timm.create_model(config["architecture"], **config["model_args"])
    result = plain.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == {"head.weight", "head.bias"}
    # timm's own folder format: local-dir:
    import json

    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    x = torch.rand(2, 3, 32, 32)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded.forward_features(x), model.encoder.forward_features(x))
