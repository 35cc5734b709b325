"""Training checkpoints: one directory per save, written under a temporary name and renamed into place.

    output_dir/checkpoint-00001000/
        model.safetensors      the whole model (for the MAE: encoder + decoder)
        encoder.safetensors    the encoder alone, for fine-tuning; metadata {"model": registered name,
                               "overrides": JSON of the create_model overrides, "mean" / "std": the input
                               normalisation (engine/exported.py)}
        optimizer.pt           optimizer state (tensors and plain containers: torch.load(weights_only=True))
        rng-rank{r}.pt         each rank's torch / numpy / python RNG states (tensors only)
        rank{r}.json           each rank's step and data position with its own failure counters
        sharded/               instead of model.safetensors and optimizer.pt when the model is sharded (FSDP):
                               one safetensors file of model and optimizer shards per rank (engine.sharded)
        task.safetensors       the task's extra state, when it has one (e.g. fine-tuning's EMA weights)
        state.json             step, scheduler, scaler, counters, and the layout (processes, per-device
                               batch, accumulation, repeat) that the data position belongs to
        config.yaml            the resolved config

A crash at any moment leaves either the previous checkpoints or the new one complete, never half a one.
Nothing here unpickles code. The big files are written by a `BackgroundWriter`, from `HostCopies`, while
training goes on.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models import CheckpointError

from .config import ConfigError, RunConfig
from .sharded import saved_keys

SHARDED_DIR = "sharded"
BEST_DIR = "best"  # output_dir/best/encoder.safetensors: the best evaluated model (trainer)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})$")
TEMP_PREFIX = ".tmp-checkpoint-"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def check_output_dir_is_free(cfg: RunConfig) -> None:
    """A run that does not resume must not start in a folder that holds another run's checkpoints or exported
    encoder: it would replace that run's config.yaml at once, and its metrics, checkpoints and export later. The
    apps call this before they write anything. Raises ConfigError naming the folder and the ways on."""
    if cfg.resume:
        return
    root = Path(cfg.output_dir)
    latest = latest_checkpoint(root)
    if latest is None and not (root / "encoder.safetensors").is_file():
        return
    held = f"the checkpoints of an earlier run (the latest: {latest.name})" if latest else \
        "an earlier run's encoder.safetensors"
    if cfg.eval_only:
        way = "evaluate into a new output_dir (eval_only would replace its config.yaml and metrics.json)"
    else:
        way = f"{'continue it with resume=auto, or ' if latest else ''}give a new output_dir"
    raise ConfigError(f"output_dir={root} holds {held}: {way}")


def save_tensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata=metadata)


def capture_rng() -> dict[str, torch.Tensor]:
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([numpy_state[2], numpy_state[3]], dtype=torch.float64),
        "numpy_gauss": torch.tensor([numpy_state[4]], dtype=torch.float64),
        "python": torch.tensor(python_state[1], dtype=torch.int64),
        "python_version": torch.tensor([python_state[0]], dtype=torch.int64),
        **({"cuda": torch.stack(torch.cuda.get_rng_state_all())} if torch.cuda.is_available() else {}),
    }


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(state["numpy_gauss"].item())))
    random.setstate((int(state["python_version"].item()), tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class HostCopies:
    """Host copies of state (nested dicts, lists and tuples of tensors) for a background write to read while training
    goes on changing the originals in place (on a CPU too, hence always a copy). A slot's copy reuses the buffers
    of its previous copy, whose write has ended by then (one write at a time): after the first save a copy costs
    one memory copy, without the page faults of fresh memory (4x faster on this CPU). The buffers stay allocated
    between saves: host memory of the size of what is copied."""

    def __init__(self):
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}  # slot -> {path in the tree: buffer}

    def copy(self, slot: str, tree: Any) -> Any:
        previous, current = self._buffers.get(slot, {}), {}

        def copy_of(node: Any, path: str) -> Any:
            if isinstance(node, torch.Tensor):
                buffer = previous.get(path)
                if buffer is None or buffer.shape != node.shape or buffer.dtype != node.dtype:
                    buffer = torch.empty(node.shape, dtype=node.dtype)
                current[path] = buffer.copy_(node.detach())
                return buffer
            if isinstance(node, dict):
                return {key: copy_of(value, f"{path}/{key}") for key, value in node.items()}
            if isinstance(node, (list, tuple)):
                return type(node)(copy_of(value, f"{path}/{i}") for i, value in enumerate(node))
            return node

        copied = copy_of(tree, "")
        self._buffers[slot] = current
        return copied


class BackgroundWriter:
    """One write at a time on a thread of its own, so that the training thread does not wait while a checkpoint
    reaches the disk. A job must read only what it was handed (`HostCopies`). `start` first waits for
    the previous job; `wait` joins the job and raises what it raised. The thread is not a daemon: a process that
    ends for another reason still finishes the write (the rename makes it all or nothing anyway)."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._failure: Exception | None = None
        self._what = ""

    def start(self, what: str, write: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                write()
            except Exception as err:  # kept for `wait`, which raises it on the training thread
                self._failure = err

        self._what, self._thread = what, threading.Thread(target=run, name=f"write {what}")
        self._thread.start()

    @property
    def failed(self) -> bool:
        """Whether the last job failed (known without waiting once it ended)."""
        return self._failure is not None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise RuntimeError(f"writing {self._what} failed: {type(failure).__name__}: {failure}") from failure

    def close(self) -> None:
        """`wait`, for a run that is stopping with another error: a failed write is printed, not lost behind it."""
        try:
            self.wait()
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)


