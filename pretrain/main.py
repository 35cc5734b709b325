"""MAE pretraining entry point.

    accelerate launch pretrain/main.py --config configs/pretrain/demo.yaml [key=value ...]

Setup only: the loop is engine.trainer.Trainer; the step and the viewer are pretrain.task.PretrainTask.
"""

from __future__ import annotations

import sys

from engine.config import ConfigError, parse_args
from engine.trainer import Trainer
from pretrain.task import PretrainTask


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_args(__doc__, argv)
    try:
        trainer = Trainer(PretrainTask(), cfg)
    except (ConfigError, TypeError, KeyError) as err:  # bad keys or model overrides: before any work
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    metrics = trainer.fit()
    if trainer.is_main:
        print(f"done: {trainer.progress.step} steps; TensorBoard logs in {cfg.output_dir}/tb "
              f"(tensorboard --logdir {cfg.output_dir}); checkpoints in {cfg.output_dir}/checkpoint-*; "
              f"encoder for fine-tuning: {cfg.output_dir}/encoder.safetensors")
    return metrics


if __name__ == "__main__":
    main()
