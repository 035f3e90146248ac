"""Evaluation: top-k against hand-computed cases, k-NN and linear probe on synthetic features,
the corruption package's effect, and the whole evaluation of a tiny timm encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.evaluation import (
    ALL_CORRUPTIONS,
    EvalOptions,
    Tally,
    accuracy,
    as_uint8,
    corrupt_images,
    evaluate_classifier,
    evaluate_model,
    evaluate_robustness,
    knn_eval,
    linear_probe_eval,
    metrics_table,
    normalize,
    parse_corruptions,
    parse_severities,
    summarize_robustness,
    topk_correct,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_topk_hand_computed():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1 hit
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.6],  # label 4: 5th highest (0.6,0.5,0.4,0.3,0.2) -> no; 0.1 is 6th
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.6],  # label 3: 4th highest -> top-5 hit only
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # label 0: miss... top-5 of ties is up to topk; not asserted below
        ]
    )
    labels = torch.tensor([1, 4, 3, 6])
    assert topk_correct(logits[:3], labels[:3]) == {1: 1, 5: 2}
    assert accuracy(logits[:3], labels[:3]) == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3)}
    assert topk_correct(logits[3:], labels[3:], ks=(1,)) == {1: 0}
    # Fewer classes than k: top-5 of 3 classes is always a hit.
    assert accuracy(torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([0])) == {"top1": 0.0, "top5": 1.0}
    with pytest.raises(ValueError, match="logits must be"):
        topk_correct(torch.zeros(3), torch.zeros(3))


def test_tally_over_batches_equals_whole():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 10, generator=gen), torch.randint(0, 10, (50,), generator=gen)
    tally = Tally()
    for start in range(0, 50, 16):
        tally.update(logits[start : start + 16], labels[start : start + 16])
    whole = accuracy(logits, labels)
    assert tally.result() == {
        "top1": pytest.approx(whole["top1"]),
        "top5": pytest.approx(whole["top5"]),
        "num_samples": 50,
    }
    with pytest.raises(ValueError, match="no samples"):
        Tally().result()


def test_evaluate_classifier_over_uint8_and_normalised_batches():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    # Class 1 when the red channel's mean is above the green's: computable by hand from the pixels.
    truth = (images[:, 0].float().mean((1, 2)) > images[:, 1].float().mean((1, 2))).long()

    def classify(x):
        px = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
            1, 3, 1, 1
        )
        score = px[:, 0].mean((1, 2)) - px[:, 1].mean((1, 2))
        return torch.stack([-score, score], dim=1)

    expected = (truth == labels).float().mean().item()
    batches = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    assert evaluate_classifier(classify, batches)["top1"] == pytest.approx(expected)
    normalised = [(normalize(i, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), y) for i, y in batches]
    assert evaluate_classifier(classify, normalised)["top1"] == pytest.approx(expected)
    assert torch.equal(as_uint8(normalised[0][0], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), images[:3])


def clustered(n: int, classes: int, dim: int, seed: int, random_labels: bool = False):
    gen = torch.Generator().manual_seed(seed)
    centres = (
        torch.nn.functional.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)), dim=1) * 8
    )
    labels = torch.randint(0, classes, (n,), generator=gen)
    feats = centres[labels] + torch.randn(n, dim, generator=gen)
    if random_labels:
        labels = torch.randint(0, classes, (n,), generator=gen)
    return feats, labels


def test_knn_and_linear_probe_separable_vs_random():
    classes = 5
    tr_f, tr_y = clustered(1000, classes, 32, seed=1)
    va_f, va_y = clustered(500, classes, 32, seed=2)
    knn = knn_eval(tr_f, tr_y, va_f, va_y, k=20, temperature=0.07)
    probe, _ = linear_probe_eval(tr_f, tr_y, va_f, va_y, epochs=10)
    assert knn["top1"] > 0.97 and probe["top1"] > 0.97

    rtr_f, rtr_y = clustered(1000, classes, 32, seed=3, random_labels=True)
    rva_f, rva_y = clustered(1000, classes, 32, seed=4, random_labels=True)
    chance = 1 / classes
    assert abs(knn_eval(rtr_f, rtr_y, rva_f, rva_y)["top1"] - chance) < 0.06
    assert abs(linear_probe_eval(rtr_f, rtr_y, rva_f, rva_y, epochs=10)[0]["top1"] - chance) < 0.06


def scene(size: int = 64) -> torch.Tensor:
    """A smooth gradient with a bright square: structure for blur/noise to destroy."""
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 3, y * 3, (x + y) * 2], axis=0).clip(0, 255).astype(np.uint8)
    img[:, 20:40, 20:40] = 230
    return torch.from_numpy(img)[None]


def test_corruption_grows_with_severity_and_is_repeatable():
    clean = scene()
    for name in ("gaussian_noise", "defocus_blur"):
        dist = []
        for s in range(1, 6):
            out = corrupt_images(clean, name, s, seed=1)
            assert out.dtype == torch.uint8 and out.shape == clean.shape
            dist.append((out.float() - clean.float()).abs().mean().item())
        assert dist[0] > 0 and all(a < b for a, b in zip(dist, dist[1:])), (name, dist)
    assert torch.equal(
        corrupt_images(clean, "gaussian_noise", 3, seed=5), corrupt_images(clean, "gaussian_noise", 3, seed=5)
    )
    assert not torch.equal(
        corrupt_images(clean, "gaussian_noise", 3, seed=5), corrupt_images(clean, "gaussian_noise", 3, seed=6)
    )


def test_corruption_and_severity_specs():
    assert parse_corruptions("all") == list(ALL_CORRUPTIONS) and len(ALL_CORRUPTIONS) == 15
    assert parse_corruptions("none") == []
    assert parse_corruptions("noise,fog") == ["gaussian_noise", "shot_noise", "impulse_noise", "fog"]
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        parse_corruptions("rain")
    assert parse_severities("5,1,3") == [1, 3, 5]
    with pytest.raises(ValueError, match="severities"):
        parse_severities("0,6")


def test_robustness_report():
    """A brightness classifier is perfect on clean images; its accuracy under noise and contrast is
    tallied per corruption and severity, and the means are the means of those cells."""
    dark = torch.full((4, 3, 32, 32), 60, dtype=torch.uint8)
    bright = torch.full((4, 3, 32, 32), 190, dtype=torch.uint8)
    images, labels = torch.cat([dark, bright]), torch.tensor([0] * 4 + [1] * 4)

    def classify(x):
        score = x.mean((1, 2, 3))
        return torch.stack([-score, score], dim=1)

    out = evaluate_robustness(classify, [(images, labels)], ["gaussian_noise", "contrast"], [1, 5])
    assert out["clean"]["top1"] == 1.0
    rob = out["robustness"]
    cells = [rob["corruptions"][c][s]["top1"] for c in ("gaussian_noise", "contrast") for s in ("1", "5")]
    assert rob["mean_top1"] == pytest.approx(sum(cells) / 4)
    assert rob["mean_error"] == pytest.approx(1 - rob["mean_top1"])
    assert rob["per_family_top1"].keys() == {"noise", "digital"}
    assert rob["severities"] == [1, 5]
    assert rob["drop_top1"] == pytest.approx(1.0 - rob["mean_top1"])
    # Uneven grids: the mean over corruptions weighs each corruption equally, the cell mean does not.
    uneven = summarize_robustness(
        {
            ("fog", 1): {"top1": 1.0, "top5": 1.0},
            ("fog", 2): {"top1": 1.0, "top5": 1.0},
            ("snow", 1): {"top1": 0.0, "top5": 1.0},
        }
    )
    assert uneven["mean_top1"] == pytest.approx(2 / 3) and uneven["mean_over_corruptions_top1"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_encoder():
    from pipeline.config import ModelConfig
    from pipeline.models import build_model, export_encoder
    from pipeline.registry import model_from_export

    torch.manual_seed(0)
    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4)
    state, config = export_encoder(build_model(cfg), cfg)
    return model_from_export(config, state), state, config


def stripes(n: int, seed: int):
    """Class 0: horizontal stripes, class 1: vertical; random phase and colour."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    coords = torch.arange(32)
    imgs = []
    for y in labels:
        phase = int(torch.randint(0, 8, (1,), generator=gen))
        wave = (((coords + phase) // 4) % 2).float()
        pattern = wave.view(32, 1).expand(32, 32) if y == 0 else wave.view(1, 32).expand(32, 32)
        colour = torch.rand(3, 1, 1, generator=gen) * 0.5 + 0.5
        imgs.append((pattern * colour * 255).to(torch.uint8))
    return torch.stack(imgs), labels


def test_evaluate_model_encoder_with_probe(tiny_encoder):
    model, _, _ = tiny_encoder
    train_x, train_y = stripes(32, 0)
    val_x, val_y = stripes(8, 1)
    metrics = evaluate_model(
        model,
        lambda: [(val_x[:4], val_y[:4]), (val_x[4:], val_y[4:])],
        lambda: [(train_x[i : i + 16], train_y[i : i + 16]) for i in range(0, 32, 16)],
        EvalOptions(corruptions=["gaussian_noise"], severities=[1, 5], probe_epochs=30),
    )
    assert metrics["classifier"] == "linear_probe" and metrics["num_samples"] == 8
    # Stripe orientation is linearly readable even from a random ViT's frozen features.
    assert metrics["linear_probe"]["top1"] >= 0.9 and metrics["top1"] == metrics["linear_probe"]["top1"]
    assert metrics["knn"]["k"] == 20 and 0 <= metrics["knn"]["top1"] <= 1
    assert set(metrics["robustness"]["corruptions"]["gaussian_noise"]) == {"1", "5"}
    rows = {r["metric"]: r["value"] for r in metrics_table(metrics)}
    assert "top1" in rows and "gaussian_noise@5" in rows and "robustness.mean_top1" in rows
    json.dumps(metrics)  # serialisable as metrics.json
    with pytest.raises(ValueError, match="no classifier head"):
        evaluate_model(model, lambda: [(val_x, val_y)])


def test_mfm_evaluate_on_shards(tiny_encoder, tmp_path, capsys):
    """`mfm evaluate` end to end: real shards through pipeline.data, an export folder and then
    the same weights from the registry; metrics.json lands beside the export."""
    from safetensors.torch import save
    from test_data_shards import write_split

    from pipeline import storage
    from pipeline.cli import main as mfm
    from pipeline.registry import Registry

    _, state, config = tiny_encoder
    train, val = str(tmp_path / "train"), str(tmp_path / "val")
    write_split(train, [12, 8])
    write_split(val, [10], split="val")
    export = str(tmp_path / "run" / "export")
    storage.write_bytes(storage.join(export, "model.safetensors"), save(state))
    storage.write_bytes(storage.join(export, "config.json"), json.dumps(config).encode())
    common = [
        "--data",
        val,
        "--train-data",
        train,
        "--corruptions",
        "gaussian_noise",
        "--severities",
        "1,5",
        "--device",
        "cpu",
        "--batch-size",
        "8",
        "--probe-epochs",
        "2",
        "--set",
        "data.workers=0",
    ]

    ood = write_ood_folder(tmp_path / "imagenet-r", {"n00000001": [30, 90], "n00000003": [150, 240]})
    assert mfm(["evaluate", "--model", export, *common, "--ood", f"imagenet-r={ood}"]) == 0
    metrics = json.loads((tmp_path / "run" / "export" / "metrics.json").read_text())
    assert metrics["ood_sets"] == {"imagenet-r": str(ood)}
    r = metrics["ood"]["imagenet-r"]
    assert (r["num_samples"], r["num_classes"], r["url"]) == (4, 2, str(ood)) and 0 <= r["top1"] <= 1
    assert metrics["robustness"]["mCE_note"].startswith("not mCE")  # one corruption at two severities
    assert metrics["format_version"] == 1 and metrics["model"] == export and metrics["num_samples"] == 10
    assert metrics["classifier"] == "linear_probe" and metrics["knn"]["num_samples"] == 10
    assert set(metrics["robustness"]["corruptions"]["gaussian_noise"]) == {"1", "5"}
    assert "top1" in capsys.readouterr().out

    reg = Registry(str(tmp_path / "registry"))
    reg.register("tiny", export)  # picks up the metrics.json beside the export
    assert reg.metrics("tiny@latest")["top1"] == metrics["top1"]
    assert reg.metrics("tiny@latest")["ood.imagenet-r.top1"] == r["top1"]  # the registry entry records the set
    out = str(tmp_path / "by-ref.json")
    assert (
        mfm(
            [
                "evaluate",
                "--model",
                "tiny@latest",
                "--registry",
                reg.url,
                "--out",
                out,
                *common,
                "--corruptions",
                "none",
            ]
        )
        == 0
    )
    by_ref = json.loads(open(out).read())
    assert by_ref["model"] == "tiny@v1" and "robustness" not in by_ref
    assert by_ref["knn"] == metrics["knn"]  # same weights, same data, same features

    assert mfm(["evaluate", "--model", "tiny@nope", "--registry", reg.url, *common]) == 1
    assert "no alias 'nope'" in capsys.readouterr().err


def test_encoder_without_corruptions_reads_the_val_data_once(tiny_encoder):
    model, _, _ = tiny_encoder
    train_x, train_y = stripes(16, 0)
    val_x, val_y = stripes(8, 1)
    reads = []

    def val():
        reads.append(1)
        return [(val_x, val_y)]

    metrics = evaluate_model(model, val, lambda: [(train_x, train_y)], EvalOptions(probe_epochs=5))
    assert len(reads) == 1 and metrics["num_samples"] == 8
    assert (metrics["top1"], metrics["top5"]) == (metrics["linear_probe"]["top1"], metrics["linear_probe"]["top5"])


# ---------------------------------------------------------------------------- mCE and OOD sets


def test_mce_hand_computed():
    from pipeline.robustness import ALEXNET_CLEAN_ERR, ALEXNET_ERR, MCE_NOTE

    # every corruption at half AlexNet's error at each severity: every CE is 0.5, so is mCE
    half = {(c, s): {"top1": 1 - ALEXNET_ERR[c] / 2, "top5": 1.0} for c in ALEXNET_ERR for s in range(1, 6)}
    out = summarize_robustness(half, {"top1": 0.9})
    assert out["corruption_errors"] == pytest.approx(dict.fromkeys(ALEXNET_ERR, 0.5))
    assert out["mCE"] == pytest.approx(0.5) and "mCE_note" not in out
    # errors rising a quarter as fast as AlexNet's above the clean error: relative mCE 0.25
    quarter = {
        (c, s): {"top1": 1 - (0.1 + (ALEXNET_ERR[c] - ALEXNET_CLEAN_ERR) / 4), "top5": 1.0}
        for c in ALEXNET_ERR
        for s in range(1, 6)
    }
    assert summarize_robustness(quarter, {"top1": 0.9})["relative_mCE"] == pytest.approx(0.25)
    # one corruption by hand: errors 0.1..0.5 sum to 1.5; AlexNet's 5 x 0.886428 = 4.43214
    ramp = {("gaussian_noise", s): {"top1": 1 - s / 10, "top5": 1.0} for s in range(1, 6)}
    partial = summarize_robustness({**ramp, ("fog", 1): {"top1": 0.5, "top5": 1.0}}, {"top1": 0.8})
    assert partial["corruption_errors"] == {"gaussian_noise": pytest.approx(1.5 / 4.43214)}
    assert partial["relative_corruption_errors"]["gaussian_noise"] == pytest.approx(
        (1.5 - 5 * 0.2) / (5 * (0.886428 - ALEXNET_CLEAN_ERR))
    )
    # a mean-accuracy-only run says it is not mCE
    assert "mCE" not in partial and partial["mCE_note"] == MCE_NOTE and "not mCE" in MCE_NOTE


def write_ood_folder(root, classes: dict[str, list[int]]):
    """<root>/<wnid>/<i>.png, flat grey images of the given levels."""
    from PIL import Image

    for wnid, levels in classes.items():
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i, level in enumerate(levels):
            Image.new("RGB", (40, 40), (level,) * 3).save(root / wnid / f"{i}.png")
    return root


def test_ood_subset_mapping_hand_computed(tmp_path):
    """An ImageNet-R style folder holds 2 of the model's 6 classes. The model always ranks class 0
    first (not in the set), then class 2 over class 4 for dark images and 4 over 2 for bright ones:
    restricted to the set's classes (as the authors score ImageNet-A/-R) every image is right;
    over all classes (ImageNet-Sketch) none is."""
    from pipeline.robustness import class_subset, evaluate_ood, restrict

    model_classes = [f"n{i:08d}" for i in range(6)]
    assert class_subset(["n00000004", "n00000002"], model_classes, "imagenet-r") == [2, 4]
    assert restrict(torch.arange(6.0).view(1, 6), [2, 4]).tolist() == [[2.0, 4.0]]
    with pytest.raises(ValueError, match="n00000009"):
        class_subset(["n00000009"], model_classes, "imagenet-a")

    folder = write_ood_folder(tmp_path / "r", {"n00000002": [20, 30, 40], "n00000004": [200, 220]})
    (folder / "n00000002" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # skipped and counted
    (folder / "n00000004" / "link.png").symlink_to(folder / "n00000002" / "0.png")  # never read
    (folder / "notes.txt").write_text("not an image")
    outside = write_ood_folder(tmp_path / "outside", {"n00000004": [255]})
    (folder / "n00000005").symlink_to(outside / "n00000004")  # a class folder linked out of the set

    def classify(x):
        bright = (x.mean((1, 2, 3)) > 0).float()
        logits = torch.zeros(len(x), 6)
        logits[:, 0] = 10.0
        logits[:, 2], logits[:, 4] = 1 - bright, bright
        return logits

    common = dict(size=32, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=2)
    r = evaluate_ood(classify, "imagenet-r", str(folder), model_classes, **common)
    assert (r["top1"], r["num_samples"], r["num_classes"]) == (1.0, 5, 2)
    assert r["skipped"] == 4 and any("broken.jpg" in s for s in r["skipped_examples"])
    sketch = evaluate_ood(classify, "imagenet-sketch", str(folder), model_classes, **common)
    assert sketch["top1"] == 0.0 and sketch["logits"] == "all classes"
    with pytest.raises(ValueError, match="not among the model's 6 classes"):
        evaluate_ood(
            classify, "imagenet-a", str(write_ood_folder(tmp_path / "a", {"n00000042": [9]})), model_classes, **common
        )


def test_ood_spec_parsing():
    from pipeline.robustness import parse_ood

    assert parse_ood(["imagenet-r=/data/r", "imagenet-sketch=s3://b/sketch"]) == {
        "imagenet-r": "/data/r",
        "imagenet-sketch": "s3://b/sketch",
    }
    for bad in (["imagenet-r"], ["Imagenet-R=/x"], ["imagenet-r="], ["a=/x", "a=/y"], ["../x=/y"]):
        with pytest.raises(ValueError):
            parse_ood(bad)


def test_ood_spec_parser_property():
    """Any flow parameter or --ood values: a ValueError naming the item, or names that are plain
    lower-case set names mapped to the URLs given."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pipeline.robustness import SET_NAME_RE, parse_ood

    item = st.text(max_size=12) | st.builds(
        lambda n, u: f"{n}={u}", st.from_regex(SET_NAME_RE, fullmatch=True), st.text(max_size=8)
    )

    @settings(max_examples=60, deadline=None)
    @given(spec=st.lists(item, max_size=4) | st.dictionaries(st.text(max_size=8), st.text(max_size=8) | st.integers()))
    def check(spec):
        try:
            out = parse_ood(spec)
        except ValueError:
            return
        assert all(SET_NAME_RE.fullmatch(n) and isinstance(u, str) and u.strip() == u and u for n, u in out.items())

    check()
