"""Kaggle's ImageNet download (imagenet-object-localization-challenge): train in class folders,
val flat and labelled by LOC_val_solution.csv. Both splits are sharded with torchvision's ImageNet
labels (sorted wnids), and a split with files but nothing to shard is an error saying what was found."""

from __future__ import annotations

import os

import pytest
from test_data_shards import jpeg
from test_sharding_growth import samples_of

from pipeline import storage
from pipeline.cli import main
from pipeline.sharding import SourceError, shard_dataset, sources, verify_split
from pipeline.sharding.sources import KAGGLE_DATA, available_splits

SYNSETS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus", "n01484850": "great white"}
# val image -> wnid; n01484850 has no train folder (the mapping still gives it its index)
VAL = {1: "n01443537", 2: "n01440764", 3: "n01484850", 4: "n01443537", 5: "n01440764"}


def kaggle_tree(root) -> str:
    """A small copy of the download's layout, with a test split and an unlabelled val image."""
    data = os.path.join(root, KAGGLE_DATA)
    for wnid in sorted(SYNSETS)[:2]:
        os.makedirs(os.path.join(data, "train", wnid))
        for i in range(4):
            with open(os.path.join(data, "train", wnid, f"{wnid}_{i}.JPEG"), "wb") as f:
                f.write(jpeg(10 * sorted(SYNSETS).index(wnid) + i))
    os.makedirs(os.path.join(data, "val"))
    os.makedirs(os.path.join(data, "test"))
    for i in [*VAL, 6]:  # 6: no row in the CSV
        with open(os.path.join(data, "val", f"ILSVRC2012_val_{i:08d}.JPEG"), "wb") as f:
            f.write(jpeg(100 + i))
    with open(os.path.join(data, "test", "ILSVRC2012_test_00000001.JPEG"), "wb") as f:
        f.write(jpeg(7))
    with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"{w} {n}\n" for w, n in SYNSETS.items())
    with open(os.path.join(root, "LOC_val_solution.csv"), "w") as f:
        f.write("ImageId,PredictionString\n")
        f.writelines(f"ILSVRC2012_val_{i:08d},{w} 12 30 200 180 {w} 40 41 90 99 \n" for i, w in VAL.items())
    with open(os.path.join(root, "LOC_train_solution.csv"), "w") as f:
        f.write("ImageId,PredictionString\n")
    return str(root)


def test_kaggle_layout_shards_train_and_val_with_torchvision_labels(tmp_path):
    from torchvision.datasets import ImageFolder

    src, dest = kaggle_tree(tmp_path / "kaggle"), str(tmp_path / "out")
    assert available_splits(src) == ["train", "val"]
    got = shard_dataset(src, dest, shard_size_mb=0.01)
    assert set(got) == {"train", "val"}
    index = {w: i for i, w in enumerate(sorted(SYNSETS))}  # torchvision's ImageNet: sorted wnids
    train_folder = ImageFolder(os.path.join(src, KAGGLE_DATA, "train"))
    assert all(index[w] == i for w, i in train_folder.class_to_idx.items())
    for split, m in got.items():
        assert m["source"]["kind"] == "ilsvrc-kaggle"
        assert m["classes"] == [{"index": i, "wnid": w, "name": SYNSETS[w]} for w, i in index.items()]
        assert verify_split(storage.join(dest, split)) == []
    train = samples_of(storage.join(dest, "train"), got["train"])
    assert len(train) == 8 and all(s["class"] == s["cls_member"] == index[s["wnid"]] for s in train)
    val = samples_of(storage.join(dest, "val"), got["val"])
    assert {s["file"]: s["cls_member"] for s in val} == {
        f"ILSVRC2012_val_{i:08d}.JPEG": index[w] for i, w in VAL.items()
    }
    assert got["val"]["rejected"] == [
        {"file": "ILSVRC2012_val_00000006.JPEG", "reason": "no label in LOC_val_solution.csv"}
    ]
    with pytest.raises(SourceError, match="labelled splits train and val, not 'test'"):
        shard_dataset(src, dest, splits="test")


def test_class_table_without_a_synset_mapping_is_the_union_of_train_and_labels(tmp_path):
    src = kaggle_tree(tmp_path / "kaggle")
    os.remove(os.path.join(src, "LOC_synset_mapping.txt"))
    got = shard_dataset(src, str(tmp_path / "out"), shard_size_mb=0.01)
    assert got["train"]["classes"] == got["val"]["classes"]
    assert [c["wnid"] for c in got["val"]["classes"]] == sorted(SYNSETS)


def test_a_split_with_files_but_nothing_to_shard_is_an_error_naming_them(tmp_path, capsys):
    """Pointed at CLS-LOC itself, val's images are flat files outside class folders: no more
    'val: 0 samples' and exit 0."""
    src = os.path.join(kaggle_tree(tmp_path / "kaggle"), KAGGLE_DATA)
    with pytest.raises(SourceError, match=r"val: split 'val' has no images to shard; found 6 image files directly in"):
        shard_dataset(src, str(tmp_path / "out"), splits="val")
    args = ["shard", "--source", src, "--dest", str(tmp_path / "out"), "--splits", "val", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "ILSVRC2012_val_00000001.JPEG" in err and "LOC_val_solution.csv" in err
    assert not os.path.exists(tmp_path / "out" / "val" / "manifest.json")


def test_a_split_of_only_rejected_files_names_the_reasons(tmp_path):
    src = kaggle_tree(tmp_path / "kaggle")
    os.remove(os.path.join(src, "LOC_val_solution.csv"))
    with open(os.path.join(src, "LOC_val_solution.csv"), "w") as f:
        f.write("ImageId,PredictionString\nILSVRC2012_val_00000099,n01440764 1 2 3 4\n")
    with pytest.raises(SourceError, match=r"found 6 entries rejected \(no label in LOC_val_solution.csv\)"):
        shard_dataset(src, str(tmp_path / "out"), splits="val")


def test_names_with_control_characters_are_rejected_not_sharded(tmp_path):
    """A tab or newline in a name would split its row of the revision file list in two, and a
    crafted one could mark another file as already sharded."""
    src = kaggle_tree(tmp_path / "kaggle")
    train = os.path.join(src, KAGGLE_DATA, "train", "n01440764")
    with open(os.path.join(train, "x\t0\tk\nn01440764_0.JPEG"), "wb") as f:
        f.write(jpeg(9))
    m = shard_dataset(src, str(tmp_path / "out"), splits="train", shard_size_mb=0.01)["train"]
    assert m["num_samples"] == 8
    assert m["rejected"] == [{"file": "n01440764/x\t0\tk\nn01440764_0.JPEG", "reason": sources.CONTROL}]
