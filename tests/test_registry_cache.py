"""The verified local cache (issue 21): miss then hit, corruption, offline, list/prune, and four
processes filling one entry once. On a local folder and on the S3 endpoint."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from pipeline import storage
from pipeline.cli import main as mfm
from pipeline.registry import IntegrityError, Ref, Registry, RegistryError, cache, load_model, pull_version

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "model_args": {"img_size": 32, "patch_size": 8}}


def tiny_export(url: str, seed: int) -> tuple[str, dict]:
    """A real (small) timm ViT export, so that a load builds and fills a model."""
    import timm

    with torch.device("meta"):  # shapes only: timm's init is slow and the values do not matter
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(url, "model.safetensors"), save(state))
    storage.write_bytes(storage.join(url, "config.json"), json.dumps(CONFIG).encode())
    return url, state


def same_weights(model, state: dict) -> bool:
    got = model.state_dict()
    return set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MFM_OFFLINE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def two_versions(store_url):
    reg = Registry(storage.join(store_url, "registry"))
    e1, s1 = tiny_export(storage.join(store_url, "e1"), 1)
    e2, s2 = tiny_export(storage.join(store_url, "e2"), 2)
    reg.register("m", e1, aliases=("latest", "production"))
    reg.register("m", e2)
    return reg, {1: s1, 2: s2}


def _entries(root: Path) -> list[cache.Entry]:
    return list(cache.entries(root))


def test_miss_then_hit_reads_no_weights_and_aliases_resolve_each_time(two_versions, cache_dir):
    reg, states = two_versions
    assert same_weights(load_model("m@v1", registry=reg.url), states[1])  # miss: fetched
    [entry] = _entries(cache_dir)
    assert (entry.name, entry.version, entry.registry) == ("m", 1, cache.canonical_url(reg.url))
    assert sorted(p.name for p in entry.path.iterdir() if not p.name.startswith(".")) == [
        "README.md",
        "config.json",
        "manifest.json",
        "model.safetensors",
    ]
    # The store's weights go bad after the fill: a hit never reads them, so it still loads.
    weights_url = storage.join(reg.version_url("m", 1), "model.safetensors")
    storage.write_bytes(weights_url, b"not the weights")
    assert same_weights(load_model("m@v1", registry=reg.url), states[1])
    assert same_weights(load_model("m@production", registry=reg.url), states[1])
    assert len(_entries(cache_dir)) == 1
    # An alias is resolved against the store at every load: moved, it loads the new version.
    reg.set_alias("m", "production", 2)
    assert same_weights(load_model("m@production", registry=reg.url), states[2])
    assert sorted(e.version for e in _entries(cache_dir)) == [1, 2]
    # `mfm pull` goes through the same cache.
    _, dest = pull_version(reg, "m@v1", cache_dir.parent / "pulled")
    assert (dest / "model.safetensors").read_bytes() == (entry.path / "model.safetensors").read_bytes()


def test_a_corrupted_cached_file_is_refetched_with_a_warning(two_versions, cache_dir, caplog):
    reg, states = two_versions
    load_model("m@v1", registry=reg.url)
    [entry] = _entries(cache_dir)
    weights = entry.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pipeline.registry.cache"):
        assert same_weights(load_model("m@v1", registry=reg.url), states[1])
    assert "model.safetensors" in caplog.text and "no longer match" in caplog.text
    [entry] = _entries(cache_dir)
    assert not [p for p in entry.path.parent.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    # A file only touched (same bytes) is hashed again and kept, without a warning.
    caplog.clear()
    os.utime(entry.path / "config.json")
    with caplog.at_level(logging.WARNING, logger="pipeline.registry.cache"):
        load_model("m@v1", registry=reg.url)
    assert "no longer match" not in caplog.text


def test_offline_loads_pinned_versions_from_the_cache_only(two_versions, cache_dir, monkeypatch, capsys):
    reg, states = two_versions
    load_model("m@v1", registry=reg.url)
    # The whole registry disappears (a dead endpoint would do the same): offline needs none of it.
    fs, path = storage.filesystem(reg.url)
    fs.rm(path, recursive=True)
    monkeypatch.setenv("MFM_OFFLINE", "1")
    assert same_weights(load_model("m@v1", registry=reg.url), states[1])
    with pytest.raises(RegistryError, match=r"m@production: MFM_OFFLINE=1 loads pinned versions only"):
        load_model("m@production", registry=reg.url)
    with pytest.raises(RegistryError, match=r"m@v2: not in the cache .* MFM_OFFLINE=1 forbids fetching it"):
        load_model("m@v2", registry=reg.url)
    assert mfm(["pull", "m@v1", "--registry", reg.url, "--dest", str(cache_dir.parent / "d")]) == 0
    assert mfm(["pull", "m", "--registry", reg.url, "--dest", str(cache_dir.parent / "e")]) == 1
    assert "m@latest: MFM_OFFLINE=1 loads pinned versions only" in capsys.readouterr().err
    # Offline, a corrupted entry cannot be refetched: refused, naming the file.
    [entry] = _entries(cache_dir)
    (entry.path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(IntegrityError, match=r"model\.safetensors .* no longer match"):
        load_model("m@v1", registry=reg.url)


def test_cache_list_and_prune(two_versions, cache_dir, capsys):
    reg, _ = two_versions
    load_model("m@v1", registry=reg.url)
    load_model("m@v2", registry=reg.url)
    load_model("m@v1", registry=reg.url)  # v1 is now the most recently used
    assert mfm(["cache", "list"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert sorted(r[1] for r in rows) == ["m@v1", "m@v2"] and {r[0] for r in rows} == {cache.canonical_url(reg.url)}
    assert mfm(["cache", "prune", "--keep", "1"]) == 0
    assert "removed m@v2" in capsys.readouterr().out
    assert [e.version for e in _entries(cache_dir)] == [1]
    assert mfm(["cache", "prune", "--keep", "0"]) == 0 and _entries(cache_dir) == []


WORKER = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from pipeline.registry import load_model
reg_url, go = sys.argv[1:3]
while not os.path.exists(go):
    time.sleep(0.005)
model = load_model("m@production", registry=reg_url)
print(sum(float(p.double().sum()) for p in model.parameters()))
"""


