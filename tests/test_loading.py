"""load_pretrained: file formats, safety, clear errors, position-embedding resampling, MAE keys."""

import pytest
import torch
from safetensors.torch import save_file

from models import CheckpointError, create_model, load_pretrained


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("hiera_tiny_224", input_size=(64, 64)).eval()


def test_reads_pth_and_safetensors_and_wrappers(tiny, tmp_path):
    state = tiny.state_dict()
    torch.save({"model_state": state}, tmp_path / "official.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, tmp_path / "compiled.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "encoder.safetensors")
    x = torch.randn(1, 3, 64, 64)
    for source in ("official.pth", "ddp.pth", "compiled.pth", "encoder.safetensors", "."):
        fresh = create_model("hiera_tiny_224", input_size=(64, 64)).eval()
        report = load_pretrained(fresh, tmp_path / source)
        assert len(report.loaded) == len(state)
        torch.testing.assert_close(fresh(x), tiny(x), atol=0, rtol=0)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refuses_pickled_code(tmp_path):
    torch.save({"model_state": {"w": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth: refused to load: it references Python code \(print\)"):
        load_pretrained(create_model("hiera_tiny_224", input_size=(64, 64)), tmp_path / "evil.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list.pth: holds a list, not a state dict"):
        load_pretrained(create_model("hiera_tiny_224", input_size=(64, 64)), tmp_path / "list.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth: unreadable"):
        load_pretrained(create_model("hiera_tiny_224", input_size=(64, 64)), tmp_path / "broken.pth")


def test_mismatch_lists_every_problem(tiny):
    state = dict(tiny.state_dict())
    del state["blocks.0.mlp.fc1.bias"]
    state["blocks.0.extra"] = torch.zeros(1)
    other = create_model("hiera_tiny_224", input_size=(64, 64), num_classes=10)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(other, state)
    message = str(err.value)
    assert "missing (1): blocks.0.mlp.fc1.bias" in message
    assert "unexpected (1): blocks.0.extra" in message
    assert "head.projection.weight: checkpoint (1000, 768) vs model (10, 768)" in message
    report = load_pretrained(other, state, strict=False, reinit=("head.",))
    assert report.missing == ["blocks.0.mlp.fc1.bias"] and not report.mismatched


def test_position_embeddings_resampled_to_new_size(tiny):
    bigger = create_model("hiera_tiny_224", input_size=(128, 128))
    load_pretrained(bigger, tiny.state_dict())
    assert bigger.pos_embed.shape == (1, 32 * 32, 96)
    # A smooth field resampled stays smooth: corners of the grid keep their values approximately.
    video = create_model("hiera_base_16x224", input_size=(4, 64, 64))
    longer = create_model("hiera_base_16x224", input_size=(8, 64, 64))
    load_pretrained(longer, video.state_dict())
    assert longer.pos_embed_temporal.shape == (1, 4, 96)


def test_mae_keys_dropped_and_reported(tiny):
    state = dict(tiny.state_dict())
    state["decoder_pred.weight"] = torch.zeros(3, 3)
    state["mask_token"] = torch.zeros(1, 1, 512)
    report = load_pretrained(create_model("hiera_tiny_224", input_size=(64, 64)), state)
    assert sorted(report.dropped) == ["decoder_pred.weight", "mask_token"]
    assert "dropped (2)" in report.summary()
