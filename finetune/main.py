"""Fine-tuning and evaluation entry point.

    accelerate launch finetune/main.py --config configs/finetune/demo.yaml [key=value ...]
    accelerate launch finetune/main.py --config configs/finetune/demo.yaml eval_only=true \
        model.pretrained=runs/demo/finetune output_dir=runs/demo/evaluation

Setup only: the loop is engine.trainer.Trainer; the step and the evaluation are finetune.task.FinetuneTask.
Results: TensorBoard logs in output_dir/tb, metrics.json (top1, top5, top1_shuffled in percent; mAP for
data.multi_label) in output_dir.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from engine import tracking
from engine.checkpoint import check_output_dir_is_free
from engine.config import RunConfig, parse_args, to_yaml
from engine.errors import one_line_errors
from engine.tblog import TrainLogger
from engine.trainer import Trainer
from finetune.probe import features_suffice, probe_on_features
from finetune.task import FinetuneTask, describe


def announce(task: FinetuneTask, logger: TrainLogger, is_main: bool) -> None:
    """Which weights were loaded, dropped and newly initialised: printed and kept in TensorBoard."""
    text = describe(task.report)
    if is_main:
        print(f"initialisation:\n{text}")
    logger.text("setup/initialisation", f"```\n{text}\n```")


def run_without_trainer(task: FinetuneTask, model, accelerator: Accelerator, cfg: RunConfig) -> dict[str, float]:
    """`eval_only=true`: multi-view evaluation of `model.pretrained` on `data.val`; or a linear probe that
    asked for no augmentation, fitted on features computed once (finetune.probe.probe_on_features). Neither
    needs the training loop."""
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(cfg))
    logger = TrainLogger.for_run(accelerator, cfg)
    announce(task, logger, accelerator.is_main_process)
    if cfg.eval_only:
        metrics = task.evaluate(model.to(accelerator.device), accelerator, logger, step=0)
    else:
        if accelerator.is_main_process:
            print("linear probe without augmentation: the frozen encoder's features are computed once")
        metrics = probe_on_features(task, model, cfg, accelerator, logger)
    logger.close()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_args(__doc__, argv)
    task = FinetuneTask()
    with one_line_errors(TypeError, KeyError):  # bad keys, model overrides or checkpoints: before any work
        check_output_dir_is_free(cfg)
        if cfg.eval_only or features_suffice(cfg):
            accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                      log_with=tracking.log_with(cfg) or None)
            torch.manual_seed(cfg.seed)  # as the Trainer seeds: a random-init encoder is the same every run
            model = task.build_model(cfg)
        else:
            trainer = Trainer(task, cfg)
            accelerator = trainer.accelerator
    with one_line_errors():  # e.g. data that fails to load: the run stops before it writes anything more
        if cfg.eval_only or features_suffice(cfg):
            metrics = run_without_trainer(task, model, accelerator, cfg)
        else:
            if not cfg.data.val and trainer.is_main:
                print("note: data.val is not set: training without evaluation")
            announce(task, trainer.logger, trainer.is_main)
            metrics = trainer.fit()
    if accelerator.is_main_process:
        shown = ", ".join(f"{k} {metrics[k]:.2f}%" for k in ("top1", "top5", "top1_shuffled", "chance", "mAP",
                                                            "mAP_shuffled")
                          if k in metrics)
        print(f"done: {shown or 'no evaluation (data.val not set)'}; metrics in {cfg.output_dir}/metrics.json; "
              f"TensorBoard logs in {cfg.output_dir}/tb (tensorboard --logdir {cfg.output_dir})")
    return metrics


if __name__ == "__main__":
    main()
