"""The real-data benchmark (tools/real_bench.py) end to end at --quick size on a class-folder tree made here,
and on Moving Fashion-MNIST clips of idx files written here; its resume, its errors, and the parts it is built
from. Accuracy is not checked: that is the benchmark's job."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import image_tree, write_idx
from PIL import Image

from data.decode import decode_video
from data.fashion_mnist import CLASSES, FashionMnistError, read_idx, write_class_folders
from data.make_shards.inputs import Input
from data.moving_fashion_mnist import DIRECTIONS, FRAMES, SIZE, STEPS, glide, moving_clip, order_blind_top1, write_clips
from finetune.probe import fit_probe
from tools import real_bench
from tools.real_bench import FRACTIONS, class_balanced

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.real_bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)


def bench_here(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the benchmark's main in this process: for runs that measure nothing (a
    rerun of finished parts, or input it refuses), which then start no Accelerator and no subprocess."""
    capsys.readouterr()
    code = real_bench.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_quick_run_writes_results_in_shape_and_resumes(tmp_path, capsys):
    data = image_tree(tmp_path / "shapes", {"train": 22, "test": 6})
    out = tmp_path / "bench"
    first = bench("--data", str(data), "--out", str(out), "--quick")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    lines = first.stdout.strip().splitlines()
    # One line per phase: data, then per seed pixels, pretrain, and per init frozen + 3 fine-tunings.
    assert len(lines) == 1 + 2 + 2 * (1 + len(FRACTIONS)) + 1, first.stdout
    assert lines[0].startswith("data: ") and lines[-1].startswith("done in ")
    results = json.loads((out / "results.json").read_text())
    assert results["counts"] == {"train": 60, "val": 6, "test": 18}  # 10% of each class's 22 is validation
    assert results["classes"] == ["bar", "cross", "square"] and results["seeds"] == 1
    evals = {"knn", "linear", "finetune_1", "finetune_10", "finetune_100"}
    for key in ("top1", "val_top1"):
        assert set(results[key]) == {"pretrained", "random", "pixels"}
        assert set(results[key]["pretrained"]) == set(results[key]["random"]) == evals
        assert set(results[key]["pixels"]) == {"knn", "linear"}
        for by_eval in results[key].values():
            for entry in by_eval.values():
                assert set(entry) == {"mean", "std", "runs"} and len(entry["runs"]) == 1
                assert 0 <= entry["mean"] <= 100 and entry["std"] == 0
    # The pretraining's k-NN curve: from the random initialisation, every 5 steps, and the last (8th) step.
    assert [h["step"] for h in results["knn_history"]["seed0"]] == [0, 5, 8] and results["seconds"] > 0
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 5  # the header, then k-NN, linear probe and three label fractions
    assert Image.open(out / "plot.png").size[0] > 0
    # The labelled subsets are class-balanced: 1% of 20 per class is one image each.
    assert json.loads((out / "shards/train_1pct_seed0/info.json").read_text())["num_samples"] == 3

    code, again, err = bench_here(capsys, "--data", str(data), "--out", str(out), "--quick")
    assert code == 0, err[-3000:]
    assert again.count("done before") == len(lines) - 1, again
    assert json.loads((out / "results.json").read_text())["top1"] == results["top1"]
    # Parts measured with other settings are never mixed in: another model into the same --out stops.
    code, _, err = bench_here(capsys, "--data", str(data), "--out", str(out), "--quick", "--model", "mvitv2")
    assert code == 2 and "holds a benchmark with other model" in err, err


