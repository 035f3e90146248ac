"""Registry round trips on a local folder and on the S3 endpoint: register, pull, load, verify."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save

from pipeline import storage
from pipeline.cli import main as mfm
from pipeline.config import ModelConfig
from pipeline.models import build_model, export_encoder
from pipeline.registry import (
    IntegrityError,
    PromotionRefused,
    Ref,
    Registry,
    RegistryError,
    gate_decision,
    load_model,
    parse_ref,
    pull_version,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4)


@pytest.fixture(scope="module")
def tiny_export():
    torch.manual_seed(0)
    model = build_model(TINY)
    state, config = export_encoder(model, TINY)
    return model.encoder.eval(), state, config


def write_export(url: str, state: dict, config: dict, metrics: dict | None = None) -> str:
    storage.write_bytes(storage.join(url, "model.safetensors"), save(state))
    storage.write_bytes(storage.join(url, "config.json"), json.dumps(config).encode())
    if metrics is not None:
        storage.write_bytes(storage.join(url, "metrics.json"), json.dumps(metrics).encode())
    return url


def write_data_manifest(url: str) -> str:
    storage.write_bytes(
        storage.join(url, "manifest.json"),
        json.dumps({"format_version": 1, "split": "train", "num_samples": 10, "shards": []}).encode(),
    )
    return url


def small_export(url: str, seed: int, metrics: dict | None = None) -> str:
    """A valid but tiny export (one tensor), for tests about the registry rather than the model."""
    state = {"w": torch.full((4,), float(seed))}
    return write_export(url, state, {"architecture": "vit_tiny_patch16_224", "num_classes": 0}, metrics)


def test_register_pull_load_roundtrip(store_url, tiny_export, tmp_path):
    encoder, state, config = tiny_export
    export = write_export(storage.join(store_url, "runs", "r1", "export"), state, config, {"top1": 0.25, "top5": 0.5})
    storage.write_bytes(storage.join(store_url, "runs", "r1", "config.yaml"), b"model:\n  name: vit_tiny_patch16_224\n")
    data = write_data_manifest(storage.join(store_url, "shards", "train"))
    reg_url = storage.join(store_url, "registry")
    reg = Registry(reg_url)

    ref = reg.register("tiny", export, data_manifest_url=data)
    assert ref == Ref("tiny", version=1)
    m = reg.manifest("tiny@latest")
    assert set(m["files"]) == {"model.safetensors", "config.json", "README.md", "metrics.json"}
    assert m["lineage"]["run_url"] == storage.join(store_url, "runs", "r1")
    assert m["lineage"]["run_config"] == {"model": {"name": "vit_tiny_patch16_224"}}
    assert (
        m["lineage"]["data_manifest"]["sha256"]
        == hashlib.sha256(storage.read_bytes(storage.join(data, "manifest.json"))).hexdigest()
    )
    assert m["lineage"]["code"]["package"] == "mfm-pipeline"
    assert m["metrics"] == {"top1": 0.25, "top5": 0.5}
    card = storage.read_bytes(storage.join(reg_url, "tiny", "v1", "README.md")).decode()
    assert "# tiny v1" in card and "| top1 | 0.25 |" in card and "runs/r1" in card
    assert "runs/r1/report.html" in card and "mfm report tiny@v1" in card  # where pipeline.report writes

    ref2, dest = pull_version(reg, "tiny@v1", tmp_path / "pulled")
    assert ref2 == ref and sorted(p.name for p in dest.iterdir()) == sorted([*m["files"], "manifest.json"])

    model = load_model("tiny@latest", registry=reg_url)
    got = model.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), encoder(x), atol=1e-6)

    if store_url.startswith("s3://"):
        return  # the rest does not touch the store again
    # Fine-tuning starts here: a new head, everything else from the registry.
    clf = load_model("tiny@v1", registry=reg_url, num_classes=7)
    assert clf(x).shape == (2, 7)
    assert torch.equal(clf.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


def test_tampered_weights_are_refused(store_url, tmp_path):
    reg = Registry(storage.join(store_url, "registry"))
    reg.register("m", small_export(storage.join(store_url, "export"), 1))
    url = storage.join(reg.url, "m", "v1", "model.safetensors")
    data = bytearray(storage.read_bytes(url))
    data[-1] ^= 0x01
    storage.write_bytes(url, bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.safetensors: checksum mismatch"):
        pull_version(reg, "m@v1", tmp_path / "a")
    assert not (tmp_path / "a").exists()  # nothing of a refused version is left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder either
    with pytest.raises(IntegrityError, match=r"model\.safetensors"):
        load_model("m@latest", registry=reg.url)


def test_missing_file_is_refused(store_url, tmp_path):
    reg = Registry(storage.join(store_url, "registry"))
    reg.register("m", small_export(storage.join(store_url, "export"), 1))
    fs, path = storage.filesystem(storage.join(reg.url, "m", "v1", "config.json"))
    fs.rm(path)
    with pytest.raises(IntegrityError, match=r"config\.json: file is missing"):
        pull_version(reg, "m@latest", tmp_path / "a")
    assert mfm(["pull", "m@latest", "--registry", reg.url, "--dest", str(tmp_path / "b")]) == 1


def test_register_refuses_a_pickle_export(store_url):
    export = storage.join(store_url, "export")
    storage.write_bytes(storage.join(export, "model.safetensors"), b"\x80\x04\x95" + b"\x00" * 64)  # pickle bytes
    storage.write_bytes(storage.join(export, "config.json"), b'{"architecture": "vit_tiny_patch16_224"}')
    with pytest.raises(RegistryError, match="not a safetensors file"):
        Registry(storage.join(store_url, "registry")).register("m", export)
    assert Registry(storage.join(store_url, "registry")).versions("m") == []


def test_promotion_gate_both_ways(store_url, capsys):
    reg = Registry(storage.join(store_url, "registry"))
    for i, top1 in enumerate([0.5, 0.7, 0.6], start=1):
        reg.register("m", small_export(storage.join(store_url, f"e{i}"), i, {"top1": top1, "loss": 1 - top1}))
    assert reg.alias_version("m", "latest") == 3
    reg.promote("m@v1")  # nothing in production yet
    assert "beats" in reg.promote("m@v2")
    assert reg.alias_version("m", "production") == 2
    with pytest.raises(PromotionRefused, match=r"top1 0.6 does not beat the current 0.7"):
        reg.promote("m@v3")
    assert reg.alias_version("m", "production") == 2
    assert mfm(["registry", "promote", "m@v3", "--registry", reg.url]) == 1
    assert "refused to move m@production from v2 to v3" in capsys.readouterr().err
    assert reg.alias_version("m", "production") == 2
    # Lower-is-better metric: v1's loss 0.5 does not beat v2's 0.3.
    with pytest.raises(PromotionRefused):
        reg.promote("m@v1", gate_metric="loss", higher_is_better=False)
    with pytest.raises(PromotionRefused, match="candidate has no metric 'top9'"):
        reg.promote("m@v3", gate_metric="top9")
    assert mfm(["registry", "promote", "m@v3", "--force", "--registry", reg.url]) == 0
    assert reg.alias_version("m", "production") == 3
    assert mfm(["registry", "promote", "m@v2", "--registry", reg.url]) == 0  # 0.7 beats 0.6
    assert reg.resolve("m@production") == Ref("m", version=2)


def test_cli_register_list_show(store_url, capsys):
    reg_url = storage.join(store_url, "registry")
    export = small_export(storage.join(store_url, "runs", "r", "export"), 3, {"top1": 0.9, "top5": 1.0})
    assert mfm(["registry", "register", "m", "--export", export, "--alias", "staging", "--registry", reg_url]) == 0
    assert "registered m@v1" in capsys.readouterr().out
    assert mfm(["registry", "list", "--registry", reg_url]) == 0
    assert capsys.readouterr().out.split() == ["m"]
    assert mfm(["registry", "list", "m", "--registry", reg_url]) == 0
    line = capsys.readouterr().out
    assert line.startswith("v1\t") and "top1=0.9" in line and "latest,staging" in line
    assert mfm(["registry", "show", "m@staging", "--registry", reg_url]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 1 and shown["aliases"] == {"latest": 1, "staging": 1}
    assert mfm(["registry", "show", "m@v9", "--registry", reg_url]) == 1
    assert "m@v9: no such version" in capsys.readouterr().err


def test_refs_and_gate_are_pure():
    assert parse_ref("a") == Ref("a", alias="latest")
    assert parse_ref("a@v12") == Ref("a", version=12)
    assert parse_ref("a@production") == Ref("a", alias="production")
    for bad in ("", "a@v0", "a@v01", "../x", "a@b/c", "a@"):
        with pytest.raises(RegistryError):
            parse_ref(bad)
    assert gate_decision({"top1": 0.5}, None, "top1")[0]
    assert not gate_decision({"top1": 0.5}, {"top1": 0.5}, "top1")[0]  # a tie does not beat
    assert gate_decision({"loss": 0.1}, {"loss": 0.2}, "loss", higher_is_better=False)[0]
    assert not gate_decision({"top1": 0.9}, {}, "top1")[0]


def test_store_without_conditional_writes_is_refused(tmp_path, capsys):
    """fsspec's memory:// store cannot create-if-absent: registering there must fail loudly
    rather than race silently."""
    export = small_export(str(tmp_path / "export"), 1)
    with pytest.raises(storage.ConditionalWriteUnsupported, match="memory://reg"):
        Registry("memory://reg").register("m", export)
    assert mfm(["registry", "register", "m", "--export", export, "--registry", "memory://reg2"]) == 1
    assert "no create-if-absent write" in capsys.readouterr().err


def old_layout_config(config: dict) -> dict:
    """The config.json exports had before timm's save_for_hf layout (no global_pool, classifier,
    first_conv, crop settings), as registries hold them."""
    return {
        "architecture": config["architecture"],
        "num_classes": 0,
        "num_features": config["num_features"],
        "model_args": config["model_args"],
        "pretrained_cfg": {
            "input_size": config["pretrained_cfg"]["input_size"],
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "num_classes": 0,
        },
    }


def test_exports_written_before_the_timm_layout_still_load_and_pull(store_url, tiny_export, tmp_path, capsys):
    encoder, state, config = tiny_export
    export = write_export(storage.join(store_url, "old", "export"), state, old_layout_config(config))  # no metadata
    reg_url = storage.join(store_url, "registry")
    Registry(reg_url).register("old", export)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model("old@v1", registry=reg_url)(x), encoder(x))
        assert load_model("old@v1", registry=reg_url, num_classes=3)(x).shape == (2, 3)
    assert mfm(["pull", "old@v1", "--registry", reg_url, "--dest", str(tmp_path / "pulled")]) == 0
    assert json.loads((tmp_path / "pulled" / "config.json").read_text()) == old_layout_config(config)
