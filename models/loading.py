"""Reading checkpoints safely and loading them into our models, whatever format they come in.

Files are read with safetensors or `torch.load(weights_only=True)`: a checkpoint can never run code.
Each model class converts foreign key names itself (`adapt_state_dict`); this module unwraps containers,
compares against the model and reports (or refuses) every difference.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

# Containers used by the official Hiera / SlowFast / mvit ("model_state"), MAE ("model") and others.
_WRAPPER_KEYS = ("model_state", "model", "state_dict", "module")
_ENCODER_FILE_NAMES = ("encoder.safetensors", "model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # kept at their fresh initialisation
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape"
    dropped: list[str] = field(default_factory=list)  # known not to belong to this model (e.g. MAE decoder)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        for name in ("missing", "unexpected", "mismatched", "dropped"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
                lines.append(f"  {name} ({len(keys)}): {shown}")
        return "\n".join(lines)


def read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """A flat {key: tensor} from a path or a mapping, unwrapped from the usual containers; and its name."""
    if isinstance(source, Mapping):
        return _unwrap(dict(source), "<state dict>"), "<state dict>"
    path = Path(source)
    if path.is_dir():
        found = [path / n for n in _ENCODER_FILE_NAMES if (path / n).is_file()]
        if not found:
            raise CheckpointError(f"{path}: a directory without {' or '.join(_ENCODER_FILE_NAMES)}")
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: it references Python code ({refused.group(1)}), and unpickling it "
                f"would run that code. Re-save its state dict of tensors alone."
            ) from err
        raise CheckpointError(f"{path}: unreadable checkpoint (not a torch or safetensors file, or truncated)") from err
    except Exception as err:  # truncated or foreign files: say which file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    return _unwrap(state, str(path)), str(path)


def _unwrap(state: dict, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{name}: holds a {type(state).__name__}, not a state dict of tensors")
    while not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise CheckpointError(f"{name}: no tensors found (top-level keys: {sorted(state)[:10]})")
        state = dict(inner)
    # DDP wraps a model as `module.`, torch.compile as `_orig_mod.`.
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def load_pretrained(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    strict: bool = True,
    reinit: Sequence[str] = (),
) -> LoadReport:
    """Load weights from `source` (a path or a state dict, in the official, timm or our format) into `model`.

    Keys starting with a prefix in `reinit` (e.g. "head." for a new classifier) keep their fresh
    initialisation. Keys the model knows to be foreign (e.g. an MAE decoder) are dropped and reported.
    With `strict`, any other missing, unexpected or mis-shaped key raises a CheckpointError that lists them.
    """
    state, name = read_state_dict(source)
    if hasattr(model, "adapt_state_dict"):
        try:
            state = model.adapt_state_dict(state)
        except ValueError as err:
            raise CheckpointError(f"{name}: {err}") from err
    own = model.state_dict()
    report = LoadReport(source=name)
    foreign = tuple(getattr(model, "foreign_key_prefixes", ()))
    usable, mismatched_keys = {}, set()
    for key, value in state.items():
        if key.startswith(tuple(reinit)):
            continue
        if key not in own:
            (report.dropped if foreign and key.startswith(foreign) else report.unexpected).append(key)
        elif value.shape != own[key].shape:
            report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            mismatched_keys.add(key)
        else:
            usable[key] = value
    report.missing = [k for k in own
                      if k not in usable and k not in mismatched_keys and not k.startswith(tuple(reinit))]
    report.loaded = sorted(usable)
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}:\n{report.summary()}")
    model.load_state_dict(usable, strict=False)
    return report
