"""Bad data stops a run early and clearly (issue 22): failures are counted from the first batch, a run whose
data does not load stops before its first optimizer step and writes nothing, and a malformed info.json is one
line naming the file."""

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from launch import image_tree

from data import make_shards
from data.loader import DataFailureError, ShardLoader
from data.make_shards.folder import folder_inputs
from data.make_shards.index import index_shards
from data.make_shards.writer import shard_inputs
from data.samples import SampleConfig
from data.shards import ShardSet, ShardSetError
from data.synthetic import write_shard_dir
from finetune import main as finetune_main
from pretrain import main as pretrain_main

SAMPLE = SampleConfig(num_frames=1, crop_size=32)
# In process, with the precision of every other in-process run of the suite: accelerate keeps the first one.
RUN = ["--config", "configs/pretrain/fmnist_hiera.yaml", "train.batch_size=4", "train.max_steps=2",
       "data.num_workers=0", "log.progress=false", "log.visualize_every=0", "log.every=1", "train.mixed_precision=null"]


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good")
    inputs, classes = folder_inputs(image_tree(root / "images", {"train": 4}) / "train")
    shard_inputs(inputs, classes, root / "shards", per_shard=6)
    return root / "shards"


def mixed_shards(root: Path, good: int, bad: int) -> Path:
    """One image shard: `good` real PNGs (from image_tree) and `bad` members of two kinds of garbage."""
    pngs = sorted((image_tree(root / "images", {"train": good}) / "train").rglob("*.png"))[:good]
    samples = [(f"good{i}", "png", p.read_bytes(), 0) for i, p in enumerate(pngs)]
    samples += [(f"bad{i}", "png", b"not a png" if i % 2 else b"", 0) for i in range(bad)]
    return write_shard_dir(root / "shards", [samples], media="image")


def test_failures_count_from_the_first_batch_with_reasons(tmp_path):
    """30% of 20 failing, with max_fail_fraction 0.05: stopped within the first batches (the old check waited
    for 100 samples), naming the kinds of failure with an example key and shard."""
    shards = mixed_shards(tmp_path, good=14, bad=6)
    loader = ShardLoader(shards, SAMPLE, batch_size=10, shuffle=False, drop_last=False)
    with pytest.raises(DataFailureError) as caught:
        list(loader)
    message = str(caught.value)
    assert message.startswith("6 of 20 samples failed to load (more than data.max_fail_count=5")
    assert "3 x 'zero-byte input' (e.g. bad0 in shard-000000.tar" in message
    assert "3 x 'unreadable image' (e.g. bad1 in shard-000000.tar" in message
    # Up to max_fail_count failures pass, whatever the fraction: 5 of 20 is a small sample's bad luck.
    assert len(list(ShardLoader(mixed_shards(tmp_path / "five", good=15, bad=5), SAMPLE, batch_size=10))) == 2