def begin_save(output_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory for checkpoint `step` (main process)."""
    temp = Path(output_dir) / f"{TEMP_PREFIX}{step:08d}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    return temp


def write_rank_state(temp: Path, rank: int, state: dict[str, Any]) -> None:
    """This rank's RNG states and its plain-JSON `state` (step, data position and counters)."""
    torch.save(capture_rng(), temp / f"rng-rank{rank}.pt")
    (temp / f"rank{rank}.json").write_text(json.dumps(state))


def check_finite(model_state: dict[str, torch.Tensor]) -> None:
    """Refuse to save non-finite weights. Every rank calls it (their weights are equal), so all of them stop
    together instead of the others waiting for the main process at the next barrier. A tensor's norm is finite
    when all its values are, and reads them without writing a mask as large (10x faster); only a tensor whose norm
    is not (which overflow may also cause) has its values checked one by one."""
    suspects = [(k, v) for k, v in model_state.items() if v.is_floating_point() and not torch.linalg.vector_norm(
        v.detach()).isfinite()]
    refuse_nonfinite([k for k, v in suspects if not torch.isfinite(v).all()])


def refuse_nonfinite(bad: list[str]) -> None:
    """Stop before a save when the named weights are not finite."""
    if bad:
        raise FloatingPointError(f"refusing to save non-finite weights ({', '.join(bad[:5])})")


def write_main_state(temp: Path, model_state: dict[str, torch.Tensor] | None,
                     encoder_state: dict[str, torch.Tensor], encoder_metadata: dict[str, str],
                     optimizer_state: dict | None, state: dict[str, Any], config_yaml: str,
                     task_state: dict[str, torch.Tensor] | None = None) -> None:
    """What the main process writes; model and optimizer are None when every rank saved its shards."""
    if model_state is not None:
        save_tensors(temp / "model.safetensors", model_state)
        torch.save(optimizer_state, temp / "optimizer.pt")
    save_tensors(temp / "encoder.safetensors", encoder_state, encoder_metadata)
    if task_state:
        save_tensors(temp / "task.safetensors", task_state)
    (temp / "state.json").write_text(json.dumps(state, indent=2))
    (temp / "config.yaml").write_text(config_yaml)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_save(temp: Path, keep: int) -> Path:
    """Rename the finished temporary directory into place, then prune to the newest `keep`. The files reach
    the disk before the rename, so that after a machine crash the renamed directory never holds empty files."""
    final = temp.parent / temp.name.replace(TEMP_PREFIX, "checkpoint-")
    for path in [*temp.rglob("*"), temp]:
        _fsync(path)
    if final.exists():  # the same step saved again (e.g. the end of a resumed run)
        shutil.rmtree(final)
    temp.rename(final)
    _fsync(temp.parent)
    for old in list_checkpoints(temp.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str | Path, rank: int) -> dict[str, Any]:
    """Everything rank `rank` needs to resume, loaded safely; names the file when something is missing or
    broken (a rank without its own RNG and data files is an error, not a fresh start)."""
    path = Path(path)
    try:
        task_file = path / "task.safetensors"
        sharded = (path / SHARDED_DIR).is_dir()  # read later, by all ranks together (engine.sharded)
        if sharded and not saved_keys(path / SHARDED_DIR):  # a damaged shard file fails here, on its reader
            raise ValueError(f"{path / SHARDED_DIR} holds no tensors")
        return {
            "model": None if sharded else load_file(str(path / "model.safetensors")),
            "optimizer": None if sharded else torch.load(path / "optimizer.pt", map_location="cpu",
                                                         weights_only=True),
            "state": json.loads((path / "state.json").read_text()),
            "rank": json.loads((path / f"rank{rank}.json").read_text()),
            "rng": torch.load(path / f"rng-rank{rank}.pt", weights_only=True),
            "task": load_file(str(task_file)) if task_file.exists() else None,
        }
    except Exception as err:  # safetensors raises its own error type for truncated files
        raise RuntimeError(f"cannot resume from {path}: {type(err).__name__}: {err}") from err


def encoder_metadata(name: str, overrides: dict[str, Any]) -> dict[str, str]:
    return {"model": name, "overrides": json.dumps(overrides)}


def read_encoder_metadata(path: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(registered name, overrides) of an exported encoder file, or None for files without them. Raises
    CheckpointError naming a file that is not safetensors (e.g. cut short by a full disk)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as err:
        raise CheckpointError(f"{path}: unreadable checkpoint (not a safetensors file, or truncated: {err})") from err
    if "model" not in metadata:
        return None
    return metadata["model"], json.loads(metadata.get("overrides", "{}"))


def _replace_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(temp)` fills a temporary file beside `path`, which is flushed to disk, then renamed into place: a
    reader never sees a partial file, and after a crash it is whole or absent."""
    path = Path(path)
    temp = path.with_name(path.name + ".tmp")
    write(temp)
    _fsync(temp)
    temp.replace(path)


def save_atomically(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically (_replace_atomically)."""
    _replace_atomically(path, lambda temp: save_tensors(temp, tensors, metadata))


def copy_atomically(source: str | Path, target: str | Path) -> None:
    """`source` copied to `target` atomically: a reader sees the old file or the new."""
    _replace_atomically(target, lambda temp: shutil.copyfile(source, temp))


def export_encoder(path: str | Path, encoder_state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the encoder alone, atomically."""
    save_atomically(path, encoder_state, metadata)
