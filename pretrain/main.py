"""MAE pretraining entry point.

    accelerate launch pretrain/main.py --config configs/pretrain/demo.yaml [key=value ...]

Setup only: the loop is engine.trainer.Trainer; the step and the viewer are pretrain.task.PretrainTask.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.checkpoint import check_output_dir_is_free
from engine.config import parse_args
from engine.errors import one_line_errors
from engine.trainer import Trainer
from pretrain.knn_curve import write_curve
from pretrain.task import PretrainTask


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_args(__doc__, argv)
    with one_line_errors(TypeError, KeyError):  # and bad model overrides: before any work
        check_output_dir_is_free(cfg)
        trainer = Trainer(PretrainTask(), cfg)
    with one_line_errors():  # e.g. data that fails to load: the run stops before it writes anything more
        metrics = trainer.fit()
    if trainer.is_main:
        print(f"done: {trainer.progress.step} steps; TensorBoard logs in {cfg.output_dir}/tb "
              f"(tensorboard --logdir {cfg.output_dir}); checkpoints in {cfg.output_dir}/checkpoint-*; "
              f"encoder for fine-tuning: {cfg.output_dir}/encoder.safetensors")
        if "knn_top1" in metrics:
            report_knn(Path(cfg.output_dir))
    return metrics


def report_knn(output_dir: Path) -> None:
    """The k-NN top-1 (mAP for multi-label sets) of the initial and the final encoder, and the curve's picture."""
    history = json.loads((output_dir / "metrics.json").read_text())["knn_history"]
    first, last = history[0], history[-1]
    key = "mAP" if "mAP" in first else "top1"
    print(f"k-NN {key.replace('top1', 'top-1')}: {first[key]:.1f}% at step {first['step']}"
          f"{' (the random initialisation)' if first['step'] == 0 else ''}, {last[key]:.1f}% at step "
          f"{last['step']}; curve: {write_curve(output_dir)}")


if __name__ == "__main__":
    main()
