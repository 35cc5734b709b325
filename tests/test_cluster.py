"""Running under SLURM: the per-node launch line the scripts build, and a scheduler's signal to a 2-rank run
started through them (docs/cluster.md). SLURM itself does not run here: `scontrol` is a stand-in that prints
the job's host names, as `scontrol show hostnames` does."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from accelerate.commands.launch import launch_command_parser
from launch import REPO, free_port, signal_after

from engine import checkpoint, preemption

NODE_SCRIPT = str(REPO / "tools" / "slurm" / "node.sh")


def slurm_environment(tmp_path: Path, hosts: list[str], node: int, **more: str) -> dict[str, str]:
    """A node's environment inside a SLURM job of len(hosts) nodes, with `scontrol` and `accelerate` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\nprintf '%s\\n' " +
                        " ".join(hosts) + "\n")
    scontrol.chmod(0o755)
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return dict(os.environ, PATH=path, SLURM_NNODES=str(len(hosts)), SLURM_NODEID=str(node), SLURM_JOB_ID="4321",
                SLURM_JOB_NODELIST=f"{hosts[0]}-list", **more)


def test_each_node_launches_with_its_rank_and_the_first_nodes_address(tmp_path):
    lines = []
    for node in (0, 1):
        env = slurm_environment(tmp_path, ["gpu-a7", "gpu-b3"], node, SLURM_GPUS_ON_NODE="8", OUTPUT_DIR="/shared/r",
                                DRY_RUN="1", ACCELERATE_ARGS="--mixed_precision bf16")
        result = subprocess.run([NODE_SCRIPT, "pretrain/main.py", "--config", "configs/pretrain/x.yaml", "seed=3"],
                                capture_output=True, text=True, env=env, check=True)
        lines.append(shlex.split(result.stdout))
    for node, line in enumerate(lines):
        assert line[:2] == ["accelerate", "launch"]
        options = launch_command_parser().parse_args(line[2:])  # what accelerate itself makes of the line
        assert (options.num_machines, options.machine_rank, options.num_processes) == (2, node, 16)
        assert (options.main_process_ip, options.main_process_port) == ("gpu-a7", 24321)
        assert options.multi_gpu and options.mixed_precision == "bf16" and options.rdzv_backend == "static"
        assert options.training_script == "pretrain/main.py"
        assert options.training_script_args == ["--config", "configs/pretrain/x.yaml", "seed=3",
                                                "output_dir=/shared/r", "resume=auto"]


def test_a_signal_to_one_rank_stops_both_at_one_step_with_the_requeue_code(demo_shards, tmp_path):
    """SIGUSR1 reaches the node script, the launcher and rank 1 (and its loader workers), not rank 0: the ranks
    agree at the next logging step, both save that step, and the node script exits with the requeue code."""
    out = tmp_path / "run"
    env = slurm_environment(tmp_path, ["localhost"], 0, GPUS_PER_NODE="2", OUTPUT_DIR=str(out),
                            MAIN_PORT=str(free_port()), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
                            ACCELERATE_ARGS="--mixed_precision no --dynamo_backend no")
    command = [NODE_SCRIPT, "pretrain/main.py", "--config", "configs/pretrain/demo.yaml",
               f"data.train={demo_shards['train']}", "data.num_workers=1", "log.progress=false", "log.every=1",
               "log.visualize_every=0", "train.max_steps=40", "train.checkpoint_every=3", "train.batch_size=8"]

    def is_rank_zero(process: psutil.Process) -> bool:
        return process.environ().get("RANK") == "0"

    code = signal_after(command, out / "checkpoint-00000003", signals=(signal.SIGUSR1,), spare=is_rank_zero, env=env)
    assert code == preemption.REQUEUE_EXIT_CODE
    stopped = json.loads((out / preemption.REQUEUE_MARKER).read_text())
    assert stopped["signal"] == "SIGUSR1" and 3 <= stopped["step"] < 40
    latest = checkpoint.latest_checkpoint(out)
    assert latest.name == stopped["checkpoint"]
    for rank in (0, 1):
        saved = checkpoint.read_checkpoint(latest, rank)
        assert saved["rank"]["step"] == saved["state"]["progress"]["step"] == stopped["step"]
    # The earlier checkpoints stay (the last train.keep_checkpoints of them: with background writes the ranks may
    # pass step 6 before the signal arrives).
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(kept) >= 2 and kept[-1] == latest.name, kept
