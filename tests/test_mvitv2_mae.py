"""MViTv2 as a masked-autoencoder encoder: every simplification row trains, masked pixels never leak into kept
units (separate-and-pad), the leak is real without it, true positions, one compiled graph."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import create_model, list_models, load_pretrained
from models.mvitv2 import simplification_overrides

ROWS = ["", "a", "b", "c", "d", "e", "f"]
IMAGE, VIDEO = (64, 64), (4, 64, 64)  # mask-unit grids 2x2 and 2x2x2
KEEP = {IMAGE: [[0, 1], [1, 2]], VIDEO: [[0, 3, 5, 6], [1, 2, 4, 7]]}  # every kept unit borders a masked one
# A patch embedding that does not overlap unit borders: the leaky control then leaks only through pooling.
DISJOINT_PATCHES = {IMAGE: dict(patch_kernel=(4, 4), patch_padding=(0, 0)),
                    VIDEO: dict(patch_kernel=(2, 4, 4), patch_padding=(0, 0, 0))}
SIZES = pytest.mark.parametrize("size", [IMAGE, VIDEO], ids=["image", "video"])


def tiny_mae(size, row, **overrides):
    """A small MAE of the family: one block per stage, 16 channels, a one-block decoder, half the units kept."""
    name = "mae_mvitv2_small_16x4" if len(size) == 3 else "mae_mvitv2_small"
    return create_model(name, input_size=size, stages=(1, 1, 1, 1), embed_dim=16, num_heads=1, decoder_depth=1,
                        decoder_embed_dim=32, decoder_num_heads=2, mask_ratio=0.5,
                        **simplification_overrides(row, video=len(size) == 3), **overrides)


def kept_outputs(encoder, x, separate_and_pad=True):
    encoder.eval()  # no drop path (the video configs have it)
    keep_idx = torch.tensor(KEEP[tuple(x.shape[2:])])
    with torch.no_grad():
        return encoder.forward_mask_units(x, keep_idx, separate_and_pad=separate_and_pad)


def with_new_pixels(x, in_kept_units: bool):
    """x with fresh noise in the masked units (or in the kept ones), everything else equal."""
    unit_grid = (2,) * (x.dim() - 2)
    keep = torch.zeros(x.shape[0], math.prod(unit_grid)).scatter(1, torch.tensor(KEEP[tuple(x.shape[2:])]), 1.0)
    keep = F.interpolate(keep.view(-1, 1, *unit_grid), size=x.shape[2:]).bool()
    change = keep if in_kept_units else ~keep
    return torch.where(change, torch.randn_like(x), x)


def changed(a, b):
    return [not torch.equal(s, t) for s, t in zip(a, b, strict=True)]


@SIZES
@pytest.mark.parametrize("row", ROWS)
def test_every_row_trains(size, row):
    torch.manual_seed(0)
    model = tiny_mae(size, row)
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert torch.isfinite(out["loss"]) and out["mask"].sum(1).tolist() == [model.num_keep] * 2
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []
    stages = model.encoder.forward_mask_units(x, model.keep_indices(x))
    assert [tuple(s.shape) for s in stages] == [
        (2, model.num_keep, *unit, dim) for unit, dim in zip(model.encoder.stage_unit_shapes, model.encoder.stage_dims)]


@SIZES
@pytest.mark.parametrize("row", ["", "c", "f"])
def test_trains_under_bf16_autocast(size, row):
    torch.manual_seed(0)
    model = tiny_mae(size, row)
    x = torch.randn(2, 3, *size)
    keep_idx = model.keep_indices(x)
    reference = model(x, keep_idx=keep_idx)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, keep_idx=keep_idx)["loss"]
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=0.05)
    loss.backward()


@SIZES
@pytest.mark.parametrize("row", ROWS)
def test_masked_pixels_do_not_reach_kept_units(size, row):
    """Rows up to c need separate-and-pad (kernel > stride); d, e pool within units anyway; f attends within."""
    torch.manual_seed(0)
    encoder = tiny_mae(size, row).encoder
    x = torch.randn(2, 3, *size)
    reference = kept_outputs(encoder, x)
    assert changed(reference, kept_outputs(encoder, with_new_pixels(x, in_kept_units=False))) == [False] * 4
    assert changed(reference, kept_outputs(encoder, with_new_pixels(x, in_kept_units=True))) == [True] * 4


@SIZES
@pytest.mark.parametrize("row, leaks", [("", True), ("a", True), ("b", True), ("c", True), ("d", False),
                                        ("e", False), ("f", False)])
def test_without_separate_and_pad_overlapping_kernels_leak(size, row, leaks):
    """The leaky control (dense, masked units only hidden from attention) with a patch embedding that respects
    unit borders: masked pixels reach kept units exactly in the rows the paper marks * (kernel > stride)."""
    torch.manual_seed(0)
    encoder = tiny_mae(size, row, **DISJOINT_PATCHES[size]).encoder
    x = torch.randn(2, 3, *size)
    dense = kept_outputs(encoder, x, separate_and_pad=False)
    assert any(changed(dense, kept_outputs(encoder, with_new_pixels(x, False), separate_and_pad=False))) == leaks
    assert changed(kept_outputs(encoder, x), kept_outputs(encoder, with_new_pixels(x, False))) == [False] * 4


@SIZES
@pytest.mark.parametrize("row, overrides", [("", dict(kernel_equals_stride=True)), ("d", {}), ("e", {}),
                                            ("f", {})])
def test_sparse_equals_dense_where_kernels_tile_units(size, row, overrides):
    """Where no kernel crosses a unit border, the sparse forward over the kept units equals the dense one with
    masked units hidden from attention: tokens sit at their true positions (the first case has relative
    positions, conv pooling and, for video, a cls token)."""
    torch.manual_seed(0)
    encoder = tiny_mae(size, row, **DISJOINT_PATCHES[size], **overrides).encoder
    x = torch.randn(2, 3, *size)
    for sparse, dense in zip(kept_outputs(encoder, x), kept_outputs(encoder, x, separate_and_pad=False), strict=True):
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


def test_compiles_to_one_graph_forward_and_backward():
    """The heaviest row: relative positions, conv pooling with padding, a cls token, video."""
    torch.manual_seed(0)
    model = tiny_mae(VIDEO, "", drop_path_rate=0.0)
    x = torch.randn(2, 3, *VIDEO)
    keep_idx = model.keep_indices(x)
    # A fresh dynamo cache: after another MAE compiled the same methods, a recompile would switch to dynamic
    # shapes, whose symbolic reasoning takes minutes here.
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    compiled_loss = compiled(x, keep_idx=keep_idx)["loss"]
    compiled_loss.backward()
    compiled_grad = model.encoder.blocks[0].attn.rel_pos_h.grad.clone()
    model.zero_grad()
    eager_loss = model(x, keep_idx=keep_idx)["loss"]
    eager_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, model.encoder.blocks[0].attn.rel_pos_h.grad)


def test_every_name_and_row_builds_at_its_size():
    """Published sizes on the meta device, the rows at L; L 40x3 (312 px) is no whole number of 32-px units: a
    clear error, and it builds at the 16x224 of pretraining."""
    with torch.device("meta"):
        for name in list_models("mae_mvit*"):
            if name == "mae_mvitv2_large_40x3":
                with pytest.raises(ValueError, match="not a whole number of mask units"):
                    create_model(name)
            video = name.endswith(("x3", "x4"))
            rows = {"mae_mvitv2_large": ROWS, "mae_mvitv2_large_40x3": ["", "c", "f"]}.get(name, [""])
            size = {"input_size": (16, 224, 224)} if name == "mae_mvitv2_large_40x3" else {}
            for row in rows:
                model = create_model(name, **size, **simplification_overrides(row, video))
                frames = model.encoder.config.input_size[0] if video else 0
                assert model.num_mask_units == (frames // 2 * 49 if video else 49)
                assert model.encoder.stage_unit_shapes[-1] == ((1, 2, 2) if video else (2, 2))


def test_mae_checkpoint_into_encoder_drops_decoder():
    mae = tiny_mae(IMAGE, "c")
    state = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items()}  # official layout: top level
    encoder = create_model("mvitv2_small", input_size=IMAGE, stages=(1, 1, 1, 1), embed_dim=16, num_heads=1,
                           num_classes=5, **simplification_overrides("c", video=False))
    report = load_pretrained(encoder, state, strict=False)
    assert "decoder_pred.weight" in report.dropped and "multi_scale_fusion_heads.0.weight" in report.dropped
    assert not report.unexpected and sorted(report.missing) == [
        "head.projection.bias", "head.projection.weight", "norm.bias", "norm.weight"]


def test_no_weight_decay_covers_positions_and_cls():
    names = tiny_mae(VIDEO, "").no_weight_decay()
    assert {"encoder.cls_token", "encoder.blocks.0.attn.rel_pos_h", "mask_token", "decoder_pos_embed"} <= names
