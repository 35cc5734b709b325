"""``list``: ``path label`` lines, as SlowFast, mae_st and VideoMAE write them (REFERENCE.md §5), or ``path
id,id,id`` lines for multi-label data (as SlowFast's Charades frame lists write a frame's labels)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from .inputs import Input, read_class_names

HELP = "'path label' or 'path id,id,id' (multi-label) lines"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", type=Path, required=True)
    parser.add_argument("--root", type=Path, help="prefix for relative paths (default: the list's folder)")
    parser.add_argument("--classes", type=Path, help="class names, one a line, that the ids index")
    parser.add_argument("--multi-label", action="store_true",
                        help="labels are lists of ids even where every line holds one (any 'id,id' line says so)")


def collect(args: argparse.Namespace) -> tuple[list[Input], list[str]]:
    return list_inputs(args.list, args.root, read_class_names(args.classes), args.multi_label)


def _label(field: str, multi_label: bool, where: str) -> int | tuple[int, ...]:
    """'3' -> 3, or (3,) with `multi_label`; '3,7' -> (3, 7); '' (a bare path) -> -1, or () with `multi_label`."""
    ids = [i.strip() for i in field.split(",")] if field else []
    if not multi_label:
        ids = ids or ["-1"]
        if not ids[0].lstrip("-").isdigit() or int(ids[0]) < -1:
            raise InputError(f"{where}: label {field!r} is not a class id (a non-negative integer; -1: unlabelled): "
                             f"`make_shards list` takes 'path id' or 'path id,id,id' lines (class names: use "
                             f"`make_shards folder`)")
        return int(ids[0])
    bad = [i for i in ids if not i.isdigit()]
    if bad:
        raise InputError(f"{where}: {bad[0]!r} of the labels {field!r} is not a class id (a non-negative integer): "
                         f"multi-label lines are 'path id,id,id', or a bare path for none of the classes")
    return tuple(sorted({int(i) for i in ids}))


def list_inputs(list_path: Path, root: Path | None, classes: list[str] | None = None,
                multi_label: bool = False) -> tuple[list[Input], list[str]]:
    """`path id` lines (a bare path: unlabelled), or `path id,id,id` lines, which make every label a list of ids
    (as does `multi_label`; a bare path then has none). Ids index `classes`; without it they must be 0 .. N-1
    with none missing, which become the names "0" .. "N-1". Anything else is an InputError naming the line."""
    lines = [(n, line.strip()) for n, line in enumerate(list_path.read_text().splitlines(), 1) if line.strip()]
    split = [(n, *line.rpartition(" ")[::2]) for n, line in lines]
    split = [(n, path, field) if path else (n, field, "") for n, path, field in split]  # a bare path: no label
    multi_label = multi_label or any("," in field for *_, field in split)
    inputs = []
    base = root or list_path.parent
    for number, path, field in split:
        label = _label(field, multi_label, f"{list_path}, line {number}")
        ids = label if multi_label else [label]
        if classes is not None and ids and max(ids) >= len(classes):
            raise InputError(f"{list_path}, line {number}: class id {max(ids)} is outside --classes, which lists "
                             f"{len(classes)} classes")
        inputs.append(Input(str(base / path), label, path))
    if classes is None:
        used = sorted({c for i in inputs for c in (i.label if multi_label else [i.label]) if c >= 0})
        missing = sorted(set(range(used[-1] + 1)) - set(used)) if used else []
        if missing:
            raise InputError(f"{list_path}: class ids {used[0]}..{used[-1]} are used but {len(missing)} ids in between "
                             f"are not (e.g. {missing[:5]}): pass --classes FILE (one class name a line) to say "
                             f"which classes there are")
        classes = [str(c) for c in range(len(used))]
    return inputs, classes
