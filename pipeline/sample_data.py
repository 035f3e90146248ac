"""`mfm sample-data`: a small ImageNet-format dataset from photos available offline.

Source: Fashion-MNIST from Debian's `dataset-fashion-mnist` package (10 classes, 28x28
grey), upscaled to RGB JPEG; where it is not installed, crops of scikit-image's sample
photos. Written twice, as the two inputs `mfm shard` reads:
  DIR/folder/{train,val}/<wnid>/<image>.JPEG  + LOC_synset_mapping.txt
  DIR/ilsvrc/ILSVRC2012_img_train.tar (per-class tars), ILSVRC2012_img_val.tar,
             LOC_val_solution.csv, LOC_synset_mapping.txt
Everything is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import struct
import tarfile

import numpy as np

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
SKIMAGE_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
# Deliberately bad files (added to the first train class with bad_files=True) and what the
# sharder must do with each.
BAD_FILES = {
    "bad_empty": "rejected",
    "bad_truncated": "rejected",
    "bad_text": "rejected",
    "bad_png": "reencoded",
    "bad_cmyk": "reencoded",
    "bad_gray": "reencoded",
}


def wnid(i: int) -> str:
    return f"n{i:08d}"


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    dims = magic & 0xFF
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_available(root: str = FASHION_DIR) -> bool:
    return all(
        os.path.exists(os.path.join(root, f"{p}-{k}-idx{d}-ubyte.gz"))
        for p in ("train", "t10k")
        for k, d in (("images", 3), ("labels", 1))
    )


def _pick(labels: np.ndarray, per_class: int) -> list[int]:
    """The first per_class indices of each class, in file order (deterministic)."""
    out = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"per_class={per_class}: class {c} has only {len(idx)} images")
        out.extend(idx.tolist())
    return out


def fashion_mnist(per_class_train: int, per_class_val: int, root: str = FASHION_DIR):
    """(classes, train, val): classes [(wnid, name)], samples [(wnid, HxW uint8)]."""
    splits = []
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_val)):
        images = _read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
        labels = _read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
        splits.append([(wnid(int(labels[i])), images[i]) for i in _pick(labels, per_class)])
    return [(wnid(i), n) for i, n in enumerate(FASHION_NAMES)], splits[0], splits[1]


def skimage_photos(per_class_train: int, per_class_val: int, seed: int = 0):
    """Fallback: random crops and flips of scikit-image's bundled photos, one class per photo."""
    from skimage import data

    rng = np.random.default_rng(seed)
    classes, train, val = [], [], []
    for i, name in enumerate(SKIMAGE_PHOTOS):
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3]
        classes.append((wnid(i), name))
        h, w = img.shape[:2]
        for out, n in ((train, per_class_train), (val, per_class_val)):
            for _ in range(n):
                side = int(rng.integers(min(h, w) // 4, min(h, w) // 2 + 1))
                y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                crop = img[y : y + side, x : x + side]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                out.append((wnid(i), np.ascontiguousarray(crop)))
    return classes, train, val


def to_jpeg(array: np.ndarray, size: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(array).convert("RGB").resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bad_files(good_jpeg: bytes, size: int) -> dict[str, bytes]:
    """Bytes of each BAD_FILES entry, derived from one good image."""
    from PIL import Image

    img = Image.open(io.BytesIO(good_jpeg)).convert("RGB")

    def save(im, fmt):
        b = io.BytesIO()
        im.save(b, fmt)
        return b.getvalue()

    return {
        "bad_empty": b"",
        "bad_truncated": good_jpeg[: len(good_jpeg) * 2 // 5],
        "bad_text": b"this is not an image, whatever its name says\n",
        "bad_png": save(img, "PNG"),
        "bad_cmyk": save(img.convert("CMYK"), "JPEG"),
        "bad_gray": save(img.convert("L"), "JPEG"),
    }


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build(
    dest: str,
    *,
    per_class: int | None = None,
    size: int = 64,
    with_bad_files: bool = False,
    source: str = "auto",
    per_class_val: int | None = None,
) -> dict:
    """Write DIR/folder and DIR/ilsvrc; returns a summary (counts, source, paths)."""
    use_fashion = source == "fashion-mnist" or (source == "auto" and fashion_mnist_available())
    if use_fashion:
        n_train = per_class or 200
        classes, train, val = fashion_mnist(n_train, per_class_val or max(1, n_train // 4))
    else:
        n_train = per_class or 300
        classes, train, val = skimage_photos(n_train, per_class_val or max(1, n_train // 4))
    names = dict(classes)
    mapping = "".join(f"{w} {n}\n" for w, n in classes)

    counters: dict[str, int] = {}
    train_files: list[tuple[str, str, bytes]] = []  # (wnid, file name, bytes)
    for w, arr in train:
        counters[w] = counters.get(w, 0) + 1
        train_files.append((w, f"{w}_{counters[w]}.JPEG", to_jpeg(arr, size)))
    if with_bad_files:
        first = classes[0][0]
        good = next(b for w, _, b in train_files if w == first)
        train_files += [(first, f"{first}_{k}.JPEG", b) for k, b in bad_files(good, size).items()]
    # ILSVRC val numbering interleaves classes.
    order = sorted(range(len(val)), key=lambda i: (sum(1 for w, _ in val[:i] if w == val[i][0]), val[i][0]))
    val_files = [
        (val[i][0], f"ILSVRC2012_val_{n:08d}.JPEG", to_jpeg(val[i][1], size)) for n, i in enumerate(order, start=1)
    ]

    folder = os.path.join(dest, "folder")
    for split, files in (("train", train_files), ("val", val_files)):
        for w in names:
            os.makedirs(os.path.join(folder, split, w), exist_ok=True)
        for w, name, data in files:
            with open(os.path.join(folder, split, w, name), "wb") as f:
                f.write(data)
    with open(os.path.join(folder, "LOC_synset_mapping.txt"), "w") as f:
        f.write(mapping)

    ilsvrc = os.path.join(dest, "ilsvrc")
    os.makedirs(ilsvrc, exist_ok=True)
    per_class_tars = [(f"{w}.tar", _tar_bytes([(n, b) for ww, n, b in train_files if ww == w])) for w in names]
    with open(os.path.join(ilsvrc, "ILSVRC2012_img_train.tar"), "wb") as f:
        f.write(_tar_bytes(per_class_tars))
    with open(os.path.join(ilsvrc, "ILSVRC2012_img_val.tar"), "wb") as f:
        f.write(_tar_bytes([(n, b) for _, n, b in val_files]))
    with open(os.path.join(ilsvrc, "LOC_val_solution.csv"), "w") as f:
        f.write("ImageId,PredictionString\n")
        f.writelines(f"{n[:-5]},{w} 0 0 {size - 1} {size - 1}\n" for w, n, _ in val_files)
    with open(os.path.join(ilsvrc, "LOC_synset_mapping.txt"), "w") as f:
        f.write(mapping)
    return {
        "source": "fashion-mnist" if use_fashion else "skimage",
        "classes": len(classes),
        "train": len(train_files),
        "val": len(val_files),
        "bad_files": sorted(f"{classes[0][0]}_{k}.JPEG" for k in BAD_FILES) if with_bad_files else [],
        "folder": folder,
        "ilsvrc": ilsvrc,
    }


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm sample-data", description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", required=True, help="output folder (gets folder/ and ilsvrc/)")
    p.add_argument(
        "--per-class", type=int, default=None, help="train images per class (val gets a quarter); default 200"
    )
    p.add_argument(
        "--per-class-val", type=int, default=None, help="val images per class (default: a quarter of --per-class)"
    )
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument(
        "--bad-files",
        action="store_true",
        help=f"add deliberately broken files to the first train class: {', '.join(BAD_FILES)}",
    )
    p.add_argument("--source", choices=["auto", "fashion-mnist", "skimage"], default="auto")
    args = p.parse_args(argv)
    s = build(
        args.dest,
        per_class=args.per_class,
        size=args.size,
        with_bad_files=args.bad_files,
        source=args.source,
        per_class_val=args.per_class_val,
    )
    print(
        f"{s['source']}: {s['classes']} classes, {s['train']} train / {s['val']} val images -> "
        f"{s['folder']}, {s['ilsvrc']}"
    )
    return 0
