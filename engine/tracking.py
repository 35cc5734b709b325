"""Experiment trackers besides TensorBoard (`log.trackers`: tensorboard, wandb, mlflow), through accelerate's
`log_with` / `init_trackers`. TensorBoard is the project's own writer (engine/tblog.py: GIFs, text, purging
on resume) and needs nothing more; the others get the config, every scalar and the images they can show.
A resumed run continues the same wandb or MLflow run: their ids are kept in output_dir/trackers.json.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from .config import ConfigError, RunConfig, flatten

KNOWN = {"tensorboard": None, "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the module it needs
IDS_FILE = "trackers.json"


def log_with(cfg: RunConfig) -> list[str]:
    """The trackers accelerate starts (TensorBoard is ours); stops before any work when one is unknown or its
    package is missing, naming the extra that installs it."""
    unknown = [t for t in cfg.log.trackers if t not in KNOWN]
    if unknown:
        raise ConfigError(f"log.trackers: unknown {', '.join(unknown)} (use {', '.join(KNOWN)})")
    missing = [t for t in cfg.log.trackers if KNOWN[t] and importlib.util.find_spec(KNOWN[t]) is None]
    if missing:
        extras = ",".join(missing)
        raise ConfigError(f"log.trackers has {' and '.join(missing)}, which is not installed: "
                          f"pip install -e '.[{extras}]' (or pip install {' '.join(missing)})")
    return [t for t in cfg.log.trackers if KNOWN[t]]


def start(accelerator: Accelerator, cfg: RunConfig, resumed: bool) -> None:
    """Start the trackers of `accelerator` (made with log_with=log_with(cfg)) with the config as parameters, or,
    `resumed`, continue the runs named in output_dir/trackers.json."""
    if not accelerator.log_with:
        return
    output_dir = Path(cfg.output_dir)
    ids_path = output_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if resumed and ids_path.exists() else {}
    name = output_dir.name
    init_kwargs = {
        "wandb": {"name": name, "dir": str(output_dir), "id": ids.get("wandb"), "resume": "allow"},
        "mlflow": {"run_name": name, "run_id": ids.get("mlflow")},
    }
    # The config goes with the first start only: MLflow refuses to change a logged parameter, and a resumed
    # run's own config (resume=auto, a longer schedule) is in output_dir/config.yaml.
    accelerator.init_trackers(cfg.log.project, config=None if ids else flatten(cfg), init_kwargs=init_kwargs)
    if accelerator.is_main_process:
        found = {t.name: run_id(t) for t in accelerator.trackers if t.name in ("wandb", "mlflow")}
        ids_path.write_text(json.dumps(found, indent=2) + "\n")


def run_id(tracker: Any) -> str:
    return tracker.tracker.id if tracker.name == "wandb" else tracker.tracker.info.run_id


def log_image(trackers: list, tag: str, image: np.ndarray, step: int) -> None:
    """[H, W, 3] uint8 to the trackers that show images (wandb, MLflow)."""
    for tracker in trackers:
        if tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step=step)
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_image(image, key=tag.replace("/", "_"), step=step)
