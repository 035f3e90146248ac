"""Racing writers, in threads and in separate processes, on a local folder and on the S3 endpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import save

from pipeline import storage
from pipeline.registry import PromotionRefused, Registry

REPO = Path(__file__).resolve().parents[1]


def small_export(url: str, seed: int, metrics: dict | None = None) -> str:
    """A valid one-tensor export whose weights identify its registrant."""
    import torch

    storage.write_bytes(storage.join(url, "model.safetensors"), save({"w": torch.full((4,), float(seed))}))
    storage.write_bytes(storage.join(url, "config.json"), b'{"architecture": "vit_tiny_patch16_224", "num_classes": 0}')
    if metrics is not None:
        storage.write_bytes(storage.join(url, "metrics.json"), json.dumps(metrics).encode())
    return url


def _sha(url: str) -> str:
    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


def _check_outcome(reg: Registry, name: str, owners: dict[str, list[int]], exports: dict[str, str]) -> None:
    """Distinct versions 1..N, each holding its own registrant's weights, and `latest` = N."""
    versions = sorted(v for vs in owners.values() for v in vs)
    assert versions == list(range(1, len(versions) + 1)), owners
    assert reg.versions(name) == versions
    for owner, vs in owners.items():
        for v in vs:
            manifest = reg.manifest(f"{name}@v{v}")
            assert manifest["files"]["model.safetensors"]["sha256"] == _sha(
                storage.join(exports[owner], "model.safetensors")
            )
            assert manifest["lineage"]["export_url"] == exports[owner]
    assert reg.alias_version(name, "latest") == len(versions)


def test_conditional_writes_have_one_winner(store_url):
    url = storage.join(store_url, "k.json")
    barrier = threading.Barrier(6)

    def create(i):
        barrier.wait()
        return storage.create_bytes(url, f"{i}".encode())

    with ThreadPoolExecutor(6) as pool:
        created = list(pool.map(create, range(6)))
    assert created.count(True) == 1
    assert storage.read_bytes(url) == str(created.index(True)).encode()

    data, token = storage.read_versioned(url)

    def swap(i):
        barrier.wait()
        return storage.replace_bytes_if(url, f"swap{i}".encode(), token)

    with ThreadPoolExecutor(6) as pool:
        swapped = list(pool.map(swap, range(6)))
    assert swapped.count(True) == 1
    assert storage.read_bytes(url) == f"swap{swapped.index(True)}".encode()
    assert not storage.replace_bytes_if(url, b"stale", token)


def test_racing_registrations_in_threads(store_url):
    reg = Registry(storage.join(store_url, "registry"))
    exports = {str(i): small_export(storage.join(store_url, f"e{i}"), i) for i in range(6)}
    barrier = threading.Barrier(len(exports))

    def register(owner):
        barrier.wait()
        return owner, [reg.register("m", exports[owner]).version]

    with ThreadPoolExecutor(len(exports)) as pool:
        owners = dict(pool.map(register, exports))
    _check_outcome(reg, "m", owners, exports)


WORKER = """
import json, os, sys, time
from pipeline.registry import Registry
reg_url, go, out, *exports = sys.argv[1:]
reg = Registry(reg_url)
while not os.path.exists(go):
    time.sleep(0.005)
versions = [reg.register("m", export).version for export in exports]
open(out, "w").write(json.dumps(versions))
"""


@pytest.mark.slow
def test_racing_registrations_in_processes(store_url, tmp_path):
    reg = Registry(storage.join(store_url, "registry"))
    # Two distinct exports per process (registering the same bytes twice is idempotent).
    exports = {
        f"{i}{j}": small_export(storage.join(store_url, f"e{i}{j}"), 10 * i + "ab".index(j))
        for i in range(4)
        for j in "ab"
    }
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = {
        str(i): subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                reg.url,
                str(go),
                str(tmp_path / str(i)),
                exports[f"{i}a"],
                exports[f"{i}b"],
            ],
            env=env,
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    }
    go.touch()  # all start together once imported: they race on every claim and alias move
    for p in procs.values():
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    owners = {}
    for i in procs:
        va, vb = json.loads((tmp_path / i).read_text())
        owners[f"{i}a"], owners[f"{i}b"] = [va], [vb]
    _check_outcome(reg, "m", owners, exports)


def test_racing_gated_promotions_keep_the_best(store_url):
    """Two promotions race from the same production version: whichever order the swaps land in,
    the better candidate ends in production (a lost update would leave the worse one there)."""
    reg = Registry(storage.join(store_url, "registry"))
    for round_ in range(3):
        name = f"m{round_}"
        for i, top1 in enumerate([0.5, 0.7, 0.9], start=1):
            reg.register(name, small_export(storage.join(store_url, f"{name}-e{i}"), i, {"top1": top1}))
        reg.promote(f"{name}@v1")
        barrier = threading.Barrier(2)

        def promote(v, name=name, barrier=barrier):
            barrier.wait()
            try:
                reg.promote(f"{name}@v{v}")
                return "moved"
            except PromotionRefused:
                return "refused"

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(promote, [2, 3]))
        assert reg.alias_version(name, "production") == 3
        assert results[1] == "moved"
        alias = json.loads(storage.read_bytes(reg.alias_url(name, "production")))
        assert alias["version"] == 3 and alias["previous"] in (1, 2)
