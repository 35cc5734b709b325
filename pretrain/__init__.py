"""MAE pretraining: `accelerate launch pretrain/main.py --config FILE [key=value ...]`."""
