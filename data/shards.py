"""The shard format and random access to its samples.

A dataset is a directory of tar shards plus ``info.json`` (written by ``data.make_shards``)::

    {"version": 1, "media": "video", "num_samples": N, "classes": [...],
     "shards": [{"name": "shard-000000.tar", "num_samples": n0}, ...], "skipped": [...]}

Inside a shard, each sample is a group of members named ``<key>.<ext>`` (webdataset's convention, so the
shards also work with webdataset): the media file (``.mp4``, ``.jpg``, ...) and ``<key>.json`` with
``{"label": int, ...}``. Keys never contain dots: webdataset splits the name at the first dot.

Shards are local, seekable files. A worker indexes a shard's tar headers once (a few ms: headers only) and
then reads members by offset, which is what lets the stream visit samples in a shuffled order that is a pure
function of (seed, epoch) instead of a worker's shuffle buffer.
"""

from __future__ import annotations

import json
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

INFO_NAME = "info.json"
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS


class SampleError(ValueError):
    """A sample cannot be read from its shard (missing after a truncation, no media member, bad metadata)."""


@dataclass(frozen=True)
class ShardSet:
    root: Path
    names: tuple[str, ...]
    counts: tuple[int, ...]  # samples per shard, from info.json: the epoch length never needs a scan
    classes: tuple[str, ...]
    media: str

    @classmethod
    def load(cls, path: str | Path) -> ShardSet:
        """From a shard directory or its ``info.json``."""
        path = Path(path)
        info_path = path / INFO_NAME if path.is_dir() else path
        info = json.loads(info_path.read_text())
        return cls(
            root=info_path.parent,
            names=tuple(s["name"] for s in info["shards"]),
            counts=tuple(int(s["num_samples"]) for s in info["shards"]),
            classes=tuple(info.get("classes") or ()),
            media=info.get("media", "video"),
        )

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.ext`` -> (``dir/key``, ``ext``), splitting at the basename's first dot like webdataset."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext


def index_tar(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Samples of a tar in file order: [(key, {ext: (offset, size)})].

    A truncated tar yields the samples that are complete before the cut; a sample whose data runs past
    the end of the file is dropped.
    """
    file_size = path.stat().st_size
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, mode="r:") as tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.ReadError, EOFError):
                break
            if member is None:
                break
            if not member.isfile() or member.offset_data + member.size > file_size:
                continue
            key, ext = split_member_name(member.name)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = (member.offset_data, member.size)
    return samples


class ShardReader:
    """Reads samples by (shard, member index), keeping a few shard files open and their indexes cached.

    Call ``close()`` (or use as a context manager) so no file is left for the garbage collector.
    """

    def __init__(self, shards: ShardSet, max_open: int = 4):
        self.shards = shards
        self.max_open = max_open
        self._open: OrderedDict[int, tuple] = OrderedDict()  # shard -> (file, index), LRU order

    def _shard(self, shard: int):
        if shard in self._open:
            self._open.move_to_end(shard)
        else:
            path = self.shards.root / self.shards.names[shard]
            try:
                index = index_tar(path)
            except (OSError, tarfile.TarError) as e:
                raise SampleError(f"unreadable shard: {e}") from e
            # Held open across reads and closed by the LRU eviction or close(), hence no ``with``.
            self._open[shard] = (open(path, "rb"), index)  # noqa: SIM115
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)[1][0].close()
        return self._open[shard]

    def read(self, shard: int, member: int) -> tuple[str, str, bytes, dict]:
        """(key, media extension, media bytes, metadata) of the ``member``-th sample of ``shard``."""
        f, index = self._shard(shard)
        if member >= len(index):
            raise SampleError(f"sample {member} missing: shard holds {len(index)} (truncated?)")
        key, files = index[member]
        media = [ext for ext in files if ext.lower() in MEDIA_EXTENSIONS]
        if not media:
            raise SampleError(f"no media member among {sorted(files)}")
        try:
            meta = json.loads(self._bytes(f, files["json"])) if "json" in files else {}
        except ValueError as e:
            raise SampleError(f"bad metadata: {e}") from e
        return key, media[0], self._bytes(f, files[media[0]]), meta

    @staticmethod
    def _bytes(f, where: tuple[int, int]) -> bytes:
        offset, size = where
        f.seek(offset)
        return f.read(size)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][0].close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
