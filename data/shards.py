"""The shard format and random access to its samples.

A dataset is a set of tar shards plus ``info.json`` (written by ``data.make_shards``, or by
``make_shards index`` for shards made by any webdataset tool)::

    {"version": 1, "media": "video", "num_samples": N, "classes": [...], "multi_label": false,
     "shards": [{"name": "shard-000000.tar", "num_samples": n0, "bytes": b0, "index": "shard-000000.json"}, ...],
     "skipped": [...]}

``name`` is relative to info.json's place, or an absolute path / URL (``data/sources.py``). ``bytes`` (the
tar's size) checks downloads. ``index`` names a sidecar JSON next to info.json that holds the member offsets::

    {"bytes": b0, "samples": [[key, {ext: [data offset, size], ...}, label], ...]}

A label is a class id (-1: unlabelled), or, where info.json says ``"multi_label": true``, a list of class ids
(``[]``: none of the classes, a negative for every one of them, as a Charades video without actions).

Inside a shard, each sample is a group of members named ``<key>.<ext>`` (webdataset's convention): the key runs
to the first dot of the file's base name, as webdataset reads it, so ``clip.001.mp4`` is sample ``clip`` with
field ``001.mp4``. The media member is the one whose last extension is a video or image type; the label comes
from the sidecar, else from a ``.cls`` (integer), ``.json`` (its ``label`` field) or ``.txt`` (a class name or
an integer) member.

A worker reads each shard's index once, from the sidecar (one small file) or, where there is none, by a scan
of the tar headers with small reads (512 bytes a header, data skipped by seeking), and then reads members by
offset. That is what lets the stream visit samples in an order that is a pure function of (seed, epoch)
instead of a worker's shuffle buffer. Remote shards are first downloaded whole into the node's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import BinaryIO

from .decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .sources import INFO_NAME, FetchError, ShardCache, Source, is_remote, local_path, read_url, shard_name

__all__ = ["INFO_NAME", "SampleError", "ShardReader", "ShardSet", "ShardSetError", "index_tar", "scan_tar",
           "split_member_name"]

MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
# Shard indexes a reader keeps: more than a rank's block of shards in an epoch (~16 for Kinetics on 64
# ranks), so each is read once per worker and epoch, and a few MB at most.
INDEXES_KEPT = 256
LABEL_EXTENSIONS = ("cls", "json", "txt")  # in the order a label is looked for

# (key, {ext: (data offset, size)}, label (a class id or a list of them) or None when it must be read from a
# label member)
IndexEntry = tuple[str, dict[str, tuple[int, int]], "int | list[int] | None"]


class SampleError(ValueError):
    """A sample cannot be read from its shard (missing after a truncation, no media member, bad metadata);
    `key` is the sample's key where it is known."""

    key: str | None = None


class ShardSetError(ValueError):
    """A dataset that cannot be used as given: its info.json unreadable, malformed, or listing no shards; fewer
    samples than one batch; or not the shards that a checkpoint's data position counts."""


