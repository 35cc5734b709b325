"""``folder``: one sub-folder per class, holding videos or images (any depth below it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .inputs import Input

HELP = "one sub-folder per class"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True)


def collect(args: argparse.Namespace) -> tuple[list[Input], list[str]]:
    return folder_inputs(args.root)


def folder_inputs(root: Path) -> tuple[list[Input], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    inputs = [
        Input(str(path), label, f"{name}/{path.stem}")
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lstrip(".").lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
    ]
    return inputs, classes
