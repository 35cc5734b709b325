"""How the end-to-end tests start runs (as users do, in subprocesses, one process or two gloo processes), and the
small data sets they run on."""

import contextlib
import gzip
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from data.make_shards.inputs import Input
from data.make_shards.writer import shard_inputs

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def free_port() -> int:
    """A TCP port nobody listens on now: tests that run side by side (pytest -n) must not share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_launch(processes: int) -> tuple[list[str], dict[str, str]]:
    """(`accelerate launch` options, environment) for `processes` CPU processes (gloo between them, on a port of
    their own); the script and its arguments follow."""
    many = ["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else []
    command = [ACCELERATE, "launch", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", *many]
    return command, dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")


def write_demo_shards(root: Path, per_class: int, per_shard: int) -> dict[str, Path]:
    """{"train": dir, "val": dir}: `per_class` synthetic videos (64x64, 32 frames) of each of the 4 motion classes
    per split, made by the same commands as `make demo`."""
    module = [sys.executable, "-m"]
    subprocess.run([*module, "data.synthetic", "--out", str(root / "raw"), "--per-class", str(per_class), "--size",
                    "64x64", "--frames", "32"], check=True, cwd=REPO, capture_output=True)
    shards = {}
    for split in ("train", "val"):
        shards[split] = root / "shards" / split
        subprocess.run([*module, "data.make_shards", "kinetics", "--csv", str(root / "raw" / f"{split}.csv"),
                        "--videos", str(root / "raw" / "videos"), "--out", str(shards[split]), "--per-shard",
                        str(per_shard)], check=True, cwd=REPO, capture_output=True)
    return shards


def run(command: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


def two_gloo_processes(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`accelerate launch` of `script` on two CPU processes that talk through gloo."""
    launch, env = cpu_launch(2)
    return run([*launch, script, *args], timeout=timeout, env=env)


def signal_after(command: list[str], marker: Path, signals: tuple[signal.Signals, ...] = (signal.SIGKILL,),
                 spare: Callable[[psutil.Process], bool] = lambda process: False, **kwargs) -> int:
    """Start `command` and, at a random moment within a second after `marker` appears (mid-step, mid-save, ...),
    send it `signals` in turn, 0.05 s apart, with every process it started except those `spare` picks: as a
    crashed machine stops (SIGKILL) or SLURM signals a job. The ranks that `accelerate launch` starts (torchrun
    gives each its own session) would otherwise outlive their launcher. Returns the exit code."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1.0))
    try:
        tree = psutil.Process(process.pid)
        members = [*tree.children(recursive=True), tree]  # the ranks first: none steps on after its launcher
    except psutil.NoSuchProcess:
        members = []
    for number in signals:
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                if not spare(member):
                    member.send_signal(number)
        time.sleep(0.05)
    return process.wait(timeout=300)


def kill_after(command: list[str], marker: Path, **kwargs) -> bool:
    """SIGKILL `command` with its processes soon after `marker` appears (signal_after). Returns whether it was
    killed (False: it had finished first, and a resume would test nothing)."""
    return signal_after(command, marker, **kwargs) == -signal.SIGKILL


def image_tree(root: Path, per_class: dict[str, int]) -> Path:
    """train/ and test/ with three classes of shapes at sizes from 20 to 47 px, grey and colour."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c, name in enumerate(("square", "bar", "cross")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                s = int(rng.integers(20, 48))
                pixels = rng.integers(0, 60, (s, s, 3), dtype=np.uint8)
                if c == 0:
                    pixels[s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 220
                if c in (1, 2):
                    pixels[:, s // 2 - 2 : s // 2 + 2] = 220
                if c == 2:
                    pixels[s // 2 - 2 : s // 2 + 2, :] = 220
                image = Image.fromarray(pixels)
                (image.convert("L") if i % 2 else image).save(folder / f"{i}.{'png' if i % 3 else 'jpg'}")
    return root


def write_idx(source: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """The four idx files of Fashion-MNIST (big-endian magic, dimensions, uint8 payload), train and test alike."""
    source.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        with gzip.open(source / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape) + images.tobytes())
        with gzip.open(source / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + labels.tobytes())
    return source


def labelled_images(root: Path, count: int, seed: int, multi_label: bool = True) -> Path:
    """Shards of `count` 32x32 images with 1 to 3 of 4 classes each (or only the first of them, as a class id
    when not `multi_label`); a class brightens its own quarter of the picture."""
    rng = np.random.default_rng(seed)
    inputs = []
    for i in range(count):
        classes = tuple(sorted(rng.choice(4, size=1 + i % 3, replace=False).tolist()))
        pixels = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
        for c in classes:
            pixels[16 * (c // 2): 16 * (c // 2) + 16, 16 * (c % 2): 16 * (c % 2) + 16] += 100
        path = root / "images" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        inputs.append(Input(str(path), classes if multi_label else classes[0], f"image{i}"))
    shard_inputs(inputs, ["a", "b", "c", "d"], root / "shards", per_shard=8)
    return root / "shards"
