# The README's commands. `make test` sets up .venv (idempotent) and runs lint + the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO := runs/demo
ACCELERATE := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: setup test lint demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=30 $(PYTEST_ARGS)

# The main job: synthetic demo videos -> shards -> a small video MAE pretraining run (with the online k-NN of
# its encoder on the demo classes, from the random initialisation on) -> fine-tuning its encoder on the 4
# motion classes, evaluated with 2 views per video and with shuffled frames (printed with chance) -> the
# fine-tuned model's top classes for one validation video.
demo: $(STAMP) $(DEMO)/shards/train/info.json $(DEMO)/shards/val/info.json
	rm -rf $(DEMO)/pretrain $(DEMO)/finetune  # a fresh run each time: no earlier run's events in its TensorBoard logs
	$(ACCELERATE) pretrain/main.py --config configs/pretrain/demo.yaml \
		eval.knn.train=$(DEMO)/shards/train eval.knn.val=$(DEMO)/shards/val eval.knn.every=100
	$(ACCELERATE) finetune/main.py --config configs/finetune/demo.yaml
	$(PY) -m finetune.predict --checkpoint $(DEMO)/finetune $$(ls $(DEMO)/raw/videos/moving_left/va*.mp4 | head -1)

# Made again when the generator changes; the old videos and shards go, as their names change with the data.
$(DEMO)/raw/train.csv: data/synthetic.py | $(STAMP)
	rm -rf $(DEMO)/raw $(DEMO)/shards
	$(PY) -m data.synthetic --out $(DEMO)/raw --per-class 16 --size 64x64 --frames 32

$(DEMO)/shards/%/info.json: $(DEMO)/raw/train.csv
	$(PY) -m data.make_shards kinetics --csv $(DEMO)/raw/$*.csv --videos $(DEMO)/raw/videos --out $(DEMO)/shards/$* --per-shard 16