@pytest.mark.slow
def test_four_processes_fill_the_cache_once(s3_endpoint, cache_dir, tmp_path):
    reg = Registry(f"s3://mfm-test/cache-race-{os.getpid()}-{tmp_path.name}/registry")
    _, state = tiny_export(storage.join(reg.url, "..", "e1"), 1)
    reg.register("m", storage.join(reg.url, "..", "e1"), aliases=("latest", "production"))
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, reg.url, str(go)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    go.touch()  # all load at once, once imported
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    fills = sum(err.count("fetched m@v1 into the cache") for _, err in outs)
    assert fills == 1, [err for _, err in outs]
    expected = sum(float(v.double().sum()) for v in state.values())
    assert all(float(out) == pytest.approx(expected) for out, _ in outs)
    [entry] = _entries(cache_dir)
    assert entry.version == 1
    assert not [p for p in entry.path.parent.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert Ref("m", version=1) == reg.resolve("m@production")


@pytest.mark.slow
def test_bench_registry_runs(tmp_path):
    """`mfm bench registry` end to end on a small model (its own moto server, so a subprocess)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("AWS_ENDPOINT_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", "registry", "--arch", "vit_tiny_patch16_224", "--repeats", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"load_model cold [\d.]+s .* warm [\d.]+s: warm is [\d.]+x faster", done.stdout), done.stdout


def test_a_file_larger_than_its_manifest_says_is_not_downloaded_whole(two_versions, cache_dir, monkeypatch):
    """The store's weights replaced by twice its size under a manifest that declares the old size:
    the fill reads at most the declared size + 1 byte, so a lying manifest cannot fill the disk."""
    reg, _ = two_versions
    declared = reg.manifest("m@v1")["files"]["model.safetensors"]["size"]
    storage.write_bytes(storage.join(reg.version_url("m", 1), "model.safetensors"), os.urandom(2 * declared))
    got = []
    real = storage.filesystem

    def counting(url, cfg=None):  # counts the bytes the cache takes from every file it opens
        fs, path = real(url, cfg)

        class Counted:
            def __getattr__(self, name):
                return getattr(fs, name)

            def open(self, *args, **kwargs):
                f = fs.open(*args, **kwargs)
                read = f.read

                def counted(*a):
                    b = read(*a)
                    got.append(len(b))
                    return b

                f.read = counted
                return f

        return Counted(), path

    monkeypatch.setattr(storage, "filesystem", counting)
    with pytest.raises(IntegrityError, match=rf"model.safetensors: checksum mismatch .* size {declared}, got"):
        cache.cached_version(reg, "m@v1")
    assert sum(got) <= declared + 1 + (1 << 20)  # the other files are small
    assert not [p for p in cache_dir.rglob("*") if p.is_file() and p.stat().st_size > declared + 1]
