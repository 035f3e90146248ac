"""Broken and hostile registry content (issue 16): wrong-shape JSON, odd names, incomplete manifests,
refused pulls that leave nothing behind, abandoned claims, retried registrations."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from pipeline import storage
from pipeline.cli import main as mfm
from pipeline.registry import (
    IntegrityError,
    Ref,
    Registry,
    RegistryError,
    check_name,
    collect_abandoned_claims,
    parse_ref,
    pull_version,
)


def small_export(url: str, seed: int, metrics: dict | None = None) -> str:
    storage.write_bytes(storage.join(url, "model.safetensors"), save({"w": torch.full((4,), float(seed))}))
    storage.write_bytes(storage.join(url, "config.json"), b'{"architecture": "vit_tiny_patch16_224", "num_classes": 0}')
    if metrics is not None:
        storage.write_bytes(storage.join(url, "metrics.json"), json.dumps(metrics).encode())
    return url


@pytest.fixture
def reg(store_url) -> Registry:
    reg = Registry(storage.join(store_url, "registry"))
    reg.register("m", small_export(storage.join(store_url, "e1"), 1, {"top1": 0.5}), aliases=("latest", "staging"))
    return reg


def _rewrite_manifest(reg: Registry, version: int, edit) -> str:
    url = storage.join(reg.version_url("m", version), "manifest.json")
    manifest = json.loads(storage.read_bytes(url))
    storage.write_bytes(url, json.dumps(edit(manifest)).encode())
    return url


@pytest.mark.parametrize(
    "payload, complaint",
    [(b"[]", "an alias is a JSON object"), (b'{"version": "2"}', "'version' must be a version number")],
)
def test_alias_of_the_wrong_shape_is_named_and_list_shows_the_rest(reg, payload, complaint, capsys):
    bad_url = reg.alias_url("m", "broken")
    storage.write_bytes(bad_url, payload)
    with pytest.raises(RegistryError, match=complaint) as e:
        reg.resolve("m@broken")
    assert bad_url in str(e.value)
    assert reg.aliases("m") == {"latest": 1, "staging": 1}
    assert mfm(["registry", "list", "m", "--registry", reg.url]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("v1\t") and "latest,staging" in out
    assert bad_url in err and complaint in err
    assert mfm(["registry", "show", "m@staging", "--registry", reg.url]) == 0


@pytest.mark.parametrize(
    "edit, complaint",
    [
        (lambda m: [m], "a manifest is a JSON object"),
        (lambda m: dict(m, files=["model.safetensors"]), "'files' must map file names"),
        (lambda m: dict(m, files=dict(m["files"], **{"../x": m["files"]["config.json"]})), "unsafe"),
        (lambda m: dict(m, metrics={"top1": "high"}), "'metrics' values must be numbers"),
    ],
)
def test_manifest_of_the_wrong_shape_is_named(reg, edit, complaint, tmp_path, capsys):
    reg.register("m", small_export(storage.join(reg.url, "..", "e2"), 2, {"top1": 0.6}))
    url = _rewrite_manifest(reg, 1, edit)
    with pytest.raises(RegistryError, match=complaint) as e:
        reg.manifest("m@v1")
    assert url in str(e.value)
    assert mfm(["pull", "m@v1", "--registry", reg.url, "--dest", str(tmp_path / "d")]) == 1
    assert url in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert mfm(["registry", "list", "m", "--registry", reg.url]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("v2\t") and url in err  # v1 is reported, v2 still listed


def test_names_with_a_trailing_newline_are_refused(reg):
    for bad in ("m\n", "m@v1\n", "m@production\n", "m\n@v1"):
        with pytest.raises(RegistryError):
            parse_ref(bad)
    for what in ("name", "alias"):
        with pytest.raises(RegistryError):
            check_name("prod\n", what)
    with pytest.raises(RegistryError, match="invalid name"):
        reg.register("m\n", storage.join(reg.url, "..", "e1"))
    assert parse_ref("m@v1") == Ref("m", version=1)


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_pull_refuses_a_manifest_without_weights_or_config(reg, missing, tmp_path, capsys):
    _rewrite_manifest(reg, 1, lambda m: dict(m, files={k: v for k, v in m["files"].items() if k != missing}))
    with pytest.raises(RegistryError, match=f"does not list {missing}"):
        pull_version(reg, "m@v1", tmp_path / "d")
    assert mfm(["pull", "m@v1", "--registry", reg.url, "--dest", str(tmp_path / "d")]) == 1
    assert "verified" not in capsys.readouterr().out
    assert not (tmp_path / "d").exists()


def test_a_refused_pull_leaves_the_destination_as_it_was(reg, tmp_path):
    """model.safetensors is fetched after README.md, config.json and metrics.json: none of them
    may land in the destination when it fails."""
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    url = storage.join(reg.version_url("m", 1), "model.safetensors")
    data = bytearray(storage.read_bytes(url))
    data[-1] ^= 0x01
    storage.write_bytes(url, bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.safetensors: checksum mismatch"):
        pull_version(reg, "m@v1", dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    storage.write_bytes(url, bytes(data[:-1]) + bytes([data[-1] ^ 0x01]))  # repaired: the pull completes
    pull_version(reg, "m@v1", dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["keep.txt", "model.safetensors", "config.json", "README.md", "metrics.json", "manifest.json"]
    )


def test_gc_removes_only_old_abandoned_claims(reg, capsys):
    # v2: a register killed two days ago after its claim and one file; v3: a claim being worked on
    # (an hour old); v4: a claim whose body is unreadable, so its age is the store's mtime (now).
    def claim(version: int, body: bytes) -> None:
        storage.write_bytes(storage.join(reg.version_url("m", version), ".claim"), body)

    ago = lambda hours: (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours)).isoformat()  # noqa: E731
    claim(2, json.dumps({"owner": "dead", "created": ago(48)}).encode())
    storage.write_bytes(storage.join(reg.version_url("m", 2), "config.json"), b"{}")
    claim(3, json.dumps({"owner": "alive", "created": ago(1)}).encode())
    claim(4, b"not json")
    assert collect_abandoned_claims(reg, 86400, dry_run=True) == [reg.version_url("m", 2)]
    assert storage.exists(storage.join(reg.version_url("m", 2), ".claim"))
    assert mfm(["registry", "gc", "--older-than", "1d", "--registry", reg.url]) == 0
    assert capsys.readouterr().out.split() == ["removed", reg.version_url("m", 2)]
    assert not storage.exists(storage.join(reg.version_url("m", 2), ".claim"))
    assert not storage.exists(storage.join(reg.version_url("m", 2), "config.json"))
    assert storage.exists(storage.join(reg.version_url("m", 3), ".claim"))  # too young
    assert storage.exists(storage.join(reg.version_url("m", 4), ".claim"))
    assert reg.versions("m") == [1] and reg.manifest("m@v1")["version"] == 1  # complete: untouched
    assert storage.exists(storage.join(reg.version_url("m", 1), ".claim"))
    assert collect_abandoned_claims(reg, 86400) == []
    assert collect_abandoned_claims(reg, 1800) == [reg.version_url("m", 3)]
    with pytest.raises(SystemExit):  # argparse's usage error
        mfm(["registry", "gc", "--older-than", "soon", "--registry", reg.url])


def test_registering_the_same_export_again_returns_the_same_version(reg, store_url):
    """The retry case: a register stage that failed after registering but before promoting."""
    export = storage.join(store_url, "e1")
    assert reg.register("m", export, aliases=("latest", "candidate")) == Ref("m", version=1)
    assert reg.versions("m") == [1] and reg.aliases("m") == {"latest": 1, "staging": 1, "candidate": 1}
    # Different metrics or weights are a different version.
    assert reg.register("m", export, metrics={"top1": 0.7}) == Ref("m", version=2)
    assert reg.register("m", small_export(storage.join(store_url, "e3"), 3, {"top1": 0.5})) == Ref("m", version=3)
    assert reg.alias_version("m", "latest") == 3
    assert reg.register("m", export) == Ref("m", version=1)
    assert reg.alias_version("m", "latest") == 3  # latest never moves back


def test_a_data_manifest_of_the_wrong_shape_is_named(reg, store_url):
    url = storage.join(store_url, "shards", "train", "manifest.json")
    storage.write_bytes(url, b"[1, 2]")
    export = small_export(storage.join(store_url, "e9"), 9)
    with pytest.raises(RegistryError, match="a JSON object expected") as e:
        reg.register("m", export, data_manifest_url=storage.join(store_url, "shards", "train"))
    assert url in str(e.value) and reg.versions("m") == [1]


# ---------------------------------------------------------------------------- config.json reaches timm (issue 26/10)


def hostile_export(url: str, config: dict) -> str:
    storage.write_bytes(storage.join(url, "model.safetensors"), save({"w": torch.zeros(2)}))
    storage.write_bytes(storage.join(url, "config.json"), json.dumps(config).encode())
    return url


@pytest.mark.parametrize("arch", ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "local-dir:/etc", "Vit_Tiny"])
def test_register_and_load_refuse_a_sourced_architecture(tmp_path, arch):
    from pipeline.registry import load_export

    export = hostile_export(str(tmp_path / "e"), {"architecture": arch, "num_classes": 0})
    with pytest.raises(RegistryError, match="'architecture' must be a plain timm model name"):
        Registry(str(tmp_path / "reg")).register("m", export)
    with pytest.raises(RegistryError, match="config.json: 'architecture'"):
        load_export(export)


@pytest.mark.parametrize(
    "model_args, message",
    [
        ({"checkpoint_path": "/etc/passwd"}, "checkpoint_path"),
        ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "pretrained_cfg_overlay"),
        ({"pretrained": True}, "pretrained"),
        ({"definitely_not_an_argument": 1}, "not arguments of vit_tiny_patch16_224's constructor"),
    ],
)
def test_load_refuses_model_args_timm_would_load_from(tmp_path, model_args, message):
    from pipeline.registry import load_export

    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "model_args": model_args}
    with pytest.raises(RegistryError, match=message):
        load_export(hostile_export(str(tmp_path / "e"), config))


def test_only_descriptive_pretrained_cfg_fields_reach_timm():
    from pipeline.registry.architecture import pretrained_cfg_overlay

    config = {"pretrained_cfg": {"file": "/etc/passwd", "url": "http://x", "hf_hub_id": "a/b", "crop_pct": 0.875}}
    assert pretrained_cfg_overlay(config) == {"crop_pct": 0.875}


def test_model_card_quotes_what_it_is_given():
    from pipeline.registry import model_card

    card = model_card("m", 1, {"architecture": "x` <img src=y onerror=alert(1)> `"}, {"run_url": "a``b\nc"}, {})
    assert "Architecture: `` x` <img src=y onerror=alert(1)> ` `` (timm)" in card
    assert "- pretraining run: ```a``b c```" in card


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
ARCH = st.sampled_from(["vit_tiny_patch16_224", "resnet18", "hf-hub:a/b", "local-dir:/", "x" * 200, ""]) | st.text()
ARG = st.sampled_from(["img_size", "patch_size", "depth", "checkpoint_path", "pretrained_cfg", "__init__"]) | st.text()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.fixed_dictionaries(
        {},
        optional={
            "architecture": ARCH | JSON,
            "num_classes": st.integers(-2, 2000) | JSON,
            "model_args": st.dictionaries(ARG, JSON, max_size=4) | JSON,
            "pretrained_cfg": st.dictionaries(st.sampled_from(["input_size", "file", "mean"]), JSON) | JSON,
        },
    )
    | JSON
)
@example({"architecture": "vit_tiny_patch16_224", "model_args": {"depth": "deep", "img_size": 32}})
@example({"architecture": "resnet18", "num_classes": 3, "model_args": {"in_chans": [1, 2]}})
@example({"architecture": "vit_tiny_patch16_224", "model_args": {"patch_size": 8, "img_size": 32}})
def test_config_json_parser_property(config):
    """Any JSON: a RegistryError naming the file, or a config whose architecture is a registered
    timm model and whose model_args its constructor takes, none of them one that loads a file."""
    from pipeline.registry.architecture import FORBIDDEN_ARGS, check_buildable, check_model_config

    try:
        checked = check_model_config(config, "e/config.json")
        args = check_buildable(checked, "e/config.json")
    except RegistryError as e:
        assert "e/config.json" in str(e)
        return
    import timm

    from pipeline.registry import model_from_export

    assert timm.is_model(checked["architecture"]) and ":" not in checked["architecture"]
    assert not set(args) & FORBIDDEN_ARGS
    with pytest.raises(RegistryError):  # building it: a clear error (these weights fit nothing), never another
        model_from_export(checked, {"w": torch.zeros(1)}, what="e/config.json")
