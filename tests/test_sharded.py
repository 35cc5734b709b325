"""Sharded (FSDP2) checkpoints on two CPU processes: save, resume bit-identical, agree with unsharded training,
and export an encoder that a plain model loads. accelerate 1.15 turns FSDP off on CPUs (`MULTI_CPU` is DDP),
so the trainer's FSDP path itself runs only on GPUs (tools/gpu_check); what it calls is tested here."""

import json
import os
import sys
from pathlib import Path

import torch
from launch import run
from safetensors.torch import load_file

from models import create_model, load_pretrained


def test_sharded_checkpoint_resumes_exactly_and_matches_unsharded_training(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = run([torchrun, "--standalone", "--nproc_per_node", "2", "tests/dist_sharded.py", str(tmp_path)],
                 env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    straight, resumed = load_file(tmp_path / "sharded.safetensors"), load_file(tmp_path / "resumed.safetensors")
    plain = load_file(tmp_path / "plain.safetensors")
    assert straight.keys() == resumed.keys() == plain.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    for key in straight:
        torch.testing.assert_close(straight[key], plain[key], rtol=1e-4, atol=1e-4)  # Adam: lr 1e-3 per step
    norms = json.loads((tmp_path / "norms.json").read_text())
    assert norms["shard_files"] == ["shard-00001-model-00001-of-00001.safetensors",
                                    "shard-00002-model-00001-of-00001.safetensors"]
    torch.testing.assert_close(torch.tensor(norms["sharded"]), torch.tensor(norms["plain"]), rtol=1e-4, atol=0)

    mae = create_model("mae_hiera_tiny_224", input_size=(64, 64), decoder_depth=1, decoder_embed_dim=64,
                       decoder_num_heads=2)
    mae.load_state_dict(straight)
    encoder = create_model("hiera_tiny_224", input_size=(64, 64), num_classes=4)
    report = load_pretrained(encoder, mae.encoder_state_dict(), strict=False)
    assert not report.unexpected and not report.mismatched and report.loaded

