"""Turn a video or image collection into tar shards plus ``info.json`` (format: ``data/shards.py``).

    python -m data.make_shards kinetics --csv train.csv --videos DIR --out OUT [options]
    python -m data.make_shards list --list train.txt [--root DIR] --out OUT [options]
    python -m data.make_shards folder --root DIR --out OUT [options]
    python -m data.make_shards ssv2 --labels LABELS.json --split SPLIT.json --videos DIR --out OUT [options]
    python -m data.make_shards charades --csv Charades_v1_train.csv --classes Charades_v1_classes.txt --videos DIR
        --out OUT [--eval] [options]
    python -m data.make_shards index SHARDS... --out OUT/info.json [--classes FILE]

Each source format is a module of this package that turns its files into ``Input``s and class names
(``kinetics``, ``listing`` for ``list``, ``folder``, ``ssv2``, ``charades``); ``writer`` shards them.
``index`` writes the info.json of shards made by another tool.

Options: ``--short-side 320`` re-encodes videos (H.264, audio dropped) or re-saves images (JPEG) whose short
side is larger; the default keeps the original bytes. ``--per-shard``, ``--workers``, ``--seed`` (inputs are
shuffled once before sharding so that every shard mixes classes).

Inputs that are missing, unreadable or have no video stream are skipped and listed with the reason in
``info.json``. Re-running the same command after an interruption only writes the shards that are not finished.
"""

from __future__ import annotations

import argparse

from ..errors import InputError, one_line_errors
from ..shards import ShardSetError
from ..sources import FetchError
from . import charades, folder, index, kinetics, listing, ssv2, writer
from .inputs import is_multi_label

# The modes that collect inputs and write shards: command -> module with HELP, add_arguments and collect.
SOURCES = {"kinetics": kinetics, "list": listing, "folder": folder, "ssv2": ssv2, "charades": charades}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m data.make_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for command, source in SOURCES.items():
        sub = commands.add_parser(command, help=source.HELP)
        source.add_arguments(sub)
        writer.add_arguments(sub)
    index.add_arguments(commands.add_parser("index", help=index.HELP))
    args = parser.parse_args(argv)
    with one_line_errors(InputError, ShardSetError, FetchError, FileNotFoundError):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """One `make_shards` command."""
    if args.command == "index":
        return index.run(args)
    inputs, classes = SOURCES[args.command].collect(args)
    args.media, args.multi_label = writer.media_of(inputs), is_multi_label(inputs)
    info = writer.write_shards(inputs, classes, args.out, args)
    print(f"{info['num_samples']} samples in {len(info['shards'])} shards, {len(info['skipped'])} skipped")
    for s in info["skipped"]:
        print(f"  skipped {s['input']}: {s['reason']}")
    return info
