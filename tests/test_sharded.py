"""Sharded (FSDP2) checkpoints on two CPU processes: save, resume bit-identical, agree with unsharded training,
and export an encoder that a plain model loads. accelerate 1.15 turns FSDP off on CPUs (`MULTI_CPU` is DDP),
so the trainer's FSDP path itself runs only on GPUs: the `cuda` test (tools/gpu_check.sh runs it)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from launch import kill_after, run
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
    mae.load_state_dict({k: v for k, v in straight.items() if not k.startswith("ema.")})
    assert any(k.startswith("ema.") for k in straight)  # the EMA resumed bit-identically too
    encoder = create_model("hiera_tiny_224", input_size=(64, 64), num_classes=4)
    report = load_pretrained(encoder, mae.encoder_state_dict(), strict=False)
    assert not report.unexpected and not report.mismatched and report.loaded



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs FSDP on GPUs only")
def test_fsdp_pretraining_killed_and_resumed_is_bit_identical(demo_shards, tmp_path):
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
              "configs/accelerate/1node_8gpu_fsdp.yaml", "--num_processes", "1", "--mixed_precision", "no",
              "pretrain/main.py", "--config", "configs/pretrain/demo.yaml", f"data.train={demo_shards['train']}",
              "data.num_workers=1", "log.progress=false", "log.visualize_every=4", "train.max_steps=8",
              "train.checkpoint_every=2", "model.drop_path_rate=0.2"]
    straight = run([*launch, f"output_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    kill_after([*launch, f"output_dir={tmp_path / 'killed'}"], tmp_path / "killed" / "checkpoint-00000004")
    resumed = run([*launch, f"output_dir={tmp_path / 'killed'}", "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = ("straight", "killed")
    assert not any((tmp_path / d / "checkpoint-00000008" / "model.safetensors").exists() for d in runs)  # sharded
    shards = {d: sorted((tmp_path / d / "checkpoint-00000008" / "sharded").glob("*.safetensors")) for d in runs}
    expected, got = ({k: v for f in shards[d] for k, v in load_file(f).items()} for d in runs)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    encoder = load_file(tmp_path / "killed" / "encoder.safetensors")
    assert all(torch.equal(encoder[k], got[f"model.encoder.{k}"]) for k in encoder)
