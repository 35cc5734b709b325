"""Model registry: every architecture is a (module class, dataclass config) pair registered under a name, with
the normalisation its inputs take.

`create_model(name, **overrides)` is the one construction path: the overrides replace fields of the
registered config, so a typo in an override is an error that lists the valid fields. `normalization(name)`
gives the per-channel statistics the name's published checkpoints were trained with: ImageNet's for image
models (timm, the Hiera image notebook), Kinetics' 0.45 / 0.225 for video models (SlowFast's defaults, which
its MViT / MViTv2 configs keep; the Hiera video notebook). A checkpoint fed other statistics sees shifted inputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Inputs are (x / 255 - mean) / std per RGB channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
# SlowFast's DATA.MEAN / DATA.STD, also mae_st's and the Hiera video notebook's, which divides the blue channel by
# 0.255: read here as a typo of 0.225, the value of its other two channels and of SlowFast, whose authors Hiera's share.
KINETICS = Normalization((0.45, 0.45, 0.45), (0.225, 0.225, 0.225))


class ModelConfigError(ValueError):
    """A model config that cannot be built (e.g. a mask unit that the pooling does not tile): the user's to fix."""


_REGISTRY: dict[str, tuple[type[nn.Module], Any, Normalization]] = {}
_PREFIX_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, model_cls: type[nn.Module], config: Any, normalization: Normalization = IMAGENET) -> None:
    """Register `model_cls(config)` under `name`; `config` is a dataclass instance, `normalization` the statistics
    the name's published checkpoints take."""
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is already registered")
    _REGISTRY[name] = (model_cls, config, normalization)


def register_prefix(prefix: str, builder: Callable[..., nn.Module]) -> None:
    """Register a family of derived names, e.g. `mae_` + any encoder name.

    `builder(encoder_name, **overrides)` builds the model for `prefix + encoder_name`.
    """
    _PREFIX_BUILDERS[prefix] = builder


def get_config(name: str, **overrides: Any) -> Any:
    """The registered config of `name` with `overrides` applied (validated, not built)."""
    if name not in _REGISTRY:
        raise KeyError(_unknown_name_message(name))
    return replace_config(_REGISTRY[name][1], name, **overrides)


def replace_config(config: Any, name: str, **overrides: Any) -> Any:
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        hints = {k: difflib.get_close_matches(k, fields, n=1) for k in unknown}
        described = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise TypeError(f"unknown override(s) for model {name!r}: {described}; valid: {sorted(fields)}")
    tuple_fields = {f.name for f in dataclasses.fields(config) if isinstance(getattr(config, f.name), tuple)}
    overrides = {k: tuple(v) if k in tuple_fields and isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(config, **overrides)


def model_class(name: str) -> type[nn.Module]:
    if name not in _REGISTRY:
        raise KeyError(_unknown_name_message(name))
    return _REGISTRY[name][0]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model `name`, replacing config fields with `overrides`."""
    if name not in _REGISTRY:
        for prefix, builder in _PREFIX_BUILDERS.items():
            if name.startswith(prefix) and name[len(prefix):] in _REGISTRY:
                return builder(name[len(prefix):], **overrides)
        raise KeyError(_unknown_name_message(name))
    return _REGISTRY[name][0](get_config(name, **overrides))


def normalization(name: str) -> Normalization:
    """The input statistics of `name` (a derived `prefix_` name: its encoder's)."""
    if name in _REGISTRY:
        return _REGISTRY[name][2]
    for prefix in _PREFIX_BUILDERS:
        if name.startswith(prefix) and name[len(prefix):] in _REGISTRY:
            return _REGISTRY[name[len(prefix):]][2]
    raise KeyError(_unknown_name_message(name))


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern (derived `prefix_` names included)."""
    names = list(_REGISTRY) + [p + n for p in _PREFIX_BUILDERS for n in _REGISTRY]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, list_models(), n=3)
    return f"unknown model {name!r}" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