def is_count(value: object) -> bool:
    """A non-negative integer that is not a bool (JSON true would pass isinstance(int))."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checked_entries(info: object, where: str) -> list[dict]:
    """info.json's shard entries, each with a name and a non-negative integer sample count (and, where given,
    byte size); anything else is one ShardSetError naming the file and the entry."""
    redo = f"re-run python -m data.make_shards (or make_shards index SHARDS... --out {INFO_NAME})"
    entries = info.get("shards") if isinstance(info, dict) else None
    if not isinstance(entries, list):
        raise ShardSetError(f"{where}: not a {INFO_NAME} of this project (no \"shards\" list): {redo}")
    if not entries:
        raise ShardSetError(f"{where}: lists no shards (every input skipped?): {redo}")

    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"] and is_count(e.get("num_samples"))
                and (e.get("bytes") is None or is_count(e["bytes"]))):
            raise ShardSetError(f"{where}: shard entry {i} is not {{\"name\": str, \"num_samples\": int >= 0, "
                                f"\"bytes\": int >= 0}}: {json.dumps(e)[:200]}: {redo}")
    classes = info.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ShardSetError(f"{where}: \"classes\" is not a list of names: {redo}")
    if not isinstance(info.get("multi_label", False), bool):
        raise ShardSetError(f"{where}: \"multi_label\" is not true or false: {redo}")
    if info.get("multi_label") and not classes:
        raise ShardSetError(f"{where}: multi-label shards list no \"classes\", so the targets have no width: {redo}")
    return entries


def class_id(label: object, num_classes: int) -> int:
    """A sample's label as a class id: an integer in [0, num_classes) (any non-negative one when info.json lists
    no classes), or -1 for unlabelled; anything else is a SampleError, so that it fails loudly as a sample
    instead of training a wrong class or crashing a loss."""
    if isinstance(label, bool) or not isinstance(label, int):
        raise SampleError(f"label {label!r} is not an integer class id")
    if label < -1 or (num_classes and label >= num_classes):
        raise SampleError(f"label {label} is not a class id of info.json, whose {num_classes} classes are 0 to "
                          f"{num_classes - 1} (-1: unlabelled)")
    return label


def class_ids(label: object, num_classes: int) -> tuple[int, ...]:
    """A multi-label sample's label as its class ids, each in [0, num_classes); anything else (a single id, a
    -1, a float) is a SampleError, as for `class_id`."""
    if not isinstance(label, list):
        raise SampleError(f"label {label!r} is not a list of class ids, as info.json's \"multi_label\" says")
    for c in label:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
            raise SampleError(f"label {label!r}: {c!r} is not a class id of info.json, whose {num_classes} classes "
                              f"are 0 to {num_classes - 1}")
    return tuple(label)


def is_label(value: object) -> bool:
    """Whether a sidecar's label field has a label's type: an integer or a list of integers (bools excluded)."""
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    return integer(value) or (isinstance(value, list) and all(map(integer, value)))


def open_raw(path: str) -> BinaryIO:
    """Unbuffered: every read asks the OS for exactly the bytes wanted. A buffered reader's buffer follows the
    filesystem's block size, which on NFS, Lustre or GPFS (1 MiB+) turns a header scan into a read of most
    of the shard."""
    return open(path, "rb", buffering=0)


@dataclass(frozen=True)
class ShardSet:
    """A dataset's shards as info.json describes them, with each shard's resolved URL or path.

    ``opener`` opens local files (shards, cached copies, sidecars) for reading; the default is ``open_raw``.
    """

    spec: str
    names: tuple[str, ...]
    urls: tuple[str, ...]
    counts: tuple[int, ...]  # samples per shard, from info.json: the epoch length never needs a scan
    sizes: tuple[int | None, ...]  # bytes per shard, where recorded
    indexes: tuple[str | None, ...]  # sidecar index URL per shard, where there is one
    classes: tuple[str, ...]
    media: str
    multi_label: bool = False  # labels are lists of class ids (info.json's "multi_label")
    opener: Callable[[str], BinaryIO] = open_raw

    @classmethod
    def load(cls, spec, retries: int = 3) -> ShardSet:
        """From a dataset spec (``data/sources.py``): a directory, info.json, base URL, pipe template or
        brace-expanded shard list."""
        source = Source.parse(spec)
        try:
            info = json.loads(read_url(source.info_url, retries))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{spec}: no {INFO_NAME} at {source.info_url}; write one with "
                                    f"python -m data.make_shards index SHARDS... --out {INFO_NAME}") from e
        except FetchError as e:
            raise FetchError(f"{spec}: {e}. If there is no {INFO_NAME} there, write one with python -m "
                             f"data.make_shards index SHARDS... --out {INFO_NAME} and give its path") from e
        except ValueError as e:
            raise ShardSetError(f"{source.info_url}: not a readable {INFO_NAME}: {e}") from e
        entries = checked_entries(info, source.info_url)
        urls = [source.url(e["name"]) for e in entries]
        if source.selected is not None:  # a shard list: those shards, in its order
            by_name = {shard_name(u): e for e, u in zip(entries, urls)}
            missing = [u for u in source.selected if shard_name(u) not in by_name]
            if missing:
                raise ShardSetError(f"{source.info_url} does not list {len(missing)} of the shards of {spec}, "
                                 f"e.g. {missing[0]}: re-run python -m data.make_shards index")
            entries = [by_name[shard_name(u)] for u in source.selected]
            urls = list(source.selected)
        return cls(
            spec=str(spec),
            names=tuple(e["name"].rsplit("/", 1)[-1] for e in entries),
            urls=tuple(urls),
            counts=tuple(int(e["num_samples"]) for e in entries),
            sizes=tuple(e.get("bytes") for e in entries),
            indexes=tuple(source.url(e["index"]) if e.get("index") else None for e in entries),
            classes=tuple(info.get("classes") or ()),
            media=info.get("media", "video"),
            multi_label=info.get("multi_label", False),
        )

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def head(self, count: int | None) -> ShardSet:
        """The first `count` samples in shard order (what a non-shuffled loader visits first), the last shard cut
        short; all of them for None. Shards made by data.make_shards mix the classes, so this is a random subset."""
        if count is None or count >= self.num_samples:
            return self
        counts, left = [], count
        for n in self.counts:
            if left == 0:
                break
            counts.append(min(n, left))
            left -= counts[-1]
        kept = len(counts)
        return replace(self, names=self.names[:kept], urls=self.urls[:kept], counts=tuple(counts),
                       sizes=self.sizes[:kept], indexes=self.indexes[:kept])

    @property
    def fingerprint(self) -> str:
        """A hash of the shard list (names, sample counts, byte sizes where recorded): where the data moves
        (local disk, a web server, a bucket), it stays the same; where shards are added, removed or rewritten,
        it changes."""
        return hashlib.sha256(json.dumps([self.names, self.counts, self.sizes]).encode()).hexdigest()[:16]

    @property
    def remote(self) -> bool:
        return any(is_remote(u) for u in self.urls)


def split_member_name(name: str) -> tuple[str | None, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), at the base name's first dot as webdataset splits
    it (extension lower-cased); (None, "") for a name without a dot, which webdataset ignores."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot or not key:
        return None, ""
    return (f"{head}/{key}" if head else key), ext.lower()


TAR_BLOCK = 512


def header_name(block: bytes) -> tuple[str, bool]:
    """(member name, whether it may be cut short) of a 512-byte tar header: a ustar header's prefix and name
    fields joined; a name that fills its 100-byte field may be the start of a longer one (GNU or pax long
    names keep the whole name in an extra header before this one)."""
    field = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    name = (prefix + b"/" + field if prefix else field).decode("utf-8", "replace")
    return name, len(field) == 100


def belongs_to(block: bytes, key: str, ext: str) -> bool:
    """Whether the tar header `block` is that of sample `key`'s member `ext`."""
    name, cut = header_name(block)
    if cut:
        return f"{key}.{ext}".lower().startswith(name.lower())
    return split_member_name(name) == (key, ext)


