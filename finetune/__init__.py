"""Fine-tuning and multi-view evaluation of pretrained encoders (entry point: finetune/main.py)."""
