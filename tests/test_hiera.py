"""Our Hiera against the official implementation (hiera-transformer) and timm, with shared weights."""

import dataclasses

import hiera as official
import pytest
import timm
import torch
import torch.nn.functional as F

from models import create_model, load_pretrained
from models.hiera import set_qkv_layout, use_qkv_layout

# Published parameter counts (official code, REFERENCE.md §1), in millions.
PUBLISHED_PARAMS_M = {
    "hiera_tiny_224": 27.91, "hiera_small_224": 35.01, "hiera_base_224": 51.52, "hiera_base_plus_224": 69.90,
    "hiera_large_224": 213.74, "hiera_huge_224": 672.78, "hiera_base_16x224": 51.09,
    "hiera_base_plus_16x224": 69.39, "hiera_large_16x224": 213.09, "hiera_huge_16x224": 671.63,
}


def official_twin(ours: torch.nn.Module) -> torch.nn.Module:
    """The official model with the same architecture, holding our weights."""
    reference = official.Hiera(**dataclasses.asdict(ours.config)).eval()
    reference.load_state_dict(ours.state_dict())
    return reference


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_counts_equal_published(name):
    with torch.device("meta"):
        count = sum(p.numel() for p in create_model(name).parameters())
    assert count / 1e6 == pytest.approx(PUBLISHED_PARAMS_M[name], abs=0.005)


@pytest.mark.parametrize("name", ["hiera_tiny_224", "hiera_small_224", "hiera_base_16x224"])
def test_parameter_names_and_shapes_equal_official(name):
    ours = create_model(name)
    reference = getattr(official, name)()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("name, overrides", [
    ("hiera_tiny_224", {}),
    ("hiera_base_224", {}),
    ("hiera_base_16x224", {"input_size": (8, 128, 128)}),
    ("hiera_base_16x224", {"input_size": (4, 64, 64), "q_pool": 2}),
])
def test_logits_and_intermediates_match_official(name, overrides):
    torch.manual_seed(0)
    reference = official.Hiera(**dataclasses.asdict(create_model(name, **overrides).config)).eval()
    ours = create_model(name, **overrides).eval()
    load_pretrained(ours, {"model_state": reference.state_dict()})  # the official checkpoint wrapper
    x = torch.randn(2, 3, *ours.config.input_size)
    with torch.no_grad():
        logits = ours(x)
        expected_probs, expected_stages = reference(x, return_intermediates=True)
        ours_stages = ours.forward_intermediates(x)
    # The official eval head applies softmax; ours returns logits.
    torch.testing.assert_close(logits.softmax(-1), expected_probs, atol=1e-4, rtol=0)
    assert not torch.allclose(logits, logits.softmax(-1))
    assert len(ours_stages) == 4
    for got, want in zip(ours_stages, expected_stages):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, overrides", [
    ("hiera_tiny_224", {}),
    ("hiera_base_16x224", {"input_size": (4, 64, 64), "q_pool": 2}),
])
def test_masked_intermediates_match_official(name, overrides):
    torch.manual_seed(1)
    ours = create_model(name, **overrides).eval()
    reference = official_twin(ours)
    x = torch.randn(2, 3, *ours.config.input_size)
    mask = reference.get_random_mask(x, mask_ratio=0.6)
    with torch.no_grad():
        _, expected = reference(x, mask=mask, return_intermediates=True)
        got = ours.forward_intermediates(x, mask=mask)
    for g, w in zip(got, expected):
        assert g.shape == w.shape  # [B, #kept units, *unit shape, C]
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_timm_checkpoint_loads_and_matches_timm():
    torch.manual_seed(2)
    reference = timm.create_model("hiera_tiny_224", pretrained=False).eval()
    ours = create_model("hiera_tiny_224").eval()
    report = load_pretrained(ours, reference.state_dict())
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=0)


def test_overrides_and_gradients():
    model = create_model("hiera_tiny_224", num_classes=7, drop_path_rate=0.1, head_dropout=0.2,
                         input_size=(128, 128))
    assert model.config.num_classes == 7 and len(model.blocks) == 12
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    x = torch.randn(2, 3, 128, 128, requires_grad=True)
    logits = model.train()(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    assert model.forward_features(x).shape == (2, 768)
    with pytest.raises(TypeError, match="num_clases.*did you mean 'num_classes'"):
        create_model("hiera_tiny_224", num_clases=3)
    with pytest.raises(ValueError, match="divisible by the mask unit"):
        create_model("hiera_base_16x224", input_size=(8, 112, 112))
    with pytest.raises(KeyError, match="did you mean"):
        create_model("hiera_bsae_224")


def test_both_qkv_layouts_give_the_same_loss_and_gradients(monkeypatch):
    """A video MAE step (mask-unit windows, pooled q, global attention, the decoder) in either layout."""
    torch.manual_seed(0)
    model = create_model("mae_hiera_base_16x224", input_size=(8, 32, 32), embed_dim=16, stages=(1, 1, 2, 1),
                         decoder_depth=1, decoder_embed_dim=32, mask_ratio=0.75)
    x = torch.randn(2, 3, 8, 32, 32)
    keep_idx = model.keep_indices(x)
    sdpa, contiguous_keys = F.scaled_dot_product_attention, []

    def recording_sdpa(q, k, v, **kwargs):
        contiguous_keys.append(k.is_contiguous())
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    results = {}
    for layout in ("strided", "contiguous"):
        contiguous_keys.clear()
        model.zero_grad(set_to_none=True)
        with use_qkv_layout(layout):
            loss = model(x, keep_idx=keep_idx)["loss"]
        loss.backward()
        results[layout] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
        # The setting reaches SDPA: k is a view into the qkv projection in one layout, a copy in the other.
        assert all(contiguous_keys) == (layout == "contiguous") and len(contiguous_keys) == 6, contiguous_keys
    (loss_s, grads_s), (loss_c, grads_c) = results["strided"], results["contiguous"]
    torch.testing.assert_close(loss_c, loss_s, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads_c, grads_s):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="use one of auto, strided, contiguous"):
        set_qkv_layout("channels_last")
