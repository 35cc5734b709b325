"""Multi-label data: `make_shards list` with 'path id,id' lines, the Charades importer, and the multi-hot rows the
loader hands over."""

import json
import sys

import numpy as np
import pytest
from launch import run

from data import SampleConfig, ShardLoader, make_shards
from data.decode import probe_video
from data.errors import InputError
from data.make_shards.charades import Action, charades_inputs, parse_actions
from data.make_shards.index import _label_map
from data.shards import SampleError, ShardReader, ShardSet, class_ids
from data.synthetic import write_video

CLASSES = "c000 Holding some clothes\nc001 Putting clothes somewhere\nc002 Taking a cup\n"
# Charades_v1_train.csv's columns; video C3 has an empty action field, C2 two actions with one range.
CSV = """id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length
C1,HR43,Kitchen,6,7,Yes,A person cooks.,cup,They cook.,c002 0.00 1.00;c000 0.50 2.00,2.4
C2,HR44,Bedroom,5,7,Yes,A person dresses.,clothes,They dress.,c001 1.00 2.00;c000 1.00 2.00,2.4
C3,HR45,Garage,4,6,Yes,A person waits.,,They wait.,,2.4
"""


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three 2.4 s videos (24 frames at 10 fps), 32 x 24, named as Charades names them."""
    root = tmp_path_factory.mktemp("charades") / "videos"
    for n, video_id in enumerate(["C1", "C2", "C3"]):
        write_video(root / f"{video_id}.mp4", np.full((24, 24, 32, 3), 40 * n, np.uint8), fps=10)
    return root


def test_charades_actions_parse_and_an_empty_field_has_none():
    assert parse_actions("c092 11.90 21.20;c147 0.00 12.60", 157, "here") == [Action(92, 11.9, 21.2),
                                                                            Action(147, 0.0, 12.6)]
    assert parse_actions("", 157, "here") == []
    with pytest.raises(InputError, match=r"^f.csv, line 3 \(id X\): action 'c200 1 2' names class 200"):
        parse_actions("c200 1 2", 157, "f.csv, line 3 (id X)")
    with pytest.raises(InputError, match="action 'c001 1.0' is not 'cNNN start end'"):
        parse_actions("c001 1.0", 157, "here")


def test_charades_training_entries_are_action_ranges_and_evaluation_entries_whole_videos(videos, tmp_path):
    (tmp_path / "classes.txt").write_text(CLASSES)
    (tmp_path / "train.csv").write_text(CSV)
    train, classes = charades_inputs(tmp_path / "train.csv", tmp_path / "classes.txt", videos, whole=False)
    assert classes == ["Holding some clothes", "Putting clothes somewhere", "Taking a cup"]
    # C1: each action's range, labelled with the actions overlapping it; C2: one range shared by two actions;
    # C3: no actions, listed as skipped.
    assert [(i.name, i.label, i.window, i.problem) for i in train] == [
        ("C1_0.00_1.00", (0, 2), (0.0, 1.0), ""), ("C1_0.50_2.00", (0, 2), (0.5, 2.0), ""),
        ("C2_1.00_2.00", (0, 1), (1.0, 2.0), ""), ("C3", (), None, "no actions: no time range to train on")]
    whole, _ = charades_inputs(tmp_path / "train.csv", tmp_path / "classes.txt", videos, whole=True)
    assert [(i.name, i.label, i.window) for i in whole] == [("C1", (0, 2), None), ("C2", (0, 1), None),
                                                           ("C3", (), None)]

    info = make_shards.main(["charades", "--csv", str(tmp_path / "train.csv"), "--classes",
                             str(tmp_path / "classes.txt"), "--videos", str(videos), "--out",
                             str(tmp_path / "train"), "--workers", "1"])
    assert info["multi_label"] is True and info["num_samples"] == 3
    assert info["skipped"] == [{"input": str(videos / "C3.mp4"), "reason": "no actions: no time range to train on"}]
    shards = ShardSet.load(tmp_path / "train")
    with ShardReader(shards) as reader:
        stored = {key.split("_", 1)[1]: (meta["label"], probe_video(data).duration)
                  for key, _, data, meta in map(lambda m: reader.read(0, m), range(shards.counts[0]))}
    # Only the action's range is stored: 1.5 s of the 2.4 s video for the 0.5-2.0 s action.
    assert {k: v[0] for k, v in stored.items()} == {"C1_0_00_1_00": (0, 2), "C1_0_50_2_00": (0, 2),
                                                     "C2_1_00_2_00": (0, 1)}
    assert stored["C1_0_50_2_00"][1] == pytest.approx(1.5, abs=0.15)


def test_a_bad_action_is_one_line_and_exit_2(videos, tmp_path):
    (tmp_path / "classes.txt").write_text(CLASSES)
    (tmp_path / "bad.csv").write_text(CSV.replace("c001 1.00 2.00", "c001 1.00"))
    result = run([sys.executable, "-m", "data.make_shards", "charades", "--csv", str(tmp_path / "bad.csv"),
                  "--classes", str(tmp_path / "classes.txt"), "--videos", str(videos), "--out", str(tmp_path / "x")])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'bad.csv'}, line 3 (id C2): action 'c001 1.00' is not 'cNNN start end' "
                     f"(seconds): give the CSV from the Charades download"]


def test_list_lines_with_several_ids_make_multi_hot_batches(videos, tmp_path):
    (tmp_path / "train.txt").write_text("C1.mp4 0,2\nC2.mp4 1\nC3.mp4\n")
    info = make_shards.main(["list", "--list", str(tmp_path / "train.txt"), "--root", str(videos), "--out",
                             str(tmp_path / "shards"), "--workers", "1"])
    assert info["multi_label"] is True and info["classes"] == ["0", "1", "2"] and info["num_samples"] == 3
    sidecar = json.loads((tmp_path / "shards" / "shard-000000.json").read_text())
    by_name = {key.split("_")[1]: label for key, _, label in sidecar["samples"]}
    assert by_name == {"C1": [0, 2], "C2": [1], "C3": []}
    # make_shards index finds the same lists in the tar (the shards of any tool), and says multi-label
    tar = next((tmp_path / "shards").glob("*.tar"))
    indexed = make_shards.main(["index", str(tar), "--out", str(tmp_path / "indexed" / "info.json")])
    assert indexed["multi_label"] is True and indexed["classes"] == ["0", "1", "2"]
    rows = json.loads((tmp_path / "indexed" / f"{tar.name}.idx.json").read_text())["samples"]
    assert {key.split("_")[1]: label for key, _, label in rows} == by_name
    with pytest.raises(InputError, match="mix lists of class ids"):
        _label_map([("a.tar", "k1", [0, 2]), ("a.tar", "k2", 1)], None)
    with pytest.raises(InputError, match="not in the class list of 2 classes"):
        _label_map([("a.tar", "k1", [0, 2])], ["a", "b"])

    sample = SampleConfig(train=False, num_frames=2, crop_size=16, spatial_views=2)
    loader = ShardLoader(tmp_path / "shards", sample, batch_size=3, shuffle=False, drop_last=False)
    batch = next(iter(loader))
    assert str(batch["label"].dtype) == "torch.float32"
    names = [key.split("_")[1] for key in batch["key"]]
    expected = {"C1": [1, 0, 1], "C2": [0, 1, 0], "C3": [0, 0, 0]}
    assert batch["label"].tolist() == [expected[n] for n in names]  # both views of a video share its row


def test_single_label_lists_stay_single_label(videos, tmp_path):
    (tmp_path / "train.txt").write_text(f"{videos}/C1.mp4 0\n{videos}/C2.mp4 1\n")
    info = make_shards.main(["list", "--list", str(tmp_path / "train.txt"), "--out", str(tmp_path / "shards"),
                             "--workers", "1"])
    assert info["multi_label"] is False
    batch = next(iter(ShardLoader(tmp_path / "shards", SampleConfig(num_frames=2, crop_size=16), batch_size=2)))
    assert str(batch["label"].dtype) == "torch.int64" and sorted(batch["label"].tolist()) == [0, 1]


def test_a_list_label_that_is_not_an_id_names_the_line(tmp_path):
    (tmp_path / "train.txt").write_text("a.mp4 0,2\nb.mp4 1,x\n")
    result = run([sys.executable, "-m", "data.make_shards", "list", "--list", str(tmp_path / "train.txt"), "--out",
                  str(tmp_path / "x")])
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path / 'train.txt'}, line 2: 'x' of the labels '1,x' is not a "
                                     f"class id (a non-negative integer): multi-label lines are 'path id,id,id', or "
                                     f"a bare path for none of the classes")


def test_a_multi_label_entry_that_is_not_a_list_of_class_ids_fails_as_a_sample():
    assert class_ids([0, 2], 3) == (0, 2) and class_ids([], 3) == ()
    for bad, reason in [(1, "label 1 is not a list of class ids"), ([0, 3], "3 is not a class id of info.json"),
                        ([True], "True is not a class id"), ([1.0], "1.0 is not a class id")]:
        with pytest.raises(SampleError, match=reason):
            class_ids(bad, 3)
