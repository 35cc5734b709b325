"""``list``: ``path label`` lines, as SlowFast, mae_st and VideoMAE write them (REFERENCE.md §5)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from .inputs import Input, read_class_names

HELP = "'path label' lines"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", type=Path, required=True)
    parser.add_argument("--root", type=Path, help="prefix for relative paths (default: the list's folder)")
    parser.add_argument("--classes", type=Path, help="class names, one a line, that the ids index")


def collect(args: argparse.Namespace) -> tuple[list[Input], list[str]]:
    return list_inputs(args.list, args.root, read_class_names(args.classes))


def list_inputs(list_path: Path, root: Path | None, classes: list[str] | None = None) -> tuple[list[Input], list[str]]:
    """`path id` lines (a bare path: unlabelled). Ids index `classes`; without it they must be 0 .. N-1 with
    none missing, which become the names "0" .. "N-1". Anything else is an InputError naming the line."""
    inputs = []
    base = root or list_path.parent
    for number, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path:  # a bare path: unlabelled
            path, label = label, "-1"
        if not label.lstrip("-").isdigit() or int(label) < -1:
            raise InputError(f"{list_path}, line {number}: label {label!r} is not a class id (a non-negative "
                             f"integer; -1: unlabelled): `make_shards list` takes 'path id' lines (class names: "
                             f"use `make_shards folder`)")
        if classes is not None and int(label) >= len(classes):
            raise InputError(f"{list_path}, line {number}: class id {label} is outside --classes, which lists "
                             f"{len(classes)} classes")
        inputs.append(Input(str(base / path), int(label), path))
    if classes is None:
        used = sorted({i.label for i in inputs if i.label >= 0})
        missing = sorted(set(range(used[-1] + 1)) - set(used)) if used else []
        if missing:
            raise InputError(f"{list_path}: class ids {used[0]}..{used[-1]} are used but {len(missing)} ids in between "
                             f"are not (e.g. {missing[:5]}): pass --classes FILE (one class name a line) to say "
                             f"which classes there are")
        classes = [str(c) for c in range(len(used))]
    return inputs, classes
