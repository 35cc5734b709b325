"""Run by test_pretrain under `accelerate launch` with two gloo processes: trains like pretrain/main.py, then
writes each rank's final weights and step count so the test can compare ranks."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from engine.config import parse_args
from engine.trainer import Trainer
from pretrain.task import PretrainTask

if __name__ == "__main__":
    cfg = parse_args(__doc__, sys.argv[1:])
    trainer = Trainer(PretrainTask(), cfg)
    rank = trainer.rank
    trainer.fit()
    state = {k: v.contiguous() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    save_file(state, str(Path(cfg.output_dir) / f"final-rank{rank}.safetensors"),
              metadata={"step": str(trainer.progress.step), "world": str(trainer.world)})