def test_processes_that_share_the_output_measure_one_seed_each_and_the_last_reports(tmp_path, capsys):
    data = image_tree(tmp_path / "shapes", {"train": 12, "test": 3})
    out = tmp_path / "bench"
    args = ["--data", str(data), "--out", str(out), "--quick", "--seeds", "2", "--only-seed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = bench(*args, "1", env=env)  # seed 1 alone: nothing to report yet
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "the report waits for seed 0" in first.stdout and not (out / "results.json").exists()
    last = bench(*args, "0", env=env)  # seed 0 finds seed 1's parts and reports both
    assert last.returncode == 0, last.stdout[-2000:] + last.stderr[-3000:]
    assert "done in " in last.stdout and last.stdout.count("done before") >= 1 + 2 + 2 * 4
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == 2 and len(results["top1"]["random"]["finetune_100"]["runs"]) == 2
    pixels = results["top1"]["pixels"]["knn"]["runs"]
    assert pixels[0] == pixels[1]  # both seeds read the same features
    with pytest.raises(SystemExit) as stop:
        real_bench.main(["--data", str(data), "--out", str(out), "--seeds", "2", "--only-seed", "2"])
    assert stop.value.code == 2 and "--only-seed must be one of 0..1" in capsys.readouterr().err


def test_moving_fashion_mnist_quick_run(tmp_path):
    rng = np.random.default_rng(0)
    source = write_idx(tmp_path / "idx", rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
                       np.arange(64, dtype=np.uint8) % 10)
    out = tmp_path / "bench"
    run = bench("--data", "moving-fashion-mnist", "--out", str(out), "--quick",
                env={**os.environ, "FASHION_MNIST_DIR": str(source)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    # data, pixels, pretrain, and per init the frozen protocols and the fine-tuning on directions
    assert len(lines) == 1 + 2 + 2 * 2 + 1 and "with frames shuffled" in lines[-2], run.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["counts"] == {"train": 50, "val": 10, "test": 20} and len(results["classes"]) == 10
    evals = {"knn", "linear", "finetune_direction", "finetune_direction_shuffled"}
    assert set(results["top1"]["pretrained"]) == set(results["top1"]["random"]) == evals
    assert set(results["top1"]["pixels"]) == {"knn", "linear"}
    assert json.loads((out / "shards_direction/train/info.json").read_text())["classes"] == list(DIRECTIONS)
    assert len([r for r in (out / "table.md").read_text().splitlines() if r.startswith("| ")]) == 1 + 4
    assert 50 <= results["order_blind_top1"] <= 100
    assert not (out / "plot.png").exists()  # the plot is of label fractions, which clips do not have


def test_moving_clips_keep_their_direction_until_a_wall_and_bounce(tmp_path):
    garment = np.zeros((28, 28), np.uint8)
    garment[4:24, 6:22] = 200
    for direction, name in enumerate(DIRECTIONS):
        clip = moving_clip(garment, direction, np.random.default_rng(direction))
        assert clip.shape == (FRAMES, SIZE, SIZE, 3) and (clip[..., 0] == clip[..., 2]).all()
        corners = np.array([np.argwhere(frame[..., 0])[0] - (4, 6) for frame in clip])  # the garment's place
        assert ((corners >= 0) & (corners <= SIZE - 28)).all()
        steps = np.sign(np.diff(corners, axis=0))
        assert (steps[0] == STEPS[name]).all()  # it starts along its direction
        for axis in range(2):  # and each axis turns round only at a wall
            turns = np.flatnonzero(np.diff(steps[:, axis]) != 0) + 1
            assert all(corners[t, axis] <= 4 or corners[t, axis] >= SIZE - 28 - 4 for t in turns)
        # glide's last direction is the one the frames end with (the order-blind ceiling counts on it), unless
        # the last step turned at a wall, after which the garment moves on the turned way
        last = glide(direction, np.random.default_rng(direction), np.full(2, SIZE - 28.0))[1]
        at_wall = ((corners[-1] <= 3) | (corners[-1] >= SIZE - 28 - 3)).any()
        assert at_wall or (steps[-1] == STEPS[DIRECTIONS[last]]).all()

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = (np.arange(30) % 10).astype(np.uint8)
    found = write_clips(tmp_path / "clips", {"train": 12, "test": 4}, source=write_idx(tmp_path / "idx", images,
                                                                                      labels))
    assert [r["direction"] for r in found["train"]] == [i % 4 for i in range(12)]
    assert all(r["class"] == labels[r["source"]] for r in found["train"])
    frames, info = decode_video((tmp_path / "clips" / found["test"][0]["file"]).read_bytes(),
                                lambda info: np.arange(FRAMES) / info.fps)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and info.duration * info.fps == pytest.approx(FRAMES)
    assert write_clips(tmp_path / "clips", {"train": 12}, source=tmp_path / "missing")["train"] == found["train"]


def test_straight_clips_never_bounce_and_hold_an_order_blind_model_to_half(tmp_path):
    """`paths="straight"`: each clip moves one way along its diagonal from first frame to last, never turning at
    a wall, so a clip played backwards is a clip of the opposite direction: no model blind to frame order can do
    better than 50%, where bouncing clips allow more."""
    garment = np.full((28, 28), 200, np.uint8)
    for direction, name in enumerate(DIRECTIONS):
        for seed in range(20):
            clip = moving_clip(garment, direction, np.random.default_rng(seed), paths="straight")
            corners = np.array([np.argwhere(frame[..., 0])[0] for frame in clip])
            assert ((corners >= 0) & (corners <= SIZE - 28)).all()
            steps = np.sign(np.diff(corners, axis=0))
            assert ((steps == STEPS[name]) | (steps == 0)).all() and (corners[-1] - corners[0] != 0).all()
            assert glide(direction, np.random.default_rng(seed), np.full(2, SIZE - 28.0), paths="straight")[1] \
                == direction
    rng = np.random.default_rng(2)
    source = write_idx(tmp_path / "idx", rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
                       (np.arange(40) % 10).astype(np.uint8))
    assert order_blind_top1("train", 40, source=source, paths="straight") == 50.0
    assert order_blind_top1("train", 40, source=source) > 50.0
    write_clips(tmp_path / "clips", {"train": 4}, source=source, paths="straight")
    with pytest.raises(FashionMnistError, match=r"lists clips of \(frames, paths\) \[\(16, 'straight'\)\]"):
        write_clips(tmp_path / "clips", {"train": 4}, source=source)  # bouncing clips asked of that folder


def test_bad_inputs_stop_with_one_line(tmp_path, capsys):
    empty = tmp_path / "no_idx"
    empty.mkdir()
    env = {**os.environ, "FASHION_MNIST_DIR": str(empty)}
    missing = bench("--data", "fashion-mnist", "--out", str(tmp_path / "a"), "--quick", env=env)  # as users run it
    assert missing.returncode == 2 and "apt-get install -y dataset-fashion-mnist" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1

    only_train = image_tree(tmp_path / "half", {"train": 3})
    code, _, err = bench_here(capsys, "--data", str(only_train), "--out", str(tmp_path / "b"), "--quick")
    assert code == 2 and f"no {only_train / 'test'}/" in err

    broken = image_tree(tmp_path / "broken", {"train": 10, "test": 3})
    (broken / "train" / "bar" / "0.png").write_bytes(b"not a png")
    code, _, err = bench_here(capsys, "--data", str(broken), "--out", str(tmp_path / "c"), "--quick")
    assert code == 2 and "0.png" in err and "remove or replace" in err


def test_fashion_mnist_idx_files_become_class_folders(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
    labels = np.array([9, 0, 9], dtype=np.uint8)
    source = write_idx(tmp_path / "idx", images, labels)
    assert (read_idx(source / "train-labels-idx1-ubyte.gz", 8) == labels).all()
    out = write_class_folders(tmp_path / "tree", source)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(f"{s}/{c}/{i:05d}.png" for s in ("test", "train")
                             for c, i in ((CLASSES[0], 1), (CLASSES[9], 0), (CLASSES[9], 2)))
    assert (np.array(Image.open(out / "train" / CLASSES[9] / "00002.png")) == images[2]).all()
    with pytest.raises(FashionMnistError, match="not an idx file"):
        read_idx(source / "train-labels-idx1-ubyte.gz", 16)
    (source / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b cut")
    with pytest.raises(FashionMnistError, match="not a gzip file"):
        read_idx(source / "t10k-images-idx3-ubyte.gz", 16)


def test_class_balanced_subsets_and_the_feature_probe():
    inputs = [Input(f"{i}.png", i % 4, str(i)) for i in range(400)]
    chosen = class_balanced(inputs, 0.1, np.random.default_rng(1))
    assert sorted(np.bincount([inputs[i].label for i in chosen])) == [10, 10, 10, 10]
    assert chosen == class_balanced(inputs, 0.1, np.random.default_rng(1))  # a function of the seed
    assert chosen != class_balanced(inputs, 0.1, np.random.default_rng(2))
    # Four separable blobs in 16 dims with a large shared offset (what the BatchNorm is for): the probe
    # trained on the features separates held-out points.
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 3 + 50
    labels = torch.arange(400) % 4
    features = centres[labels] + torch.randn(400, 16, generator=generator)
    head, steps = fit_probe(features[:300], labels[:300], 4, lr=1e-2, weight_decay=0.0, epochs=20, batch_size=32)
    assert steps == 20 * 10  # 300 rows in batches of 32: ten a pass
    with torch.no_grad():
        assert (head(features[300:]).argmax(1) == labels[300:]).float().mean() == 1.0
