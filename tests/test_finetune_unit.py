"""Fine-tuning pieces in one process: layer-wise lr decay through timm's groups and scheduler,
encoder loading, per-sample seeded augmentation, and configs refused before any process starts."""

from __future__ import annotations

import io
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from pipeline import storage
from pipeline.config import load_config
from pipeline.finetune import _optimizer, build_classifier, load_encoder, train_transform
from pipeline.models import build_model, export_encoder


def _cfg(*overrides: str):
    return load_config("finetune_tiny_cpu", ["finetune.num_classes=10", *overrides])


def _layer(name: str, depth: int) -> int:
    """The layer id of the layer-decay recipe: embeddings 0, block i -> i + 1, the rest depth + 1."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


def test_layer_decay_scales_every_group_and_the_scheduler_applies_them():
    from pipeline.training.optim import build_optimizer, build_scheduler, scaled_lrs

    cfg = _cfg("optim.warmup_epochs=0")
    model = build_classifier(cfg)
    depth = len(model.blocks)
    lrs = scaled_lrs(cfg.optim, 64)
    opt = build_optimizer(model, cfg.optim, lrs.lr, layer_decay=0.8)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        layers = {_layer(names[id(p)], depth) for p in group["params"]}
        assert len(layers) == 1, layers
        layer = layers.pop()
        assert group["lr_scale"] == pytest.approx(0.8 ** (depth + 1 - layer))
        one_d = [p.ndim <= 1 or names[id(p)] in ("pos_embed", "cls_token") for p in group["params"]]
        assert group["weight_decay"] == (0.0 if all(one_d) else cfg.optim.weight_decay) and len(set(one_d)) == 1
        seen |= {names[id(p)] for p in group["params"]}
    assert seen == set(names.values())
    assert {g["lr_scale"] for g in opt.param_groups} >= {1.0, 0.8 ** (depth + 1)}  # head ... patch embedding
    sched = build_scheduler(opt, cfg.optim, lrs, steps_per_epoch=10)
    # from the very first step (no warmup here) every group runs at the schedule's lr x its scale
    for step in (0, 37):
        sched.step_update(step)
        base = sched._get_lr(step)[0]
        assert base <= lrs.lr
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(base * group["lr_scale"])


def test_resnet_recipe_has_no_layer_decay():
    cfg = load_config("finetune_resnet50")
    assert cfg.finetune.recipe == "resnet" and cfg.finetune.layer_decay is None
    with pytest.raises(ValueError, match="finetune.layer_decay"):
        load_config("finetune_resnet50", ["finetune.layer_decay=0.8"])


def test_pretrained_encoder_weights_are_loaded_and_only_the_head_is_new():
    cfg = _cfg()
    pretrained = build_model(cfg.model)  # an MFM model: encoder + decoder, the paper init
    state, _ = export_encoder(pretrained, cfg.model)
    model = build_classifier(cfg)
    key = "blocks.3.attn.qkv.weight"
    assert not torch.equal(model.state_dict()[key], state[key])
    keys = load_encoder(model, state)
    for name, tensor in model.state_dict().items():
        if name in state:
            assert torch.equal(tensor, state[name]), name
    assert {k.split(".")[0] for k in keys["new"]} == {"head", "fc_norm"}
    assert {k.split(".")[0] for k in keys["dropped"]} == {"norm"}
    assert model.head.out_features == 10 and model.global_pool == "avg"
    # stochastic depth rule over finetune_tiny_cpu's 4 blocks: 0.1 x i / (depth - 1)
    assert model.blocks[2].drop_path1.drop_prob == pytest.approx(0.1 * 2 / 3)


def test_weights_of_another_encoder_are_refused():
    cfg = _cfg()
    other = build_classifier(_cfg("model.patch_size=4")).state_dict()
    with pytest.raises(ValueError, match="do not fit"):
        load_encoder(build_classifier(cfg), {k: v for k, v in other.items() if not k.startswith("blocks.1.")})


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def test_augmentation_is_drawn_from_each_samples_seed_and_leaves_global_rngs_alone():
    from pipeline.data.augment import SampleParams
    from pipeline.data.reading import RawBatch
    from pipeline.data.torch_backend import SeededLabelledBatches

    make = SeededLabelledBatches(train_transform(_cfg("finetune.reprob=1.0")))

    def batch(seeds):
        params = [SampleParams(0, 0, 40, 48, False, s) for s in seeds]
        return RawBatch(0, [0, 1], [_jpeg(1), _jpeg(1)], params, [3, 7])

    random.seed(5)
    expected = random.random()
    random.seed(5)
    a = make(batch([11, 12]))
    assert random.random() == expected  # the trainer's RNG streams are not consumed
    b = make(batch([11, 99]))
    assert a["images"].shape == (2, 3, 32, 32) and a["labels"].tolist() == [3, 7]
    assert torch.equal(a["images"][0], b["images"][0])  # same image, same seed: same view
    assert not torch.equal(a["images"][0], a["images"][1])  # same image, another seed: another view
    assert not torch.equal(a["images"][1], b["images"][1])


@pytest.fixture
def no_launch(monkeypatch):
    from pipeline.training import launcher

    def refuse(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(launcher, "spawn_local", refuse)
    monkeypatch.setattr(launcher.subprocess, "call", refuse)


def _export(url: str, architecture: str, model_args: dict | None = None) -> str:
    storage.write_bytes(storage.join(url, "model.safetensors"), save({"w": torch.zeros(1)}))
    storage.write_bytes(
        storage.join(url, "config.json"),
        json.dumps({"architecture": architecture, "model_args": model_args or {}}).encode(),
    )
    return url


@pytest.mark.parametrize(
    "init, message",
    [
        ("nosuch@latest", "finetune.init='nosuch@latest': nosuch@latest: no alias 'latest'"),
        ("model@v1o", "finetune.init='model@v1o'"),
        ("{tmp}/empty", "no model.safetensors there"),
        ("{tmp}/resnet", "finetune.recipe='vit' but finetune.init="),
    ],
)
def test_bad_init_is_refused_before_any_process_starts(tmp_path, no_launch, capsys, init, message):
    from pipeline.cli import main

    (tmp_path / "empty").mkdir()
    _export(str(tmp_path / "resnet"), "resnet18")
    run_dir = tmp_path / "run"
    code = main(
        [
            "finetune",
            "--config",
            "finetune_tiny_cpu",
            "--set",
            f"finetune.init={init.format(tmp=tmp_path)}",
            "--set",
            f"finetune.registry={tmp_path / 'registry'}",
            "--set",
            f"train.run_dir={run_dir}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not run_dir.exists()


def test_odd_micro_batch_with_mixup_is_refused(tmp_path, no_launch, capsys):
    from pipeline import sample_data
    from pipeline.cli import main
    from pipeline.sharding import shard_dataset

    sample = sample_data.build(str(tmp_path / "sample"), per_class=2, size=32)
    shard_dataset(sample["folder"], str(tmp_path / "shards"), splits=["train", "val"], shard_size_mb=1)
    init = _export(str(tmp_path / "export"), "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4})
    args = [
        "finetune",
        "--config",
        "finetune_tiny_cpu",
        "--set",
        f"finetune.init={init}",
        "--set",
        f"data.train={tmp_path / 'shards' / 'train'}",
        "--set",
        f"data.val={tmp_path / 'shards' / 'val'}",
        "--set",
        "train.nprocs=2",
        "--set",
        "data.batch_size=6",
        "--set",
        "finetune.mixup=0.8",  # finetune_tiny_cpu leaves mixup off
        "--set",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    assert main(args) == 2
    assert "the micro batch (data.batch_size 6 / 2 ranks / 1) = 3 must be even" in capsys.readouterr().err


def test_resnet_recipe_loads_the_encoder_and_trains_plain_groups():
    from pipeline.training.optim import scaled_lrs

    cfg = load_config("finetune_resnet50", ["model.name=resnet18", "model.img_size=32", "finetune.num_classes=10"])
    state, _ = export_encoder(build_model(cfg.model), cfg.model)
    model = build_classifier(cfg)
    keys = load_encoder(model, state)
    assert {k.split(".")[0] for k in keys["new"]} == {"fc"} and not keys["dropped"]
    assert torch.equal(model.conv1.weight, state["conv1.weight"]) and model.fc.out_features == 10
    opt = _optimizer(model, cfg, scaled_lrs(cfg.optim, 64).lr)
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:  # no decay on biases and batch norms, the recipe's decay elsewhere
        assert {p.ndim > 1 for p in g["params"]} == {g["weight_decay"] == cfg.optim.weight_decay}, [
            names[id(p)] for p in g["params"]
        ]


def test_randaugment_survives_its_strongest_posterize():
    """rand-m9-mstd0.5-inc1 can draw posterize to 0 bits; a Pillow that refuses it kills training."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    out = posterize(Image.new("RGB", (8, 8), (200, 100, 50)), 0)
    assert out.getpixel((0, 0)) == (0, 0, 0)
