"""Multi-label fine-tuning end to end: 'path id,id' shards, two gloo processes, mAP checked against sklearn on
scores computed again by `finetune.predict`."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from launch import run, two_gloo_processes
from sklearn.metrics import average_precision_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data import make_shards
from data.synthetic import CLASSES, kinetics_name, write_kinetics_dataset

DEMO = "configs/finetune/demo.yaml"
SIZE = ["model.input_size=[8,32,32]", "data.crop_size=32", "data.num_workers=1", "log.progress=false"]
# The four motion classes, and a fifth that every sideways motion also has: videos hold one or two labels.
NAMES = [*CLASSES, "sideways"]
SIDEWAYS = {0, 1}


@pytest.fixture(scope="module")
def multi_label_shards(tmp_path_factory) -> tuple[dict[str, Path], dict[str, list]]:
    """({split: shard dir}, {split: [(video, label ids)]}) of 4 videos per class and split."""
    root = tmp_path_factory.mktemp("multilabel")
    csvs = write_kinetics_dataset(root / "raw", per_class=4, size=(40, 32), num_frames=16)
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    shards, videos = {}, {}
    for split, path in csvs.items():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        videos[split] = []
        for r in rows:
            label = CLASSES.index(r["label"])
            video = Path(r["label"]) / kinetics_name(r["youtube_id"], int(r["time_start"]), int(r["time_end"]))
            videos[split].append((root / "raw" / "videos" / video, [label, 4] if label in SIDEWAYS else [label]))
        lines = [f"{v.relative_to(root / 'raw' / 'videos')} {','.join(map(str, ids))}" for v, ids in videos[split]]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        shards[split] = root / "shards" / split
        make_shards.main(["list", "--list", str(root / f"{split}.txt"), "--root", str(root / "raw" / "videos"),
                          "--classes", str(root / "classes.txt"), "--out", str(shards[split]), "--per-shard", "4",
                          "--workers", "1"])
    return shards, videos


def test_multi_label_finetune_on_two_processes_reports_the_map_sklearn_computes(multi_label_shards, mae_encoder,
                                                                                 tmp_path):
    shards, videos = multi_label_shards
    out = tmp_path / "ft"
    result = two_gloo_processes(
        "finetune/main.py", "--config", DEMO, f"data.train={shards['train']}", f"data.val={shards['val']}",
        f"output_dir={out}", *SIZE, f"model.pretrained={mae_encoder}", "data.multi_label=true", "train.batch_size=4",
        "train.max_steps=6", "train.mixup=0.8", "train.cutmix=1.0", "train.layer_decay=null", "eval.batch_size=4",
        "eval.metric=mAP", "eval.export=best")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_videos"] == 16 and metrics["classes_scored"] == 5 and metrics["views_per_video"] == 2
    assert set(metrics["per_class_ap"]) == set(NAMES) and not {"top1", "top5", "chance"} & set(metrics)
    assert metrics["best"] == {"step": 6, "metric": "mAP", "value": metrics["mAP"], "exported": "best"}
    assert f"mAP {metrics['mAP']:.2f}%" in result.stdout
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    assert events.Scalars("eval/mAP")[-1].value == pytest.approx(metrics["mAP"])
    assert "eval/per_class_ap" in events.Tags()["images"] and "eval/confusion_matrix" not in events.Tags()["images"]
    assert (out / "per_class_ap.png").is_file() and not (out / "confusion_matrix.png").exists()

    # The exported model scores each validation video again in this one process (its sigmoid scores, the
    # maximum over the run's 1 x 2 views): sklearn's mAP over them is the mAP the two ranks gathered.
    files = [str(v) for v, _ in videos["val"]]
    again = run([sys.executable, "-m", "finetune.predict", "--checkpoint", str(out), "--json", "--threshold", "0",
                 *files])
    assert again.returncode == 0, again.stderr[-3000:]
    scores = np.zeros((len(files), len(NAMES)))
    for row, entry in enumerate(json.loads(again.stdout)):
        for p in entry["predictions"]:
            scores[row, p["index"]] = p["probability"]
    targets = np.zeros_like(scores)
    for row, (_, ids) in enumerate(videos["val"]):
        targets[row, ids] = 1
    assert metrics["mAP"] == pytest.approx(100 * average_precision_score(targets, scores, average=None).mean(),
                                           abs=1e-3)

    # Without --json, the classes whose score reaches the threshold, by name.
    shown = run([sys.executable, "-m", "finetune.predict", "--checkpoint", str(out), "--threshold", "0.5", files[0]])
    assert shown.returncode == 0, shown.stderr[-3000:]
    expected = sorted(NAMES[k] for k in np.flatnonzero(scores[0] >= 0.5))
    assert sorted(line.split()[0] for line in shown.stdout.splitlines()[1:]) == expected


def test_multi_label_shards_need_data_multi_label(multi_label_shards, mae_encoder, tmp_path):
    shards, _ = multi_label_shards
    result = run([sys.executable, "finetune/main.py", "--config", DEMO, f"data.train={shards['train']}",
                  f"data.val={shards['val']}", f"output_dir={tmp_path / 'ft'}", *SIZE,
                  f"model.pretrained={mae_encoder}", "train.batch_size=4"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {shards['train']}: its samples' labels are lists of class ids (multi-label), but "
        f"data.multi_label=false: set data.multi_label=true")
