"""`make_shards ssv2` on a small fake Something-Something-V2 tree: labels JSON, split JSON, VP9 WebM videos."""

import json
import sys

import numpy as np
import pytest
from launch import run

from data import make_shards
from data.shards import ShardReader, ShardSet
from data.synthetic import write_video

# Keys as the SSv2 labels file writes them: templates without brackets, ids as strings, not in id order.
LABELS = {"Putting something on something": "2", "Holding something next to something": "0",
          "Pushing something from left to right": "1"}
TEMPLATES = {"2": "Putting [something] on [something]", "0": "Holding [something] next to [something]",
             "1": "Pushing [something] from left to right"}


def entry(video_id: str, class_id: str) -> dict:
    return {"id": video_id, "label": "a filled-in text", "template": TEMPLATES[class_id], "placeholders": ["a cup"]}


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory):
    """(labels, videos): three 8-frame VP9 WebM videos, one of them without a stated duration."""
    root = tmp_path_factory.mktemp("ssv2")
    labels = root / "something-something-v2-labels.json"
    labels.write_text(json.dumps(LABELS))
    for n, video_id in enumerate(["101", "102", "103"]):
        frames = np.full((8, 24, 32, 3), 30 * n, np.uint8)
        write_video(root / "videos" / f"{video_id}.webm", frames, 12, codec="libvpx-vp9",
                    options={"deadline": "realtime"}, muxer_options={"live": "1"} if n == 2 else None)
    return labels, root / "videos"


def test_ssv2_shards_label_by_template_and_list_missing_videos(ssv2, tmp_path):
    labels, videos = ssv2
    split = tmp_path / "something-something-v2-train.json"
    split.write_text(json.dumps([entry("101", "2"), entry("102", "0"), entry("404", "1"), entry("103", "1")]))
    info = make_shards.main(["ssv2", "--labels", str(labels), "--split", str(split), "--videos", str(videos),
                             "--out", str(tmp_path / "shards"), "--workers", "1"])
    assert info["classes"] == ["Holding something next to something", "Pushing something from left to right",
                               "Putting something on something"]
    assert info["num_samples"] == 3 and info["media"] == "video"
    assert info["skipped"] == [{"input": str(videos / "404.webm"), "reason": "missing"}]
    shards = ShardSet.load(tmp_path / "shards")
    by_id = {}
    with ShardReader(shards) as reader:
        for member in range(shards.counts[0]):
            key, ext, _, meta = reader.read(0, member)
            assert ext == "webm"
            by_id[key.split("_", 1)[1]] = meta["label"]
    assert by_id == {"101": 2, "102": 0, "103": 1}


def test_ssv2_test_split_without_templates_is_unlabelled(ssv2, tmp_path):
    labels, videos = ssv2
    split = tmp_path / "something-something-v2-test.json"
    split.write_text(json.dumps([{"id": "101"}, {"id": "102"}]))
    info = make_shards.main(["ssv2", "--labels", str(labels), "--split", str(split), "--videos", str(videos),
                             "--out", str(tmp_path / "shards"), "--workers", "1"])
    assert info["num_samples"] == 2 and not info["skipped"]
    sidecar = json.loads((tmp_path / "shards" / "shard-000000.json").read_text())
    assert [label for *_, label in sidecar["samples"]] == [-1, -1]


def test_a_template_missing_from_the_labels_file_is_one_line_and_exit_2(ssv2, tmp_path):
    labels, videos = ssv2
    split = tmp_path / "something-something-v2-validation.json"
    split.write_text(json.dumps([entry("101", "2"), {"id": "102", "template": "Spinning [something] so it stops"}]))
    result = run([sys.executable, "-m", "data.make_shards", "ssv2", "--labels", str(labels), "--split", str(split),
                  "--videos", str(videos), "--out", str(tmp_path / "never")])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {split}, entry 1 (id 102): template ")
    assert "'Spinning [something] so it stops' is not in" in lines[0] and "same SSv2 release" in lines[0]
    assert not (tmp_path / "never").exists()
