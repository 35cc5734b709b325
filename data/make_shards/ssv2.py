"""``ssv2``: Something-Something-V2 (REFERENCE.md §8). ``--labels something-something-v2-labels.json`` maps each
template, without its brackets, to its class id (a string); ``--split something-something-v2-{train,validation,
test}.json`` lists ``{"id": "78687", "template": "Holding [something] next to [something]", ...}`` entries (the
test split has ids only: its samples are unlabelled). Videos are ``<id>.webm`` (VP9) under ``--videos``; any
other video extension is found too (VideoMAE converts them to mp4). Class names are the templates, ordered by
id."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from .inputs import Input, videos_by_stem

HELP = "Something-Something-V2 labels + split JSON and <id>.webm videos"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=Path, required=True, help="something-something-v2-labels.json")
    parser.add_argument("--split", type=Path, required=True,
                        help="something-something-v2-{train,validation,test}.json")
    parser.add_argument("--videos", type=Path, required=True, help="the folder of <id>.webm files")


def collect(args: argparse.Namespace) -> tuple[list[Input], list[str]]:
    return ssv2_inputs(args.labels, args.split, args.videos)


def class_name(template: str) -> str:
    """'Putting [something] on [something]' -> 'Putting something on something': the labels file's key."""
    return template.replace("[", "").replace("]", "")


def _read_json(path: Path, kind: type) -> dict | list:
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e}): give the file from the SSv2 download") from e
    if not isinstance(loaded, kind):
        raise InputError(f"{path}: holds a {type(loaded).__name__}, not a {kind.__name__}: give the file from the "
                         f"SSv2 download")
    return loaded


def read_classes(labels_path: Path) -> list[str]:
    """Class names ordered by id; the ids must be 0 .. N-1."""
    labels = _read_json(labels_path, dict)
    try:
        by_id = {int(i): name for name, i in labels.items()}
    except (TypeError, ValueError) as e:
        raise InputError(f"{labels_path}: a class id is not an integer ({e}): give the labels file from the SSv2 "
                         f"download") from e
    if sorted(by_id) != list(range(len(labels))):
        raise InputError(f"{labels_path}: the class ids are not 0..{len(labels) - 1}, each once: give the labels "
                         f"file from the SSv2 download")
    return [by_id[i] for i in range(len(by_id))]


def ssv2_inputs(labels_path: Path, split_path: Path, videos: Path) -> tuple[list[Input], list[str]]:
    """One input per split entry, labelled with its template's class (-1 for entries without a template);
    a template missing from the labels file is an InputError naming the entry."""
    classes = read_classes(labels_path)
    label_of = {name: i for i, name in enumerate(classes)}
    found = videos_by_stem(videos)  # "<id>" -> path
    inputs = []
    for number, entry in enumerate(_read_json(split_path, list)):
        if not isinstance(entry, dict) or "id" not in entry:
            raise InputError(f"{split_path}, entry {number}: {str(entry)[:80]!r} has no \"id\": give the split "
                             f"file from the SSv2 download")
        video_id = str(entry["id"])
        label = -1
        if "template" in entry:
            name = class_name(entry["template"])
            if name not in label_of:
                raise InputError(f"{split_path}, entry {number} (id {video_id}): template {entry['template']!r} is "
                                 f"not in {labels_path}, which lists {len(classes)} classes: use the labels file "
                                 f"of the same SSv2 release")
            label = label_of[name]
        inputs.append(Input(str(found.get(video_id, videos / f"{video_id}.webm")), label, video_id))
    return inputs, classes
