"""How the end-to-end tests start runs: as users do, in subprocesses, one process or two gloo processes."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


def two_gloo_processes(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`accelerate launch` of `script` on two CPU processes that talk through gloo."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]
    return run(command, timeout=timeout, env=env)
