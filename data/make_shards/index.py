"""``python -m data.make_shards index SHARDS... --out info.json``: the info.json (and sidecar indexes) for shards
made by any tool (webdataset's ShardWriter, img2dataset, video2dataset, tar).

SHARDS are paths, URLs or ``pipe:`` commands, brace-expanded like webdataset's (``train-{000..099}.tar``).
Local shards are indexed in place, reading only their tar headers (and the small label members); a remote
shard is downloaded once into a temporary folder, indexed and deleted. For each shard the sidecar
``<shard name>.idx.json`` next to the output holds the member offsets and labels (format: ``data/shards.py``),
so training never scans a tar.

Samples are grouped as webdataset groups them: the key runs to the first dot of the member's base name, so
``clip.001.mp4`` and ``clip.001.cls`` are fields ``001.mp4`` and ``001.cls`` of sample ``clip``. Labels come from
a ``.cls`` member (an integer), a ``.json`` member (its ``label`` field) or a ``.txt`` member (a class name, or
an integer). Class names: ``--classes FILE`` (one a line; names in ``.txt`` members are looked up there),
else the sorted names found in ``.txt`` members, else ``0 .. max label``. Shards whose ``.json`` labels are
lists of class ids are multi-label (info.json's ``multi_label``); there, a sample with no label member has no
class (``[]``: a negative for every class), and single ids beside lists are an error.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from webdataset.shardlists import expand_urls

from ..decode import IMAGE_EXTENSIONS
from ..errors import InputError
from ..shards import MEDIA_EXTENSIONS, last_extension, media_member, open_raw, raw_label, read_member, scan_tar_cut
from ..sources import ShardCache, is_remote, local_path, shard_name
from .inputs import read_class_names

HELP = "info.json for existing webdataset shards (any tool's)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="paths, URLs or pipe: commands; {000..099} braces expand")
    parser.add_argument("--out", type=Path, required=True, help="the info.json to write (sidecars go beside it)")
    parser.add_argument("--classes", type=Path, help="class names, one a line (labels index into it)")


def run(args: argparse.Namespace) -> dict:
    """The ``index`` command: index, write, and report what it found."""
    info = index_shards(args.shards, args.out, read_class_names(args.classes))
    print(f"{info['num_samples']} samples in {len(info['shards'])} shards, {len(info['classes'])} classes: "
          f"wrote {args.out}")
    for problem in info["problems"]:
        print(f"  warning: {problem}")
    return info


def index_local(path: Path) -> tuple[list, int, list[str]]:
    """(samples [(key, files, raw label)], bytes, problems) of one local tar, from its headers."""
    problems = []
    with open_raw(str(path)) as f:
        size = f.seek(0, 2)
        samples = []
        found, cut = scan_tar_cut(f)
        if cut:
            problems.append(f"{path}: {cut}: indexed the {len(found)} complete samples before the cut; the samples "
                            f"from there to the end are lost (copy or write the shard again to get them back)")
        for key, files, _ in found:
            media = [ext for ext in files if last_extension(ext) in MEDIA_EXTENSIONS]
            if len(media) > 1:
                problems.append(f"{path}: sample {key!r} has {len(media)} media fields {sorted(media)} (keys with "
                                f"dots are cut at the first dot, as webdataset reads them); the first is used")
            try:
                label = raw_label(files, lambda where: read_member(f, where))
            except (ValueError, UnicodeDecodeError) as e:
                raise InputError(f"{path}: sample {key!r}: unreadable label member: {e}") from e
            samples.append((key, files, label))
    if not samples:
        problems.append(f"{path}: no samples (empty, not a tar, or no member named <key>.<ext>)")
    return samples, size, problems


def _label_map(labelled: list[tuple[str, str, int | str | list[int]]], classes: list[str] | None
               ) -> tuple[list[str], dict]:
    """Class names, and raw label -> int, from (shard, key, raw label) of every labelled sample. Class names
    and integer ids mixed, lists of ids beside single labels, an unknown name, or an id outside the class list
    is an InputError naming a sample."""
    names = sorted({r for *_, r in labelled if isinstance(r, str)})
    ints = [(shard, key, r) for shard, key, r in labelled if isinstance(r, int) and r != -1]
    lists = [(shard, key, r) for shard, key, r in labelled if isinstance(r, list)]
    if lists and (names or ints):
        shard, key, label = (ints or [(s, k, r) for s, k, r in labelled if isinstance(r, str)])[0]
        raise InputError(f"the shards mix lists of class ids (multi-label, e.g. {lists[0][2]!r} for {lists[0][1]!r}"
                         f" in {lists[0][0]}) and single labels ({label!r} for {key!r} in {shard}): label every "
                         f"sample one way")
    if names and ints:
        shard, key, label = ints[0]
        raise InputError(f"the shards mix class names ({names[0]!r}, ...) and integer labels ({label} for "
                         f"{key!r} in {shard}): label every sample one way")
    ids = [(shard, key, c) for shard, key, r in lists for c in r]
    if classes is None:
        used = sorted({r for *_, r in ids or ints})
        classes = names or [str(i) for i in range(used[-1] + 1 if used else 0)]
    low = 0 if lists else -1  # -1 is "unlabelled" for single labels; a multi-label sample has [] for none
    unknown = [(shard, key, r) for shard, key, r in [*labelled, *ids]  # a list's ids one by one
               if (isinstance(r, str) and r not in classes) or (isinstance(r, int) and not low <= r < len(classes))]
    if unknown:
        shard, key, label = unknown[0]
        raise InputError(f"{len(unknown)} labels are not in the class list of {len(classes)} classes, e.g. "
                         f"{label!r} for {key!r} in {shard}: fix them, or pass --classes FILE")
    return classes, {n: classes.index(n) for n in names}


def index_shards(shards: list[str], out: Path, classes: list[str] | None = None, retries: int = 3) -> dict:
    """Index ``shards`` (paths / URLs, brace-expanded), write ``out`` (info.json) and the sidecars beside it;
    returns the info dict."""
    urls = [u for spec in shards for u in expand_urls(spec)]
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise InputError("two shards have the same file name; index them into separate info.json files")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    indexed, problems = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = ShardCache(root=tmp, retries=retries)
        for url in urls:
            if is_remote(url):
                path, lock = cache.fetch(url, None)
                try:
                    samples, size, found = index_local(path)
                finally:
                    cache.release(lock)
                    path.unlink()
            else:
                samples, size, found = index_local(local_path(url))
            indexed.append((url, samples, size))
            problems += found
    classes, by_name = _label_map([(shard_name(url), key, label) for url, samples, _ in indexed
                                   for key, _, label in samples if label is not None], classes)
    multi_label = any(isinstance(label, list) for _, samples, _ in indexed for *_, label in samples)
    if multi_label:  # a sample without a label member is a negative for every class
        indexed = [(url, [(k, f, [] if label is None else label) for k, f, label in samples], size)
                   for url, samples, size in indexed]
    entries, media = [], set()
    for url, samples, size in indexed:
        name = shard_name(url)
        local_here = not is_remote(url) and local_path(url).resolve().parent == out.parent.resolve()
        sidecar = f"{name}.idx.json"
        rows = [[key, files, label if multi_label else by_name.get(label, label) if label is not None else -1]
                for key, files, label in samples]
        (out.parent / sidecar).write_text(json.dumps({"bytes": size, "samples": rows}))
        media.update(last_extension(m) for _, files, _ in samples if (m := media_member(files)))
        entries.append({"name": name if local_here else (url if is_remote(url) else str(local_path(url).resolve())),
                        "num_samples": len(samples), "bytes": size, "index": sidecar})
    info = {"version": 1, "media": "image" if media and media <= set(IMAGE_EXTENSIONS) else "video",
            "num_samples": sum(e["num_samples"] for e in entries), "classes": classes, "multi_label": multi_label,
            "shards": entries,
            "skipped": [], "problems": problems}
    out.write_text(json.dumps(info, indent=1))
    return info

