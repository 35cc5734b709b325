"""Shared fixtures: a small real dataset (synthetic mp4 videos -> tar shards), made once per session."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> dict[str, Path]:
    """{"train": dir, "val": dir}: 4 motion classes x 4 videos per split, 64x64, 32 frames, in shards of 4."""
    root = tmp_path_factory.mktemp("demo")
    run = [sys.executable, "-m"]
    subprocess.run([*run, "data.synthetic", "--out", str(root / "raw"), "--per-class", "4", "--size", "64x64",
                    "--frames", "32"], check=True, cwd=REPO, capture_output=True)
    shards = {}
    for split in ("train", "val"):
        shards[split] = root / "shards" / split
        subprocess.run([*run, "data.make_shards", "kinetics", "--csv", str(root / "raw" / f"{split}.csv"),
                        "--videos", str(root / "raw" / "videos"), "--out", str(shards[split]), "--per-shard", "4"],
                       check=True, cwd=REPO, capture_output=True)
    return shards