def sidecar_entries(samples: object, shard_size: int, where: str) -> list[IndexEntry]:
    """A sidecar's samples, each checked: a key, members of (data offset, size) as non-negative integers that lie
    inside the shard after their header, a label that is an integer or absent. Raises SampleError naming the
    entry."""
    if not isinstance(samples, list):
        raise SampleError(f"{where}: \"samples\" is not a list: re-run python -m data.make_shards index")
    entries = []
    for i, entry in enumerate(samples):
        ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0]
        files = entry[1] if ok else None
        ok = ok and isinstance(files, dict) and files and all(
            isinstance(w, list) and len(w) == 2 and is_count(w[0]) and is_count(w[1]) and w[0] >= TAR_BLOCK
            and w[0] + w[1] <= shard_size for w in files.values())
        label = entry[2] if ok else None
        if not ok or (label is not None and not is_label(label)):
            raise SampleError(f"{where}: entry {i} is not [key, {{ext: [data offset, size]}}, label] with its members "
                              f"inside the shard's {shard_size} bytes: {json.dumps(entry)[:200]}: re-run python -m "
                              f"data.make_shards index")
        entries.append((entry[0], {e: tuple(w) for e, w in files.items()}, label))
    return entries


def last_extension(ext: str) -> str:
    """``001.mp4`` -> ``mp4``: the part that says what a field holds (webdataset's decoders look at it too)."""
    return ext.rsplit(".", 1)[-1]


def scan_tar(f: BinaryIO) -> list[IndexEntry]:
    """Samples of a tar in file order: [(key, {ext: (offset, size)}, None)], reading only the headers.

    ``f`` should be unbuffered (``open_raw``): tarfile then reads 512-byte headers and seeks over the data.
    A truncated tar yields the samples that are complete before the cut (``scan_tar_cut`` also says where).
    """
    return scan_tar_cut(f)[0]


