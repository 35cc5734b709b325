"""Encoders, masked autoencoders and checkpoint conversion. Pure nn.Modules: nothing here knows about data,
training or the apps."""

from . import hiera, mae, mvitv2  # noqa: F401  (importing registers the model names)
from .loading import CheckpointError, LoadReport, load_pretrained, read_state_dict
from .registry import (
                       IMAGENET,
                       KINETICS,
                       ModelConfigError,
                       Normalization,
                       create_model,
                       get_config,
                       list_models,
                       normalization,
)

__all__ = ["IMAGENET", "KINETICS", "CheckpointError", "LoadReport", "ModelConfigError", "Normalization", "create_model",
           "get_config", "list_models", "load_pretrained", "normalization", "read_state_dict"]
