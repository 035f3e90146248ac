"""mfm sample-data: both layouts, deterministic, and the fallback without Debian's files."""

import csv
import hashlib
import os
import tarfile

import pytest
from PIL import Image

from pipeline import sample_data


def _digest(root):
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, root).encode() + open(p, "rb").read())
    return h.hexdigest()


@pytest.mark.skipif(
    not sample_data.fashion_mnist_available(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashion_mnist_in_both_layouts(tmp_path):
    from pipeline.sample_data import cli

    assert cli(["--dest", str(tmp_path / "a"), "--per-class", "8", "--size", "48"]) == 0
    folder, ilsvrc = tmp_path / "a" / "folder", tmp_path / "a" / "ilsvrc"
    assert sorted(os.listdir(folder / "train")) == [f"n{i:08d}" for i in range(10)]
    files = os.listdir(folder / "train" / "n00000009")
    assert sorted(files) == sorted(f"n00000009_{i}.JPEG" for i in range(1, 9))
    img = Image.open(folder / "train" / "n00000009" / files[0])
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (48, 48))
    assert sum(len(os.listdir(folder / "val" / c)) for c in os.listdir(folder / "val")) == 20
    assert open(ilsvrc / "LOC_synset_mapping.txt").readline() == "n00000000 T-shirt/top\n"

    with tarfile.open(ilsvrc / "ILSVRC2012_img_train.tar") as outer:
        assert sorted(outer.getnames()) == [f"n{i:08d}.tar" for i in range(10)]
        inner = tarfile.open(fileobj=outer.extractfile("n00000009.tar"))
        assert sorted(inner.getnames()) == sorted(files)
        assert inner.extractfile(files[0]).read() == (folder / "train" / "n00000009" / files[0]).read_bytes()
    rows = list(csv.DictReader(open(ilsvrc / "LOC_val_solution.csv")))
    with tarfile.open(ilsvrc / "ILSVRC2012_img_val.tar") as val:
        assert sorted(val.getnames()) == sorted(f"{r['ImageId']}.JPEG" for r in rows)
    first = rows[0]
    assert (folder / "val" / first["PredictionString"].split()[0] / f"{first['ImageId']}.JPEG").exists()

    assert cli(["--dest", str(tmp_path / "b"), "--per-class", "8", "--size", "48"]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_skimage_fallback_and_bad_files(tmp_path):
    s = sample_data.build(str(tmp_path), per_class=3, size=32, with_bad_files=True, source="skimage")
    assert s["source"] == "skimage" and s["classes"] == len(sample_data.SKIMAGE_PHOTOS)
    assert s["train"] == 3 * s["classes"] + len(sample_data.BAD_FILES)
    first = tmp_path / "folder" / "train" / "n00000000"
    assert os.path.getsize(first / "n00000000_bad_empty.JPEG") == 0
    assert Image.open(first / "n00000000_bad_png.JPEG").format == "PNG"
    assert Image.open(first / "n00000000_bad_cmyk.JPEG").mode == "CMYK"
    assert Image.open(first / "n00000000_bad_gray.JPEG").mode == "L"
    assert Image.open(first / "n00000000_1.JPEG").size == (32, 32)
