"""How the end-to-end tests start runs: as users do, in subprocesses, one process or two gloo processes."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


def two_gloo_processes(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`accelerate launch` of `script` on two CPU processes that talk through gloo."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]
    return run(command, timeout=timeout, env=env)


def kill_after(command: list[str], marker: Path, **kwargs) -> None:
    """Start `command` and SIGKILL it at a random moment within a second after `marker` appears (mid-step,
    mid-save, ...), with every process it started, as a crashed machine stops: the ranks that `accelerate
    launch` starts (torchrun gives each its own session) would otherwise outlive it and finish the run."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1.0))
    try:
        tree = psutil.Process(process.pid)
        members = [tree, *tree.children(recursive=True)]
    except psutil.NoSuchProcess:  # it finished first
        members = []
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    process.wait()
