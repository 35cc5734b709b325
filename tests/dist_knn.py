"""Run by test_knn under `accelerate launch` (one or two gloo processes): pretrains like pretrain/main.py and
writes what `fit` returned on each rank, so the test can compare ranks and process counts."""

import json
import sys
from pathlib import Path

from engine.config import parse_args
from engine.trainer import Trainer
from pretrain.task import PretrainTask

if __name__ == "__main__":
    cfg = parse_args(__doc__, sys.argv[1:])
    trainer = Trainer(PretrainTask(), cfg)
    metrics = trainer.fit()
    (Path(cfg.output_dir) / f"fit-rank{trainer.rank}.json").write_text(json.dumps(metrics))
