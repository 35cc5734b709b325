"""Experiment trackers (log.trackers): a real pretraining run logs to TensorBoard, Weights & Biases (offline)
and MLflow (a local SQLite store), and a resume continues the same wandb and MLflow runs. What each tracker
holds is read back from its own files: the event files, wandb's run file, MLflow's store."""

import json
import os
import struct
import sys
from pathlib import Path

import pytest
from launch import run
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from engine import tracking
from engine.config import ConfigError, load_config

LEVELDB_BLOCK = 32768


def wandb_records(path: Path) -> list:
    """The records of a wandb run file (`run-<id>.wandb`: LevelDB's log format, 32 KiB blocks of chunks with a
    7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last), after a 7-byte ':W&B' file header)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        left = LEVELDB_BLOCK - position % LEVELDB_BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_logged(run_dir: Path) -> tuple[dict[int, dict], dict]:
    """({step: {key: value}}, config) of every offline run file under `run_dir` (a resume appends a file)."""
    history, config = {}, {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                       for item in record.history.item}
                history.setdefault(row["_step"], {}).update(row)
            elif kind == "config":
                config |= {item.key: json.loads(item.value_json) for item in record.config.update}
    return history, config


def test_scalars_config_and_images_reach_every_tracker_and_a_resume_continues_their_runs(demo_shards, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # The experiment is made here so that its artifacts go under tmp_path; one made by the run would keep them in
    # ./mlruns of the working directory (MLflow's default for a database store).
    project = load_config(["configs/pretrain/demo.yaml"], []).log.project
    MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment(project, artifact_location=str(tmp_path / "artifacts"))
    command = [sys.executable, "pretrain/main.py", "--config", "configs/pretrain/demo.yaml",
               f"data.train={demo_shards['train']}", f"output_dir={out}", "data.num_workers=0", "log.progress=false",
               "log.every=2", "log.visualize_every=4", "train.checkpoint_every=4",
               "log.trackers=[tensorboard,wandb,mlflow]"]
    first = run([*command, "train.max_steps=4"], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    ids = json.loads((out / tracking.IDS_FILE).read_text())
    resumed = run([*command, "train.max_steps=6", "resume=auto"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / tracking.IDS_FILE).read_text()) == ids  # the same runs, continued

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(losses) == [2, 4, 6]

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    mlflow_losses = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "train/loss")}
    assert mlflow_losses == pytest.approx(losses)
    params = client.get_run(ids["mlflow"]).data.params
    assert params["train.base_lr"] == "0.004" and params["model.name"] == "mae_hiera_base_16x224"
    assert [a.path for a in client.list_artifacts(ids["mlflow"])] == ["images"]

    history, config = wandb_logged(out)
    assert {step: row["train/loss"] for step, row in history.items() if "train/loss" in row} == pytest.approx(losses)
    assert history[1]["startup/total_s"] > 0
    assert config["train.base_lr"] == 0.004 and config["model.name"] == "mae_hiera_base_16x224"
    assert list(out.glob("wandb/offline-run-*/files/media/images/reconstruction/frames_0_4_*.png"))


def test_unknown_or_missing_trackers_stop_before_work(monkeypatch):
    with pytest.raises(ConfigError, match="unknown comet"):
        tracking.log_with(load_config([], ["log.trackers=[tensorboard,comet]"]))
    monkeypatch.setitem(tracking.KNOWN, "wandb", "a_module_that_is_not_installed")
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[wandb\]'"):
        tracking.log_with(load_config([], ["log.trackers=[wandb]"]))
