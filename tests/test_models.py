import math
from pathlib import Path

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


# Run in a fresh interpreter that never imports this project (checked: no module from its folders
# is loaded): what a timm user has.
ROOT = str(Path(__file__).resolve().parents[1])
TIMM_USER = r"""
import sys

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

export, expected = sys.argv[1], load_file(sys.argv[2])
with safe_open(f"{export}/model.safetensors", "pt") as f:
    assert f.metadata() == {"format": "pt"}, f.metadata()
weights = load_file(f"{export}/model.safetensors")
x = expected["x"]

model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
with torch.no_grad():
    torch.testing.assert_close(model(x), expected["out"])

clf = timm.create_model(f"local-dir:{export}", pretrained=True, num_classes=5).eval()
head = clf.pretrained_cfg["classifier"]
assert clf.get_classifier().weight.shape == (5, clf.num_features)
encoder = {k: v for k, v in clf.state_dict().items() if not k.startswith(head)}
assert encoder.keys() == weights.keys(), sorted(set(encoder) ^ set(weights))
for k, v in weights.items():
    torch.testing.assert_close(encoder[k], v)
with torch.no_grad():
    torch.testing.assert_close(clf.forward_head(clf.forward_features(x), pre_logits=True), expected["out"])
    assert clf(x).shape == (len(x), 5)
ours = tuple(f"{sys.argv[3]}/{package}/" for package in ("pipeline", "kernels", "flows"))
assert not [m for m in list(sys.modules.values()) if (getattr(m, "__file__", None) or "").startswith(ours)]
print("ok")
"""


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the tiny ViT: patch 8, 32 px, 4 blocks of width 128
        ["model.name=resnet18", "model.img_size=64", "model.patch_size=null", "model.timm_kwargs={}"],
    ],
    ids=["tiny-vit", "resnet18"],
)
def test_export_loads_in_timm_without_the_project(tmp_path, overrides):
    import json
    import subprocess
    import sys

    from safetensors.torch import save_file as save_tensors

    from pipeline.models import export_weights
    from pipeline.registry import load_export

    cfg = load_config("tiny_cpu", overrides)
    torch.manual_seed(0)
    state, config = export_encoder(build_model(cfg.model, cfg.corruption), cfg.model)
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(export_weights(state))
    (export / "config.json").write_text(json.dumps(config))
    assert {"global_pool", "model_args", "pretrained_cfg"} <= set(config) or cfg.model.name.startswith("resnet")
    for key in ("classifier", "first_conv", "fixed_input_size", "interpolation", "crop_pct", "crop_mode"):
        assert key in config["pretrained_cfg"], key

    ours, _ = load_export(str(export))  # the project's loader: what load_model builds
    x = torch.rand(2, 3, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        save_tensors({"x": x, "out": ours(x).contiguous()}, str(tmp_path / "expected.safetensors"))
    run = subprocess.run(
        [sys.executable, "-I", "-c", TIMM_USER, str(export), str(tmp_path / "expected.safetensors"), ROOT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


TRANSFORMERS_USER = r"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageClassification

export, expected = sys.argv[1], load_file(sys.argv[2])
model = AutoModel.from_pretrained(export).eval()  # transformers' TimmWrapperModel
assert type(model).__name__ == "TimmWrapperModel", type(model)
with torch.no_grad():
    torch.testing.assert_close(model(pixel_values=expected["x"]).pooler_output, expected["out"])
clf = AutoModelForImageClassification.from_pretrained(export, num_labels=5).eval()
with torch.no_grad():
    assert clf(pixel_values=expected["x"]).logits.shape == (len(expected["x"]), 5)
ours = tuple(f"{sys.argv[3]}/{package}/" for package in ("pipeline", "kernels", "flows"))
assert not [m for m in list(sys.modules.values()) if (getattr(m, "__file__", None) or "").startswith(ours)]
print("ok")
"""


def test_export_loads_in_transformers_without_the_project(tmp_path):
    import json
    import subprocess
    import sys

    from safetensors.torch import save_file as save_tensors

    from pipeline.models import export_weights
    from pipeline.registry import load_export

    pytest.importorskip("transformers", minversion="4.48")  # TimmWrapper
    cfg = tiny()
    torch.manual_seed(0)
    state, config = export_encoder(build_model(cfg.model, cfg.corruption), cfg.model)
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(export_weights(state))
    (export / "config.json").write_text(json.dumps(config))
    ours, _ = load_export(str(export))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        save_tensors({"x": x, "out": ours(x).contiguous()}, str(tmp_path / "expected.safetensors"))
    run = subprocess.run(
        [sys.executable, "-I", "-c", TRANSFORMERS_USER, str(export), str(tmp_path / "expected.safetensors"), ROOT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
