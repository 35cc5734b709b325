"""Fashion-MNIST from the offline system package into the class-folder layout every importer here reads.

    python -m data.fashion_mnist --out runs/fmnist/images     # then: python -m data.make_shards folder ...

The package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`) holds the four original idx
files (big-endian header: 16 bytes for images, 8 for labels, then uint8). They become `OUT/train/<class>/` and
`OUT/test/<class>/` of 28x28 grey PNGs (60,000 and 10,000), named by their position in the original file, so
the tree is the same on every machine. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle_boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class FashionMnistError(ValueError):
    """The idx files are missing (the message gives the install command) or are not idx files."""


def idx_files(source: Path | None = None) -> dict[str, tuple[Path, Path]]:
    """{split: (images, labels)} paths in `source` (default: $FASHION_MNIST_DIR, else the package's folder)."""
    source = Path(source or os.environ.get("FASHION_MNIST_DIR") or PACKAGE_DIR)
    paths = {split: (source / images, source / labels) for split, (images, labels) in FILES.items()}
    missing = [str(p) for pair in paths.values() for p in pair if not p.is_file()]
    if missing:
        raise FashionMnistError(f"Fashion-MNIST is not installed ({missing[0]} is missing): run `{INSTALL}` "
                               f"(offline), or set FASHION_MNIST_DIR to a folder with the four *-ubyte.gz files")
    return paths


def read_idx(path: Path, header: int) -> np.ndarray:
    """The uint8 payload after the idx header, shaped by the header's dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise FashionMnistError(f"{path}: not a gzip file ({err}); reinstall dataset-fashion-mnist") from err
    if len(data) < header:
        raise FashionMnistError(f"{path}: not an idx file of uint8 with {header}-byte header")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if data[2] != 0x08 or 4 + 4 * dims != header or len(data) != header + int(np.prod(shape)):
        raise FashionMnistError(f"{path}: not an idx file of uint8 with {header}-byte header")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_class_folders(out: Path, source: Path | None = None) -> Path:
    """Write OUT/{train,test}/<class>/<position>.png once (a finished split is marked by OUT/<split>.done)
    and return `out`."""
    for split, (images_path, labels_path) in idx_files(source).items():
        if (out / f"{split}.done").is_file():
            continue
        images, labels = read_idx(images_path, 16), read_idx(labels_path, 8)
        for name in CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for position, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(out / split / CLASSES[label] / f"{position:05d}.png")
        (out / f"{split}.done").write_text(f"{len(labels)}\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", type=Path, help="folder with the *-ubyte.gz files (default: the package's)")
    args = parser.parse_args(argv)
    try:
        write_class_folders(args.out, args.source)
    except FashionMnistError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/train and {args.out}/test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
