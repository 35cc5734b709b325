"""``kinetics``: the official Kinetics lists (header ``label,youtube_id,time_start,time_end,split``, REFERENCE.md
§5); each clip is found by its ``<youtube_id>_<start:06d>_<end:06d>`` name anywhere under ``--videos`` (class
folders or flat)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from .inputs import Input, read_class_names, videos_by_stem

HELP = "official Kinetics CSV + downloaded clips"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--videos", type=Path, required=True)
    parser.add_argument("--classes", type=Path,
                        help="class names, one a line (default: sorted labels of the CSV); "
                             "pass the training list's classes when sharding val")


def collect(args: argparse.Namespace) -> tuple[list[Input], list[str]]:
    return kinetics_inputs(args.csv, args.videos, read_class_names(args.classes))


def kinetics_inputs(csv_path: Path, videos: Path, classes: list[str] | None) -> tuple[list[Input], list[str]]:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if classes is None:
        classes = sorted({r["label"] for r in rows if r.get("label")})
    label_of = {c: i for i, c in enumerate(classes)}
    found = videos_by_stem(videos)  # "<id>_<start>_<end>" -> path
    inputs = []
    for r in rows:
        stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        name = r.get("label") or ""
        problem = f"class {name!r} is not in --classes" if name and name not in label_of else ""
        inputs.append(Input(str(found.get(stem, videos / f"{stem}.mp4")), label_of.get(name, -1), stem, problem))
    return inputs, classes