def scan_tar_cut(f: BinaryIO) -> tuple[list[IndexEntry], str | None]:
    """(``scan_tar``'s samples, where the tar is cut or None): a sample whose member runs past the end of the
    file, or is followed by a cut header, is left out with everything after it."""
    file_size = f.seek(0, 2)
    f.seek(0)
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:  # closing it leaves ``f`` open
            return _samples(tar, file_size)
    except tarfile.ReadError:
        return [], None  # empty, or cut inside the first header


def _samples(tar: tarfile.TarFile, file_size: int) -> tuple[list[IndexEntry], str | None]:
    samples: list[IndexEntry] = []
    cut = None
    while True:
        try:
            member = tar.next()
        except (tarfile.ReadError, EOFError) as e:
            cut = f"cut inside a header after byte {tar.offset} ({e})"
            break
        if member is None:
            break
        if member.isfile() and member.offset_data + member.size > file_size:
            cut = (f"member {member.name!r} is cut short: {file_size - member.offset_data} of its {member.size} "
                   f"bytes")
            if samples and samples[-1][0] == split_member_name(member.name)[0]:
                samples.pop()  # its sample is incomplete
            break
        if not member.isfile():
            continue
        key, ext = split_member_name(member.name)
        if key is None:
            continue
        if not samples or samples[-1][0] != key:
            samples.append((key, {}, None))
        samples[-1][1][ext] = (member.offset_data, member.size)
    return samples, cut


def index_tar(path: str) -> list[IndexEntry]:
    """``scan_tar`` of a local tar."""
    with open_raw(str(path)) as f:
        return scan_tar(f)


def raw_label(files: dict[str, tuple[int, int]], read: Callable[[tuple[int, int]], bytes]
              ) -> int | list[int] | str | None:
    """A sample's label as stored: an int from its ``.cls`` member or its ``.json`` member's ``label`` field
    (a list of ints there for multi-label shards), the text of a ``.txt`` member (an int if it is one), or None.
    ``read`` returns a member's bytes from its (offset, size). Raises ValueError (or UnicodeDecodeError) for
    unreadable label members."""
    by_kind = {last_extension(ext): where for ext, where in files.items()}
    for kind in LABEL_EXTENSIONS:
        if kind in by_kind:
            text = read(by_kind[kind]).decode().strip()
            if kind == "json":
                meta = json.loads(text)
                label = meta.get("label") if isinstance(meta, dict) else None
                if isinstance(label, list):  # a multi-label sample's
                    if not is_label(label):
                        raise ValueError(f"label {label!r} is not a list of integer class ids")
                    return label
                if isinstance(label, (bool, float)):  # int() would truncate them into some class
                    raise ValueError(f"label {label!r} is not an integer class id")
                return None if label is None else int(label)
            return int(text) if kind == "cls" or text.lstrip("-").isdigit() else text
    return None


def read_label(files: dict[str, tuple[int, int]], read: Callable[[tuple[int, int]], bytes],
               classes: tuple[str, ...]) -> int | list[int]:
    """``raw_label`` as a class index: names are looked up in ``classes``; -1 if none or unknown."""
    label = raw_label(files, read)
    if isinstance(label, str):
        return classes.index(label) if label in classes else -1
    return -1 if label is None else label


def read_member(f: BinaryIO, where: tuple[int, int]) -> bytes:
    """The bytes of the member at (data offset, size); fewer if the file ends first."""
    offset, size = where
    f.seek(offset)
    chunks, left = [], size
    while left:  # a raw read may return fewer bytes than asked
        chunk = f.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def media_member(files: dict[str, tuple[int, int]]) -> str | None:
    """The field holding the video or image (the first, where keys with dots merged several samples)."""
    return next((ext for ext in files if last_extension(ext) in MEDIA_EXTENSIONS), None)


