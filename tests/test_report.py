"""`mfm report` on a run folder as shared storage may hold it: hostile names, a cut line, a
non-PNG picture, a link out of the folder; the page opens in a real headless chromium. The
reports of real runs are checked where those runs are made (test_training, test_orchestration)."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from browser import open_page  # noqa: E402

from pipeline.cli import main  # noqa: E402


def _png(path, value: float) -> None:
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.imshow([[value, 1 - value]])
    fig.savefig(path)
    plt.close(fig)


def test_browser_check_sees_broken_pages(tmp_path):
    # The negative control: the checks the report tests rely on do fail on a broken page.
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><title>t</title></head><body><img alt="bad" src="data:image/png;base64,AAAA">'
        "<script>throw new Error('boom')</script></body></html>"
    )
    seen = open_page(page)
    assert seen["images"] == [("bad", True, 0)]
    assert any("boom" in e["message"] for e in seen["errors"])


def test_report_of_a_hostile_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "pictures").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {run_dir: '<script>alert(1)</script>'}\nmodel: {name: vit}\n")
    rows = [{"step": s, "loss": 1 / s, "lr": 1e-3} for s in range(1, 6)] + [{"step": 0, "val_loss": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    _png(run / "pictures" / "step-5.png", 0.2)
    _png(run / "pictures" / "step-2.png", 0.8)
    (run / "pictures" / "step-3.png").write_bytes(b"<html>not a picture</html>")
    _png(tmp_path / "outside.png", 0.5)
    os.symlink(tmp_path / "outside.png", run / "pictures" / "step-4.png")
    _png(run / "pictures" / "step-x.png", 0.5)

    assert main(["report", str(run)]) == 0
    out = run / "report.html"
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "src=" not in page.replace('src="data:image/png;base64,', "")  # nothing but inlined images
    assert [c for c in ("step 2", "step 3", "step 4", "step 5") if f"<figcaption>{c}</figcaption>" in page] == [
        "step 2",
        "step 5",
    ]
    seen = open_page(out)
    assert seen["title"].startswith("MFM report") and not seen["errors"], seen["errors"]
    # the latest picture (lead), the curves, the two pictures over time
    assert len(seen["images"]) == 4 and all(w > 0 for _, _, w in seen["images"]), seen["images"]


def test_report_of_nothing_names_the_target(tmp_path, capsys):
    assert main(["report", "no-such-model@production", "--registry", str(tmp_path / "registry")]) == 1
    assert "no-such-model" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "typo")]) == 1
    assert "typo: not a run folder (no config.yaml)" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_report_compares_a_version_with_production(tmp_path):
    """`mfm report NAME@vN` puts each evaluation figure beside production's, with the difference
    and the promotion gate's decision; with no production version it says so."""
    import re

    import torch
    from safetensors.torch import save

    from pipeline.registry import Registry, compare_with_production

    def export(name: str, seed: int, metrics: dict) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(save({"w": torch.full((2,), float(seed))}))
        (folder / "config.json").write_text('{"architecture": "vit_tiny_patch16_224", "num_classes": 0}')
        (folder / "metrics.json").write_text(json.dumps(metrics))
        return str(folder)

    reg = Registry(str(tmp_path / "registry"))
    old = {"top1": 0.5, "knn": {"top1": 0.4}, "linear_probe": {"top1": 0.45}, "robustness": {"mCE": 0.9}}
    old["ood"] = {"imagenet-r": {"top1": 0.2, "url": "/data/r"}}
    new = {"top1": 0.6, "knn": {"top1": 0.35}, "linear_probe": {"top1": 0.5}, "robustness": {"mCE": 0.8}}
    new["ood"] = {"imagenet-r": {"top1": 0.25, "url": "/data/r"}, "imagenet-sketch": {"top1": 0.1}}
    reg.register("m", export("e1", 1, old))
    out = tmp_path / "v1.html"
    assert main(["report", "m@v1", "--registry", reg.url, "--out", str(out)]) == 0
    assert "no production version: nothing to compare with" in out.read_text()
    reg.promote("m@v1")
    reg.register("m", export("e2", 2, new))

    c = compare_with_production(reg, "m@v2")
    rows = {r.metric: r for r in c.rows}
    assert c.production == "m@v1" and c.gate_allowed is True and "top1 0.6 beats 0.5" in c.gate_reason
    assert abs(rows["top1"].difference - 0.1) < 1e-9 and rows["top1"].better is True
    assert abs(rows["knn.top1"].difference + 0.05) < 1e-9 and rows["knn.top1"].better is False
    assert abs(rows["robustness.mCE"].difference + 0.1) < 1e-9 and rows["robustness.mCE"].better is True  # lower
    assert rows["ood.imagenet-r.top1"].production == 0.2 and rows["ood.imagenet-sketch.top1"].production is None

    out = tmp_path / "v2.html"
    assert main(["report", "m@v2", "--registry", reg.url, "--out", str(out)]) == 0
    page = out.read_text()
    table = page[page.index("id='comparison'") :]
    cells = [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", table)]
    row = lambda label: cells[cells.index(label) : cells.index(label) + 4]  # noqa: E731
    assert row("clean top-1") == ["clean top-1", "0.6", "0.5", "+0.1 (better)"]
    assert row("k-NN top-1") == ["k-NN top-1", "0.35", "0.4", "-0.05 (worse)"]
    assert row("linear probe top-1") == ["linear probe top-1", "0.5", "0.45", "+0.05 (better)"]
    assert row("ImageNet-C mCE") == ["ImageNet-C mCE", "0.8", "0.9", "-0.1 (better)"]
    assert row("imagenet-r top-1") == ["imagenet-r top-1", "0.25", "0.2", "+0.05 (better)"]
    assert row("imagenet-sketch top-1") == ["imagenet-sketch top-1", "0.1", "n/a", "n/a"]
    assert "beside m@v1 (production)" in page
    assert "promotion gate (production): would move it here: top1 0.6 beats 0.5" in page
