"""Sharded (FSDP2) checkpoints on two CPU processes: first the sharding code alone (tests/dist_sharded.py: save,
resume bit-identical, agree with unsharded training, export an encoder that a plain model loads), then the
trainer's FSDP path through the apps (sharded checkpoints, kill and resume, the sharded EMA, the k-NN monitor,
the viewer on every rank, the export gathered on rank 0). accelerate 1.15 turns FSDP off on CPUs (`MULTI_CPU` is
DDP), so on CPUs the apps run under tests/fsdp_cpu.py, which changes only that device check; the same tests run
on a GPU without it (marked `cuda`: tools/gpu_check.sh). Left to the GPU run: NCCL, parameters on a CUDA device,
the CUDA RNG states in checkpoints."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from launch import ACCELERATE, cpu_launch, free_port, kill_after, run
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.checkpoint import HuggingFaceStorageReader

from engine import checkpoint
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


def test_fsdp_reduces_gradients_in_fp32_as_ddp_does_under_bf16(tmp_path):
    """Under bf16 mixed precision accelerate's FSDP2 policy reduce-scatters gradients in bf16 (about 2e-3 off DDP's
    fp32 all-reduce here); with `train.fsdp_reduce_dtype` at its default, FSDP's reduced gradients equal DDP's to
    fp32 round-off, and bf16 can still be chosen (tests/dist_reduce_dtype.py)."""
    launch = [ACCELERATE, "launch", "--config_file", "configs/accelerate/1node_8gpu_fsdp.yaml", "--mixed_precision",
              "bf16", "--num_processes", "2", "--main_process_port", str(free_port())]
    result = run([*launch, "tests/fsdp_cpu.py", "tests/dist_reduce_dtype.py", str(tmp_path)],
                 env=dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    differences = json.loads((tmp_path / "differences.json").read_text())
    assert differences["default"] < 1e-6
    assert differences["accelerate"] > 1e-4 and differences["bf16"] > 1e-4


# The trainer's own FSDP path: on CPUs through tests/fsdp_cpu.py (accelerate 1.15 gives CPUs no FSDP), on a GPU
# as users launch it. Both use the shipped config (fp32 here, for bit-identical resumes): cpu_ram_efficient_loading
# off, and sync_module_states unset, as FSDP2 has no use for it (its setup code is CUDA-only).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]
RANKS = {"cpu": 2, "cuda": 1}


def fsdp_launch(device: str, app: str, *overrides: str, options: tuple[str, ...] = (),
                sharded: bool = True) -> tuple[list[str], dict]:
    """(command, environment) of `app` under FSDP2 (or, with `sharded=False`, plain data parallel on the same
    ranks): two gloo processes on CPU, one process on a GPU; `options` go to `accelerate launch`."""
    if device == "cpu" and not sharded:
        launch, env = cpu_launch(RANKS[device])
    else:
        config = ["--config_file", "configs/accelerate/1node_8gpu_fsdp.yaml"] if sharded else []
        launch = [ACCELERATE, "launch", *config, "--mixed_precision", "no", "--num_processes", str(RANKS[device]),
                  "--main_process_port", str(free_port())]
        env = dict(os.environ)
    script = [app]
    if device == "cpu" and sharded:
        script, env = ["tests/fsdp_cpu.py", app], env | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return [*launch, *options, *script, *overrides, "data.num_workers=0", "log.progress=false"], env


def whole(sharded: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's tensors put together (model.*, optim.*, task.*), read in this one process."""
    meta = HuggingFaceStorageReader(str(sharded)).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(sharded)), no_dist=True)
    return state


