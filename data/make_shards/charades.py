"""``charades``: Charades (REFERENCE.md §8), a multi-label dataset of 157 actions. ``--csv
Charades_v1_{train,test}.csv`` has a row per video whose ``actions`` field is ``"c092 11.90 21.20;c147 0.00
12.60"`` (class code, start and end in seconds; empty for a video without actions); ``--classes
Charades_v1_classes.txt`` has ``c092 Holding a cup``-like lines, class id ``int(code[1:])``. Videos are
``<id>.mp4`` under ``--videos`` (any video extension is found).

SlowFast labels a training clip with the actions that overlap the clip, and an evaluated video with all of
its actions. Here, without ``--eval``, each action's time range becomes one entry that holds only that part of
the video (re-encoded), labelled with every action of the video that overlaps the range; ranges that several
actions share give one entry. A video without actions has no range to train on: it is skipped and listed.
With ``--eval``, each video is one whole entry labelled with all of its actions; a video without actions stays,
with no labels (a negative for every class, as in SlowFast's evaluation over every test video).
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .inputs import Input, videos_by_stem

HELP = "Charades CSV + classes file + <id>.mp4 videos (multi-label)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, required=True, help="Charades_v1_train.csv or Charades_v1_test.csv")
    parser.add_argument("--classes", type=Path, required=True, help="Charades_v1_classes.txt")
    parser.add_argument("--videos", type=Path, required=True, help="the folder of <id>.mp4 files")
    parser.add_argument("--eval", action="store_true",
                        help="one entry per whole video with all of its actions (default: one per action's range)")


def collect(args: argparse.Namespace) -> tuple[list[Input], list[str]]:
    return charades_inputs(args.csv, args.classes, args.videos, args.eval)


@dataclass(frozen=True)
class Action:
    label: int
    start: float
    end: float

    def overlaps(self, start: float, end: float) -> bool:
        return self.start < end and start < self.end


def read_classes(path: Path) -> list[str]:
    """Class names ordered by id from ``c000 Holding some clothes`` lines; the ids must be 0 .. N-1."""
    by_id = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        code, _, name = line.strip().partition(" ")
        if not (code[:1] == "c" and code[1:].isdigit() and name.strip()):
            raise InputError(f"{path}, line {number}: {line.strip()[:80]!r} is not 'cNNN class name': give "
                             f"Charades_v1_classes.txt from the Charades download")
        by_id[int(code[1:])] = name.strip()
    if sorted(by_id) != list(range(len(by_id))) or not by_id:
        raise InputError(f"{path}: the class codes are not c000..c{len(by_id) - 1:03d}, each once: give "
                         f"Charades_v1_classes.txt from the Charades download")
    return [by_id[i] for i in range(len(by_id))]


def parse_actions(field: str, num_classes: int, where: str) -> list[Action]:
    """``"c092 11.90 21.20;c147 0.00 12.60"`` -> its actions; ``""`` -> []. A malformed action or a class code
    outside the class list is an InputError naming `where`."""
    actions = []
    for part in filter(None, (p.strip() for p in field.split(";"))):
        fields = part.split()
        try:
            code, start, end = fields
            if code[:1] != "c" or not code[1:].isdigit():
                raise ValueError(code)
            action = Action(int(code[1:]), float(start), float(end))
        except ValueError as e:
            raise InputError(f"{where}: action {part!r} is not 'cNNN start end' (seconds): give the CSV from the "
                             f"Charades download") from e
        if action.label >= num_classes:
            raise InputError(f"{where}: action {part!r} names class {action.label}, but the classes file lists "
                             f"{num_classes}: use the classes file of the same Charades release")
        actions.append(action)
    return actions


def labels_in(actions: list[Action], start: float, end: float) -> tuple[int, ...]:
    """The classes of the actions that overlap [start, end), each once, ascending."""
    return tuple(sorted({a.label for a in actions if a.overlaps(start, end)}))


def video_inputs(video_id: str, path: str, actions: list[Action], whole: bool) -> list[Input]:
    """The entries of one video: the whole video with all its labels (`whole`), else one per distinct action
    range, labelled by the actions that overlap it."""
    if whole:
        return [Input(path, tuple(sorted({a.label for a in actions})), video_id)]
    if not actions:
        return [Input(path, (), video_id, problem="no actions: no time range to train on")]
    inputs = []
    for start, end in dict.fromkeys((a.start, a.end) for a in actions):  # in CSV order, each range once
        name = f"{video_id}_{start:.2f}_{end:.2f}"
        problem = "" if end > start else f"action range {start}-{end} s is empty"
        inputs.append(Input(path, labels_in(actions, start, end), name, problem, window=(start, end)))
    return inputs


def charades_inputs(csv_path: Path, classes_path: Path, videos: Path, whole: bool) -> tuple[list[Input], list[str]]:
    classes = read_classes(classes_path)
    found = videos_by_stem(videos)  # "<id>" -> path
    inputs = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"id", "actions"} - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{csv_path}: no column {sorted(missing)[0]!r}: give Charades_v1_train.csv or "
                             f"Charades_v1_test.csv from the Charades download")
        for number, row in enumerate(reader, 2):  # line 1 is the header
            video_id = row["id"]
            actions = parse_actions(row["actions"] or "", len(classes), f"{csv_path}, line {number} (id {video_id})")
            path = str(found.get(video_id, videos / f"{video_id}.mp4"))
            inputs += video_inputs(video_id, path, actions, whole)
    return inputs, classes