class ShardReader:
    """Reads samples by (shard, member index), keeping up to ``max_open`` shard files open.

    Each shard's index is read once per reader (once per worker) and kept; remote shards come through
    ``cache`` (default: a ``ShardCache`` in the temp dir) and stay pinned there while open. A shard that cannot
    be fetched is remembered, and its samples fail at once with the fetch error (no retry per sample) until
    ``new_epoch``.
    Call ``close()`` (or use as a context manager) so no file is left for the garbage collector.
    """

    def __init__(self, shards: ShardSet, max_open: int = 4, cache: ShardCache | None = None):
        self.shards, self.max_open = shards, max_open
        self.cache = cache or ShardCache()
        self._open: OrderedDict[int, tuple[BinaryIO, int | None]] = OrderedDict()  # shard -> (file, lock fd)
        self._index: OrderedDict[int, list[IndexEntry]] = OrderedDict()  # LRU, bounded by INDEXES_KEPT
        self._unreachable: dict[int, str] = {}

    def _file(self, shard: int) -> BinaryIO:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard][0]
        if shard in self._unreachable:
            raise SampleError(self._unreachable[shard])
        url, lock = self.shards.urls[shard], None
        try:
            if is_remote(url):
                path, lock = self.cache.fetch(url, self.shards.sizes[shard])
            else:
                path = local_path(url)
            f = self.shards.opener(str(path))
        except FetchError as e:
            self._unreachable[shard] = str(e)
            raise SampleError(str(e)) from e
        except OSError as e:
            if lock is not None:
                self.cache.release(lock)
            raise SampleError(f"unreadable shard {url}: {e}") from e
        self._open[shard] = (f, lock)
        if len(self._open) > self.max_open:
            self._close(*self._open.popitem(last=False)[1])
        return f

    def new_epoch(self) -> None:
        """Shards that could not be fetched are tried again: an outage should not cost every later epoch
        (training workers, and so their readers, live for the whole run)."""
        self._unreachable.clear()

    def index(self, shard: int) -> list[IndexEntry]:
        """The shard's samples in file order, read once: from its sidecar if local, else from the headers."""
        if shard not in self._index:
            f = self._file(shard)
            sidecar = self.shards.indexes[shard]
            try:
                if sidecar is not None and not is_remote(sidecar):
                    with self.shards.opener(str(local_path(sidecar))) as side:
                        samples = json.loads(side.read())["samples"]
                    self._index[shard] = sidecar_entries(samples, os.fstat(f.fileno()).st_size, sidecar)
                else:
                    self._index[shard] = scan_tar(f)
            except (OSError, ValueError, KeyError, tarfile.TarError) as e:
                raise SampleError(f"unreadable index of {self.shards.urls[shard]}: {e}") from e
            if len(self._index) > INDEXES_KEPT:
                self._index.popitem(last=False)
        self._index.move_to_end(shard)
        return self._index[shard]

    def read(self, shard: int, member: int) -> tuple[str, str, bytes, dict]:
        """(key, media extension, media bytes, {"label": class id, or a tuple of them for multi-label shards}) of
        the ``member``-th sample of ``shard``."""
        index = self.index(shard)
        if member >= len(index):
            raise SampleError(f"sample {member} missing: shard holds {len(index)} (truncated?)")
        key, files, label = index[member]
        try:
            media = media_member(files)
            if media is None:
                raise SampleError(f"no media member among {sorted(files)}")
            f = self._file(shard)
            if label is None:
                try:
                    label = read_label(files, lambda where: read_member(f, where), self.shards.classes)
                except (ValueError, UnicodeDecodeError) as e:
                    raise SampleError(f"bad label metadata: {e}") from e
            label = (class_ids(label, len(self.shards.classes)) if self.shards.multi_label
                     else class_id(label, len(self.shards.classes)))
            offset, size = files[media]
            # The member's header comes with its bytes in one read: they must be the member the index names.
            raw = read_member(f, (offset - TAR_BLOCK, size + TAR_BLOCK))
            header, data = raw[:TAR_BLOCK], raw[TAR_BLOCK:]
            if len(data) != size:
                raise SampleError(f"member {key}.{media} cut short: {len(data)} of {size} bytes")
            if not belongs_to(header, key, media):
                raise SampleError(f"the bytes at offset {offset} of {self.shards.names[shard]} belong to member "
                                  f"{header_name(header)[0]!r}, not {key}.{media}: its index does not match the "
                                  f"shard (re-run python -m data.make_shards index)")
        except SampleError as e:
            e.key = key
            raise
        return key, last_extension(media), data, {"label": label}

    def _close(self, f: BinaryIO, lock: int | None) -> None:
        f.close()
        if lock is not None:
            self.cache.release(lock)

    def close(self) -> None:
        while self._open:
            self._close(*self._open.popitem()[1])

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