def assert_same_checkpoints(first: Path, second: Path, ranks: int) -> None:
    """Sharded (one shard file per rank), and every tensor of every rank's shard file equal."""
    assert not (first / "model.safetensors").exists() and not (second / "model.safetensors").exists()
    files = sorted(p.name for p in (first / "sharded").glob("*.safetensors"))
    assert len(files) == ranks and files == sorted(p.name for p in (second / "sharded").glob("*.safetensors"))
    for name in files:
        expected, got = load_file(first / "sharded" / name), load_file(second / "sharded" / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name


@pytest.mark.parametrize("device", DEVICES)
def test_fsdp_pretraining_killed_and_resumed_is_bit_identical(device, demo_shards, tmp_path):
    """Through the trainer: sharded checkpoints, resume=auto after a SIGKILL, the viewer on every rank, the
    k-NN monitor on the sharded encoder, the encoder export gathered on rank 0, and agreement with DDP."""
    knn = [f"eval.knn.{role}={demo_shards[role]}" for role in ("train", "val")]
    app = ("pretrain/main.py", "--config", "configs/pretrain/demo.yaml", f"data.train={demo_shards['train']}",
           "train.batch_size=4", "train.max_steps=6", "train.checkpoint_every=2", "log.visualize_every=3",
           "model.drop_path_rate=0.2", *knn, "eval.knn.every=3", "eval.knn.max_samples=8", "eval.knn.k=4",
           "eval.batch_size=4")
    launch, env = fsdp_launch(device, *app)
    straight = run([*launch, f"output_dir={tmp_path / 'straight'}"], env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed"
    assert kill_after([*launch, f"output_dir={killed}"], killed / "checkpoint-00000002", env=env)
    assert not (killed / "checkpoint-00000006").exists()
    resumed = run([*launch, f"output_dir={tmp_path / 'killed'}", "resume=auto"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_checkpoints(tmp_path / "straight" / "checkpoint-00000006", killed / "checkpoint-00000006",
                            RANKS[device])
    curves = [json.loads((tmp_path / d / "metrics.json").read_text())["knn_history"] for d in ("straight", "killed")]
    straight_knn, resumed_knn = ([(h["step"], h["top1"], h["top5"]) for h in curve] for curve in curves)
    assert straight_knn == resumed_knn and [step for step, _, _ in straight_knn] == [0, 3, 6]
    events = EventAccumulator(str(tmp_path / "straight" / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("reconstruction/frames_0")] == [3, 6]

    # Data parallel on the same ranks trains the same model, up to fp32 round-off.
    launch, env = fsdp_launch(device, *app, sharded=False)
    ddp = run([*launch, f"output_dir={tmp_path / 'ddp'}"], env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    plain = load_file(tmp_path / "ddp" / "checkpoint-00000006" / "model.safetensors")
    sharded = whole(tmp_path / "straight" / "checkpoint-00000006" / "sharded")
    assert plain.keys() == {k.removeprefix("model.") for k in sharded if k.startswith("model.")}
    for key, value in plain.items():
        torch.testing.assert_close(sharded[f"model.{key}"], value, rtol=1e-4, atol=1e-4)

    # The export is one whole file, the sharded model's encoder, and a plain encoder loads it.
    saved = whole(tmp_path / "killed" / "checkpoint-00000006" / "sharded")
    encoder_file = tmp_path / "killed" / "encoder.safetensors"
    exported = load_file(encoder_file)
    assert exported.keys() and all(torch.equal(v, saved[f"model.encoder.{k}"]) for k, v in exported.items())
    name, overrides = checkpoint.read_encoder_metadata(encoder_file)
    report = load_pretrained(create_model(name, **overrides, num_classes=4), str(encoder_file), strict=False)
    assert report.loaded and not report.unexpected and not report.mismatched


@pytest.mark.parametrize("device", DEVICES)
def test_fsdp_finetuning_resumes_its_sharded_ema_bit_identically(device, demo_shards, mae_encoder, tmp_path):
    """FinetuneTask shards its EMA (shard_copies): saved with the model's shards, resumed, and exported."""
    launch, env = fsdp_launch(device, "finetune/main.py", "--config", "configs/finetune/demo.yaml",
                              f"data.train={demo_shards['train']}", f"data.val={demo_shards['val']}",
                              f"model.pretrained={mae_encoder}", "model.input_size=[8,32,32]", "data.crop_size=32",
                              "train.batch_size=4", "train.max_steps=4", "train.checkpoint_every=2",
                              "train.ema_decay=0.9", "eval.temporal_views=1", "eval.batch_size=4")
    straight = run([*launch, f"output_dir={tmp_path / 'straight'}"], env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # The same run again from its step-2 checkpoint, into another directory.
    resumed = run([*launch, f"output_dir={tmp_path / 'resumed'}",
                   f"resume={tmp_path / 'straight' / 'checkpoint-00000002'}"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'straight' / 'checkpoint-00000002'} at step 2" in resumed.stdout
    assert_same_checkpoints(tmp_path / "straight" / "checkpoint-00000004",
                            tmp_path / "resumed" / "checkpoint-00000004", RANKS[device])
    saved = whole(tmp_path / "resumed" / "checkpoint-00000004" / "sharded")
    exported = load_file(tmp_path / "resumed" / "encoder.safetensors")  # the EMA, not the trained weights
    assert exported.keys() and all(torch.equal(v, saved[f"task.ema.{k}"]) for k, v in exported.items())
    assert not torch.equal(exported["head.projection.weight"], saved["model.head.projection.weight"])
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed")]
    assert metrics[0]["top1"] == metrics[1]["top1"]  # the resumed run's evaluation agrees with the straight one


def test_fsdp_refuses_cpu_ram_efficient_loading(demo_shards, tmp_path):
    """accelerate's cpu_ram_efficient_loading (on by default under a bare `accelerate launch --use_fsdp`) loads only
    Hugging Face Transformers models; ours would fail inside accelerate's loader (`_infer_parameter_dtype`), so the
    trainer stops first and says what to set."""
    launch, env = fsdp_launch("cpu", "pretrain/main.py", "--config", "configs/pretrain/demo.yaml",
                              f"data.train={demo_shards['train']}", f"output_dir={tmp_path}",
                              options=("--fsdp_cpu_ram_efficient_loading", "true"))
    result = run(launch, env=env)
    assert result.returncode != 0 and "error: FSDP: set fsdp_cpu_ram_efficient_loading: false" in result.stderr
