"""Activation checkpointing (train.activation_checkpointing): the same gradients, blocks recomputed in the
backward pass, less memory, one compiled graph."""

import pytest
import torch
from test_trainer import RegressionTask, config

from engine.trainer import Trainer
from models import create_model
from models.mvitv2 import simplification_overrides
from tools.peak_memory import peak_step_bytes

SIZE = (64, 64)
# Drop path on: checkpointing must replay the same random draws when it recomputes a block.
MODELS = {
    "hiera": ("hiera_tiny_224", dict(input_size=SIZE, num_classes=5, drop_path_rate=0.2)),
    "mvitv2": ("mvitv2_tiny", dict(input_size=SIZE, num_classes=5, drop_path_rate=0.2)),
    "mae_hiera": ("mae_hiera_tiny_224", dict(input_size=SIZE, decoder_depth=2, drop_path_rate=0.2)),
    "mae_mvitv2": ("mae_mvitv2_tiny", dict(input_size=SIZE, decoder_depth=2, drop_path_rate=0.2)),
}


def loss_of(model, x, keep_idx):
    out = model(x) if keep_idx is None else model(x, keep_idx=keep_idx)
    return out.square().mean() if keep_idx is None else out["loss"]


def blocks_of(model):
    encoder = getattr(model, "encoder", model)
    return [*encoder.blocks, *getattr(model, "decoder_blocks", [])]


def count_forwards(modules):
    """A list that gets an entry for every forward of one of `modules` (the recomputation runs no hooks)."""
    calls = []

    def counted(forward):
        def run(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)
        return run

    for m in modules:
        m.forward = counted(m.forward)
    return calls


def gradients(model, x, keep_idx, seed=1):
    """Parameter gradients of one loss, with the RNG (drop path) seeded alike for every call."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss_of(model, x, keep_idx).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", list(MODELS))
def test_gradients_equal_and_blocks_recomputed(kind):
    name, overrides = MODELS[kind]
    torch.manual_seed(0)
    model = create_model(name, **overrides).train()
    x = torch.randn(2, 3, *SIZE)
    keep_idx = model.keep_indices(x) if kind.startswith("mae") else None
    plain = gradients(model, x, keep_idx)
    calls = count_forwards(blocks_of(model))
    model.set_grad_checkpointing()
    checkpointed = gradients(model, x, keep_idx)
    assert len(calls) == 2 * len(blocks_of(model))  # each block ran again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for n, grad in plain.items():
        assert (checkpointed[n] - grad).norm() <= 1e-6 * grad.norm(), n
    # Without gradients (evaluation) there is nothing to recompute: one forward per block.
    calls.clear()
    with torch.no_grad():
        loss_of(model, x, keep_idx)
    assert len(calls) == len(blocks_of(model))


@pytest.mark.parametrize("kind", ["mae_hiera", "mae_mvitv2"])
def test_compiles_to_one_graph_with_checkpointing(kind):
    name, overrides = MODELS[kind]
    torch.manual_seed(0)
    model = create_model(name, **{**overrides, "drop_path_rate": 0.0, "decoder_depth": 1}).train()
    x = torch.randn(2, 3, *SIZE)
    keep_idx = model.keep_indices(x)
    eager = gradients(model, x, keep_idx)
    model.set_grad_checkpointing()
    torch._dynamo.reset()  # a fresh cache, as in test_mae (recompiles would turn to slow dynamic shapes)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    model.zero_grad(set_to_none=True)
    compiled(x, keep_idx=keep_idx)["loss"].backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], msg=n)


@pytest.mark.parametrize("name, overrides", [("mae_hiera_tiny_224", dict(input_size=(128, 128), decoder_depth=2)),
                                             ("mae_mvitv2_tiny", dict(input_size=(128, 128), decoder_depth=2,
                                                                      **simplification_overrides("c", False)))])
def test_peak_memory_of_a_training_step_is_lower(name, overrides):
    model = create_model(name, **overrides).train()
    x = torch.randn(4, 3, 128, 128)
    keep_idx = model.keep_indices(x)
    plain = peak_step_bytes(model, x, keep_idx, bf16=False)
    model.set_grad_checkpointing()
    checkpointed = peak_step_bytes(model, x, keep_idx, bf16=False)
    weights = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # parameters and gradients
    assert checkpointed - weights < 0.6 * (plain - weights)


class CheckpointableLinear(torch.nn.Linear):
    checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        self.checkpointing = enable


def test_config_key_reaches_the_model(tmp_path):
    class Task(RegressionTask):
        def build_model(self, cfg):
            return CheckpointableLinear(1, 1)

    for enabled in (False, True):
        trainer = Trainer(Task(poisoned=set()), config(tmp_path / str(enabled), activation_checkpointing=enabled))
        assert trainer.accelerator.unwrap_model(trainer.model).checkpointing is enabled