def test_a_first_batch_that_all_fails_stops_at_once(tmp_path):
    loader = ShardLoader(mixed_shards(tmp_path, good=0, bad=4), SAMPLE, batch_size=2, max_fail_count=100)
    with pytest.raises(DataFailureError, match=r"^2 of 2 samples failed to load \(not one sample loaded\)"):
        list(loader)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_garbage_stops_before_the_first_step_and_leaves_a_good_run_alone(good_shards, tmp_path, capsys):
    """A fresh run pointed at a finished run's output_dir is refused before it writes anything (it used to replace
    that run's config.yaml at once, and on garbage data its checkpoints and export); in a folder of its own, a run
    on garbage stops on the data before its first step and writes no checkpoint or export, which leaves that
    folder free for the run on fixed data."""
    out = tmp_path / "run"
    pretrain_main.main([*RUN, f"data.train={good_shards}", f"output_dir={out}"])
    before = digest(out)
    assert any("checkpoint-00000002" in name for name in before) and "encoder.safetensors" in before
    garbage = mixed_shards(tmp_path / "garbage", good=0, bad=12)

    def stopped_with(output_dir: Path) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            pretrain_main.main([*RUN, f"data.train={garbage}", f"output_dir={output_dir}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(err) == 1, err
        return err[0]

    assert stopped_with(out) == (f"error: output_dir={out} holds the checkpoints of an earlier run (the latest: "
                                 f"checkpoint-00000002): continue it with resume=auto, or give a new output_dir")
    assert digest(out) == before  # config.yaml included
    assert stopped_with(tmp_path / "new").startswith("error: before step 1, all 1 ranks: 4 of 4 samples failed")
    assert {name.split("/")[0] for name in digest(tmp_path / "new")} == {"config.yaml", "tb"}
    pretrain_main.main([*RUN, f"data.train={good_shards}", f"output_dir={tmp_path / 'new'}"])  # data fixed: free
    assert (tmp_path / "new" / "checkpoint-00000002").is_dir()


def test_finetuning_and_evaluation_refuse_an_output_dir_with_another_runs_files(good_shards, tmp_path, capsys):
    """The fine-tuning app does the same before it writes anything, for training and for eval_only."""
    out = tmp_path / "run"
    pretrain_main.main([*RUN, f"data.train={good_shards}", f"output_dir={out}"])
    before = digest(out)
    finetune = ["--config", "configs/finetune/fmnist_hiera.yaml", f"model.pretrained={out}",
                f"data.train={good_shards}", f"output_dir={out}", *RUN[2:]]
    for extra, way in (((), "continue it with resume=auto, or give a new output_dir"),
                       (("eval_only=true",), "evaluate into a new output_dir (eval_only would replace its "
                                             "config.yaml and metrics.json)")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            finetune_main.main([*finetune, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and err == [f"error: output_dir={out} holds the checkpoints of an earlier run "
                                                   f"(the latest: checkpoint-00000002): {way}"]
    assert digest(out) == before


@pytest.mark.parametrize("info, message", [
    ({"version": 1}, 'no "shards" list'),
    ({"shards": []}, "lists no shards"),
    ({"shards": [{"name": "shard-000000.tar", "num_samples": -3}]}, "shard entry 0 is not"),
    ({"shards": [{"name": "shard-000000.tar", "num_samples": 2}], "classes": [1, 2]}, '"classes" is not a list'),
])
def test_malformed_info_json_is_one_clear_error(tmp_path, capsys, info, message):
    (tmp_path / "info.json").write_text(json.dumps(info))
    with pytest.raises(ShardSetError, match=message):
        ShardSet.load(str(tmp_path))
    with pytest.raises(SystemExit) as stopped:
        pretrain_main.main([*RUN, f"data.train={tmp_path}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and str(tmp_path / "info.json") in err[0], err


def test_labels_outside_the_class_list_fail_as_samples(tmp_path, capsys):
    """A label that is not a class id of info.json (too large, negative, a string, a bool, a float) fails its
    sample with the reason; fine-tuning on such data stops before its first step instead of a crash in the
    loss (on a GPU, a device-side assert)."""
    png = sorted((image_tree(tmp_path / "images", {"train": 2}) / "train").rglob("*.png"))[0].read_bytes()
    labels = [0, 999, -5, "cat", True, 2.5, 3]
    shards = write_shard_dir(tmp_path / "shards", [[(f"s{i}", "png", png, label) for i, label in enumerate(labels)]],
                             media="image")  # the synthetic class list: 4 classes
    loader = ShardLoader(shards, SAMPLE, batch_size=7, drop_last=False, shuffle=False, max_fail_fraction=1.0,
                         max_fail_count=10)
    [batch] = list(loader)
    assert batch["label"][batch["valid"]].tolist() == [0, 3]
    reasons = {key: reason for _, key, reason in batch["failures"]}
    assert reasons["s1"] == "label 999 is not a class id of info.json, whose 4 classes are 0 to 3 (-1: unlabelled)"
    assert reasons["s4"] == "bad label metadata: label True is not an integer class id"
    assert reasons["s3"].startswith("bad label metadata") and set(reasons) == {"s1", "s2", "s3", "s4", "s5"}

    bad = write_shard_dir(tmp_path / "bad", [[(f"s{i}", "png", png, 999) for i in range(8)]], media="image")
    with pytest.raises(SystemExit) as stopped:
        finetune_main.main(["--config", "configs/finetune/fmnist_hiera.yaml", "model.pretrained=null",
                            f"data.train={bad}", f"output_dir={tmp_path / 'run'}", *RUN[2:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and "label 999 is not a class id" in err[0], err


def test_a_tar_cut_inside_a_member_is_reported_by_index(tmp_path):
    """make_shards index on a shard cut in the middle of its third sample's image: the cut is reported with
    what was kept, and only the two complete samples are indexed (not the half sample)."""
    png = sorted((image_tree(tmp_path / "images", {"train": 2}) / "train").rglob("*.png"))[0].read_bytes()
    shards = write_shard_dir(tmp_path / "shards", [[(f"s{i}", "png", png, 0) for i in range(4)]], media="image")
    tar = shards / "shard-000000.tar"
    with tarfile.open(tar) as members:
        third = next(m for m in members.getmembers() if m.name == "s2.png")
    tar.write_bytes(tar.read_bytes()[: third.offset_data + len(png) // 2])
    info = index_shards([str(tar)], tmp_path / "indexed" / "info.json")
    assert info["num_samples"] == 2
    [problem] = info["problems"]
    assert f"member 's2.png' is cut short: {len(png) // 2} of its {len(png)} bytes" in problem
    assert "indexed the 2 complete samples before the cut" in problem and str(tar) in problem


def test_make_shards_refuses_labels_outside_the_class_list(tmp_path, capsys):
    """`list` lines with names, floats or ids with gaps; `index` on shards mixing names and ids or with an id
    past --classes; `kinetics --classes` without a CSV class: one line each (exit 2), or listed as skipped."""
    png = sorted((image_tree(tmp_path / "images", {"train": 2}) / "train").rglob("*.png"))[0]

    def shard(*argv: str) -> str:
        with pytest.raises(SystemExit) as stopped:
            make_shards.main([*argv, "--workers", "1"] if argv[0] != "index" else list(argv))
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(err) == 1, err
        return err[0]

    listing = tmp_path / "list.txt"
    for lines, message in ((f"{png} 0\n{png} cat\n", "line 2: label 'cat' is not a class id"),
                           (f"{png} 0\n{png} 2.5\n", "line 2: label '2.5' is not a class id"),
                           (f"{png} 0\n{png} 999\n", "class ids 0..999 are used but 998 ids in between are not")):
        listing.write_text(lines)
        assert message in shard("list", "--list", str(listing), "--out", str(tmp_path / "l"))
    (tmp_path / "names.txt").write_text("a\nb\n")
    listing.write_text(f"{png} 0\n{png} 2\n")
    assert "line 2: class id 2 is outside --classes, which lists 2 classes" in shard(
        "list", "--list", str(listing), "--classes", str(tmp_path / "names.txt"), "--out", str(tmp_path / "l2"))

    pixels = png.read_bytes()
    mixed = write_shard_dir(tmp_path / "mixed", [[("a", "png", pixels, 0), ("b", "png", pixels, 1)]], media="image")
    with tarfile.open(tmp_path / "mixed" / "named.tar", "w") as tar:
        for name, data in (("c.png", pixels), ("c.txt", b"dog")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    assert "mix class names ('dog', ...) and integer labels" in shard(
        "index", str(mixed / "shard-000000.tar"), str(tmp_path / "mixed" / "named.tar"),
        "--out", str(tmp_path / "m" / "info.json"))
    (tmp_path / "one.txt").write_text("a\n")
    assert "1 labels are not in the class list of 1 classes, e.g. 1 for 'b' in shard-000000.tar" in shard(
        "index", str(mixed / "shard-000000.tar"), "--classes", str(tmp_path / "one.txt"),
        "--out", str(tmp_path / "n" / "info.json"))

    csv_path = tmp_path / "k.csv"
    csv_path.write_text("label,youtube_id,time_start,time_end,split\na,v0,0,1,train\nzebra,v1,0,1,train\n")
    info = make_shards.main(["kinetics", "--csv", str(csv_path), "--videos", str(tmp_path), "--classes",
                             str(tmp_path / "one.txt"), "--out", str(tmp_path / "k"), "--workers", "1"])
    assert {s["reason"] for s in info["skipped"]} == {"missing", "class 'zebra' is not in --classes"}


def test_sidecars_are_checked_and_bytes_must_belong_to_their_member(good_shards, tmp_path):
    """An offset that points at another sample's bytes fails that sample loudly (the member's tar header is read
    with its bytes); a negative offset, a huge size, a malformed entry or a string label fails the shard's samples
    with one message naming the sidecar and the entry, instead of a worker's traceback or a silent wrong sample."""
    def loaded_with(edit) -> list:
        root = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good_shards, root)
        sidecar = root / "shard-000000.json"
        side = json.loads(sidecar.read_text())
        edit(side["samples"])
        sidecar.write_text(json.dumps(side))
        loader = ShardLoader(root, SAMPLE, batch_size=4, shuffle=False, drop_last=False, max_fail_fraction=1.0,
                             max_fail_count=100)
        return [f for batch in loader for f in batch["failures"]]

    def swap(samples):  # the first two samples' images trade places
        (a, b) = samples[0][1], samples[1][1]
        a["png"], b["png"] = b["png"], a["png"]

    failures = loaded_with(swap)
    first, second = json.loads((good_shards / "shard-000000.json").read_text())["samples"][:2]
    assert {key for _, key, _ in failures} == {first[0], second[0]}
    assert all("belong to member" in reason and "its index does not match the shard" in reason
               for *_, reason in failures)
    for edit, message in ((lambda s: s[0][1]["png"].__setitem__(0, -5), "entry 0 is not [key"),
                          (lambda s: s[1][1]["png"].__setitem__(1, 10**12), "entry 1 is not [key"),
                          (lambda s: s.__setitem__(2, ["k", "not a dict", 0]), "entry 2 is not [key"),
                          (lambda s: s[3].__setitem__(2, "cat"), "entry 3 is not [key")):
        failures = loaded_with(edit)
        assert failures and all(message in reason and "shard-000000.json" in reason for *_, reason in failures)
