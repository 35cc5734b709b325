"""What every source format hands the writer: one ``Input`` per video or image, and the class names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..decode import VIDEO_EXTENSIONS


@dataclass(frozen=True)
class Input:
    path: str
    label: int | tuple[int, ...]  # a class id (-1: unlabelled, as Kinetics test lists), or a multi-label sample's ids
    name: str  # human-readable origin, used in keys and skip reports
    problem: str = ""  # why it cannot go into a shard, known before it is read (it is listed as skipped)
    window: tuple[float, float] | None = None  # (start, end) seconds: only this part of the video is stored


def is_multi_label(inputs: list[Input]) -> bool:
    """Whether the inputs' labels are lists of class ids (info.json's "multi_label")."""
    return any(isinstance(i.label, tuple) for i in inputs)


def read_class_names(path: Path | None) -> list[str] | None:
    """Class names, one a line (blank lines ignored); None without a file."""
    if path is None:
        return None
    return [c.strip() for c in path.read_text().splitlines() if c.strip()]


def videos_by_stem(videos: Path) -> dict[str, Path]:
    """File stem -> path of every video under ``videos``: one directory walk instead of a lookup per row."""
    found = {}
    for path in sorted(videos.rglob("*")):
        if path.suffix.lstrip(".").lower() in VIDEO_EXTENSIONS:
            found.setdefault(path.stem, path)
    return found
