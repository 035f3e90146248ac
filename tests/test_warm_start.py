"""Warm starts (pretrain.init): an alias pinned to its version, the verified weights loaded into
the pretraining encoder (from an encoder or a fine-tuned classifier), mismatches named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.models import build_model, export_encoder
from pipeline.registry import IntegrityError, Registry
from pipeline.training.warm_start import pin, warm_start


def _export(url: str, state: dict, config: dict) -> str:
    storage.write_bytes(storage.join(url, "model.safetensors"), save(state))
    storage.write_bytes(storage.join(url, "config.json"), json.dumps(config).encode())
    return url


def _cfg(registry: str, run_dir: str, init: str):
    return load_config(
        "tiny_cpu", [f"pretrain.init={init}", f"pretrain.registry={registry}", f"train.run_dir={run_dir}"]
    )


def test_an_alias_is_pinned_and_the_verified_weights_are_loaded(store_url, tmp_path, monkeypatch):
    reg_url = storage.join(store_url, "registry")
    cfg = _cfg(reg_url, str(tmp_path / "run"), "enc@production")
    source = build_model(cfg.model, cfg.corruption)
    state, config = export_encoder(source, cfg.model)
    reg = Registry(reg_url)
    reg.register("enc", _export(storage.join(store_url, "a", "export"), state, config), aliases=("production",))

    pinned = pin(cfg)
    assert pinned.pretrain.init == "enc@v1"
    # The alias moves on; the pinned config keeps naming v1.
    other = {k: v + 1 for k, v in state.items()}  # another model (registering the same one again is a no-op)
    reg.register("enc", _export(storage.join(store_url, "b", "export"), other, config), aliases=("production",))
    assert pin(pinned).pretrain.init == "enc@v1" and pin(cfg).pretrain.init == "enc@v2"

    with pytest.raises(ConfigError, match="not pinned"):
        warm_start(build_model(cfg.model, cfg.corruption), cfg)
    torch.manual_seed(123)
    fresh = build_model(cfg.model, cfg.corruption)
    assert not torch.equal(fresh.encoder.patch_embed.proj.weight, source.encoder.patch_embed.proj.weight)
    warm_start(fresh, pinned)
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(fresh.encoder.state_dict()[k], v), k

    # A tampered version is refused by the registry's checksum, nothing loaded (a machine
    # without the verified copy in its local cache fetches it again).
    monkeypatch.setenv("MFM_CACHE", str(tmp_path / "another-machine"))
    fs, path = storage.filesystem(storage.join(reg.version_url("enc", 1), "model.safetensors"))
    with fs.open(path, "wb") as f:
        f.write(save({k: v + 1 for k, v in state.items()}))
    with pytest.raises(IntegrityError, match="checksum"):
        warm_start(build_model(cfg.model, cfg.corruption), pinned)


def test_a_classifier_init_drops_its_head_and_other_models_are_named(tmp_path):
    from pipeline.finetune import build_classifier

    cfg = _cfg(str(tmp_path / "reg"), str(tmp_path / "run"), str(tmp_path / "clf"))
    ft = load_config("finetune_tiny_cpu", ["finetune.num_classes=10"])
    clf = build_classifier(ft)
    state = {k: v.contiguous() for k, v in clf.state_dict().items()}
    _export(str(tmp_path / "clf"), state, {"architecture": cfg.model.name, "num_classes": 10})
    model = build_model(cfg.model, cfg.corruption)
    warm_start(model, pin(cfg))
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, clf.blocks[0].attn.qkv.weight)

    _export(str(tmp_path / "other"), state, {"architecture": "resnet18"})
    with pytest.raises(ConfigError, match="pretrain.init=.*resnet18.*model.name"):
        pin(_cfg(str(tmp_path / "reg"), str(tmp_path / "run"), str(tmp_path / "other")))
    with pytest.raises(ConfigError, match="pretrain.init='nothing@production'"):
        pin(_cfg(str(tmp_path / "reg"), str(tmp_path / "run"), "nothing@production"))
