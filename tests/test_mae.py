"""Masked autoencoder: equality with the official Hiera MAE, a single compiled graph, targets, reconstructions."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hiera.hiera_mae import MaskedAutoencoderHiera

from models import create_model, load_pretrained
from models.targets import hog_features, patchify, unpatchify


def official_twin(ours):
    reference = MaskedAutoencoderHiera(**dataclasses.asdict(ours.encoder.config),
                                       decoder_num_heads=ours.config.decoder_num_heads)
    return reference


@pytest.mark.parametrize("name, overrides", [
    ("mae_hiera_base_224", {}),
    ("mae_hiera_base_16x224", {"input_size": (8, 128, 128)}),
])
def test_loss_and_predictions_match_official(name, overrides):
    torch.manual_seed(0)
    ours = create_model(name, **overrides)
    reference = official_twin(ours)
    report = load_pretrained(ours, {"model_state": reference.state_dict()})  # official MAE checkpoint layout
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, *ours.encoder.config.input_size)
    mask = reference.get_random_mask(x, ours.mask_ratio)
    with torch.no_grad():
        loss, preds, labels, official_mask = reference(x, mask=mask)
        out = ours(x, mask=mask)
    masked = ~out["token_mask"]
    assert torch.equal(out["mask"], official_mask)
    torch.testing.assert_close(out["loss"], loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["pred"][masked], preds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["target"][masked], labels, rtol=1e-5, atol=1e-6)


def test_parameter_counts_match_published():
    with torch.device("meta"):
        assert sum(p.numel() for p in create_model("mae_hiera_base_224").parameters()) / 1e6 == pytest.approx(
            78.64, abs=0.005)
        assert sum(p.numel() for p in create_model("mae_hiera_base_16x224").parameters()) / 1e6 == pytest.approx(
            79.37, abs=0.005)


def test_mae_checkpoint_into_encoder_drops_decoder():
    mae = official_twin(create_model("mae_hiera_tiny_224", input_size=(64, 64)))
    encoder = create_model("hiera_tiny_224", input_size=(64, 64), num_classes=5)
    report = load_pretrained(encoder, mae.state_dict(), strict=False)
    assert "decoder_pred.weight" in report.dropped and "mask_token" in report.dropped
    assert "encoder_norm.weight" in report.dropped and "multi_scale_fusion_heads.0.weight" in report.dropped
    assert sorted(report.missing) == ["head.projection.bias", "head.projection.weight", "norm.bias", "norm.weight"]
    assert not report.unexpected
    torch.testing.assert_close(encoder.blocks[3].attn.qkv.weight, mae.blocks[3].attn.qkv.weight)


def test_compiles_to_one_graph_forward_and_backward():
    torch.manual_seed(0)
    model = create_model("mae_hiera_tiny_224", input_size=(64, 64), decoder_depth=1)
    x = torch.randn(2, 3, 64, 64)
    keep_idx = model.keep_indices(x)
    # A fresh dynamo cache: after another MAE compiled the same methods, a recompile would switch to dynamic
    # shapes, whose symbolic reasoning takes minutes here.
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    compiled_loss = compiled(x, keep_idx=keep_idx)["loss"]
    compiled_loss.backward()
    compiled_grad = model.encoder.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    eager_loss = model(x, keep_idx=keep_idx)["loss"]
    eager_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, model.encoder.patch_embed.proj.weight.grad)


def test_masks_and_sparsity():
    model = create_model("mae_hiera_tiny_224", input_size=(64, 64), mask_ratio=0.5, decoder_depth=1)
    assert model.num_mask_units == 4 and model.num_keep == 2
    x = torch.randn(3, 3, 64, 64)
    out = model(x)
    assert out["mask"].sum(1).tolist() == [2, 2, 2]
    assert out["token_mask"].shape == (3, 16) and out["token_mask"].sum(1).tolist() == [8, 8, 8]
    with pytest.raises(ValueError, match="must keep exactly 2 of 4 units"):
        model(x, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="keeps no unit"):
        create_model("mae_hiera_tiny_224", input_size=(64, 64), mask_ratio=0.9)
    # The encoder only ever sees kept units: masked pixels cannot change the prediction's input.
    keep_idx = torch.tensor([[0, 3]] * 3)
    changed = x.clone()
    changed[:, :, :32, 32:] = 100.0  # unit 1 is masked
    with torch.no_grad():
        torch.testing.assert_close(model.forward_encoder(x, keep_idx), model.forward_encoder(changed, keep_idx))


@pytest.mark.parametrize("shape, patch, stride", [((2, 3, 32, 48), 16, 1), ((2, 3, 4, 32, 32), 16, 2)])
def test_patchify_roundtrip(shape, patch, stride):
    x = torch.randn(shape)
    rows = patchify(x, patch, stride)
    grid = tuple(s // patch for s in shape[-2:])
    if len(shape) == 5:
        grid = (shape[2] // stride, *grid)
        x = x[:, :, ::stride]
    torch.testing.assert_close(unpatchify(rows, patch, grid, 3), x, rtol=0, atol=0)


def test_reconstruction_views():
    torch.manual_seed(0)
    model = create_model("mae_hiera_tiny_224", input_size=(64, 64), mask_ratio=0.5, decoder_depth=1)
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    perfect = dict(out, pred=out["target"])  # a prediction equal to the norm-pix target
    views = model.reconstruct(x, perfect)
    torch.testing.assert_close(views["reconstruction"], x, atol=1e-4, rtol=0)
    torch.testing.assert_close(views["pasted"], x, atol=1e-4, rtol=0)
    real = model.reconstruct(x, out)
    visible = out["token_mask"].view(2, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    assert torch.equal(real["pasted"] * visible, x * visible)
    assert torch.equal(real["masked"], x * visible)
    assert not torch.allclose(real["reconstruction"], x)


def test_rows_marked_invalid_are_left_out_of_the_loss():
    """Stand-ins for samples that failed to load weigh nothing; a batch of them only gives 0 with (zero)
    gradients, so a data-parallel step still joins the all-reduce."""
    torch.manual_seed(0)
    model = create_model("mae_hiera_tiny_224", input_size=(64, 64), decoder_depth=1)
    x = torch.randn(4, 3, 64, 64)
    mask = model.keep_mask(model.keep_indices(x))
    valid = torch.tensor([True, False, True, False])
    partial = model(x, mask=mask, valid=valid)["loss"]
    assert torch.allclose(partial, model(x[valid], mask=mask[valid])["loss"], rtol=1e-5)
    none = model(x, mask=mask, valid=torch.zeros(4, dtype=torch.bool))["loss"]
    none.backward()
    assert none.item() == 0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_hog_target():
    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1.0  # a vertical edge: horizontal gradient
    hog = hog_features(edge)
    assert hog.shape == (1, 3, 9, 2, 2)
    assert torch.all(hog.argmax(dim=2) == 4)  # orientation pi/2 falls in the middle bin
    torch.testing.assert_close(hog.norm(dim=2), torch.ones(1, 3, 2, 2))
    model = create_model("mae_hiera_tiny_224", input_size=(64, 64), target="hog", mask_ratio=0.5, decoder_depth=1)
    out = model(torch.rand(2, 3, 64, 64))
    assert out["pred"].shape == out["target"].shape == (2, 16, 3 * 9 * 4)
    assert torch.isfinite(out["loss"])


def slowfast_hog(x: torch.Tensor, nbins: int = 9, pool: int = 8, gaussian_window: int = 16) -> torch.Tensor:
    """SlowFast's HOGLayerC.forward (slowfast/models/operators.py, MaskFeat's target), written again here from
    its source: reflect-padded Sobel per channel, magnitude weighted by a tiled Gaussian of std window // 2
    normalised to sum 1, votes into floor(atan2(gx, gy) / pi * nbins) mod nbins, pool x pool sums, L2 over bins."""
    weight_x = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    weight_y = weight_x.transpose(2, 3)
    n = torch.arange(0, gaussian_window).float()
    n = (n - n.mean()) / (gaussian_window // 2)
    g = torch.exp(-0.5 * n**2)
    gkern = torch.outer(g, g) / torch.outer(g, g).sum()
    x = F.pad(x, pad=(1, 1, 1, 1), mode="reflect")
    gx = F.conv2d(x, weight_x, groups=3)
    gy = F.conv2d(x, weight_y, groups=3)
    norm = torch.stack([gx, gy], dim=-1).norm(dim=-1)
    phase = torch.atan2(gx, gy) / math.pi * nbins
    b, c, h, w = norm.shape
    out = torch.zeros((b, c, nbins, h, w))
    norm = norm.view(b, c, 1, h, w) * gkern.repeat([h // gaussian_window, h // gaussian_window])
    out.scatter_add_(2, phase.view(b, c, 1, h, w).floor().long() % nbins, norm)
    out = out.unfold(3, pool, pool).unfold(4, pool, pool).sum(dim=[-1, -2])
    return F.normalize(out, p=2, dim=2)


@pytest.mark.parametrize("size", [32, 64])
def test_hog_matches_slowfasts_layer_with_its_gaussian_window(size):
    torch.manual_seed(0)
    image = torch.rand(2, 3, size, size)
    image[:, :, size // 4 : size // 2] += 1.0  # edges as well as noise
    torch.testing.assert_close(hog_features(image), slowfast_hog(image), rtol=1e-5, atol=1e-6)
    # The window matters: without it, cells whose gradients sit at a window's rim differ.
    assert not torch.allclose(hog_features(image, window=0), slowfast_hog(image), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("target", ["pixel", "hog"])
def test_trains_under_autocast(target, dtype):
    """Mixed precision (train.mixed_precision): decoder tokens in bf16/fp16 meet the fp32 mask token; the
    targets and the loss stay fp32 and agree with the fp32 step."""
    torch.manual_seed(0)
    model = create_model("mae_hiera_tiny_224", input_size=(64, 64), target=target, mask_ratio=0.5, decoder_depth=1)
    x = torch.randn(2, 3, 64, 64)
    keep_idx = model.keep_indices(x)
    reference = model(x, keep_idx=keep_idx)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, keep_idx=keep_idx)
    assert out["loss"].dtype == torch.float32 and out["target"].dtype == torch.float32
    torch.testing.assert_close(out["target"], reference["target"])
    assert out["loss"].item() == pytest.approx(reference["loss"].item(), rel=0.05)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
