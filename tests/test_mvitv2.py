"""Our MViTv2 / MViT against timm (image), the published sizes and costs, the Hiera-paper switches and loading."""

import itertools

import pytest
import timm
import torch
from timm.models.mvitv2 import checkpoint_filter_fn
from torch.utils.flop_counter import FlopCounterMode

from models import CheckpointError, create_model, list_models, load_pretrained
from models.mvitv2 import simplification_overrides

# Published parameter counts (M) and GMACs per view (REFERENCE.md §2; MViTv2 and MViT papers, SlowFast).
PUBLISHED = {
    "mvitv2_large": (218, 42.1),
    "mvitv2_small_16x4": (34.5, 64), "mvitv2_base_32x3": (51.2, 225), "mvitv2_large_40x3": (217.6, 2828),
    "mvit_base_16x4": (36.6, 70.5), "mvit_base_32x3": (36.6, 170),
}
# The papers round T/S/B to whole millions (24 / 35 / 52 M), coarser than 0.5%; the official checkpoints (and
# timm, which loads them) hold the counts below, which ours must equal exactly.
IMAGE_GMACS = {"mvitv2_tiny": 4.7, "mvitv2_small": 7.0, "mvitv2_base": 10.2}

IMAGE, VIDEO = (64, 64), (4, 64, 64)


def tiny(name: str, size, **overrides):
    """A small, fast network of the same family: one block per stage, 16 channels."""
    return create_model(name, input_size=size, stages=(1, 1, 1, 1), embed_dim=16, num_heads=1, num_classes=10,
                        **overrides)


def test_all_names_registered():
    assert set(list_models("mvit*")) == set(PUBLISHED) | set(IMAGE_GMACS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_equal_published(name):
    with torch.device("meta"):
        count = sum(p.numel() for p in create_model(name).parameters()) / 1e6
    assert count == pytest.approx(PUBLISHED[name][0], rel=0.005)


@pytest.mark.parametrize("name", sorted(IMAGE_GMACS))
def test_image_parameter_names_and_shapes_equal_official(name):
    """timm's filter for the official facebookresearch/mvit checkpoints accepts our state dict as one."""
    with torch.device("meta"):
        ours, reference = create_model(name), timm.create_model(name)
    converted = checkpoint_filter_fn({"model_state": ours.state_dict()}, reference)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in reference.state_dict().items()}


def gmacs(model: torch.nn.Module) -> float:
    with torch.device("meta"):
        x = torch.randn(1, 3, *model.config.input_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2e9


@pytest.mark.parametrize("name", sorted(PUBLISHED) + sorted(IMAGE_GMACS))
def test_flops_near_published(name):
    with torch.device("meta"):
        model = create_model(name).eval()
    published = PUBLISHED[name][1] if name in PUBLISHED else IMAGE_GMACS[name]
    assert gmacs(model) == pytest.approx(published, rel=0.05)


@pytest.mark.parametrize("name", ["mvitv2_tiny", "mvitv2_small", "mvitv2_base"])
def test_logits_equal_timm(name):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    ours = create_model(name).eval()
    load_pretrained(ours, reference.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=0)


def test_official_image_checkpoint_round_trip():
    """Our keys are the official ones: timm's converter maps them into timm, which then gives our logits."""
    torch.manual_seed(0)
    ours = create_model("mvitv2_tiny", input_size=(96, 96)).eval()
    reference = timm.create_model("mvitv2_tiny", img_size=96).eval()
    reference.load_state_dict(checkpoint_filter_fn({"model_state": ours.state_dict()}, reference))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=0)


ROWS = ["", "a", "b", "c", "d", "e", "f"]


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("name, size", [("mvitv2_small", IMAGE), ("mvitv2_small_16x4", VIDEO)])
def test_simplification_rows_forward_backward(name, size, row):
    torch.manual_seed(0)
    model = tiny(name, size, **simplification_overrides(row, video=len(size) == 3))
    x = torch.randn(2, 3, *size)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


SWITCHES = list(itertools.product([True, False], ["conv", "max", "avg"], [True, False], [True, False],
                                  [True, False], [True, False]))


@pytest.mark.parametrize("size", [IMAGE, VIDEO], ids=["image", "video"])
def test_every_switch_combination_runs(size):
    video = len(size) == 3
    for rel_pos, pool_mode, stride1, kernel_eq, residual, mask_units in SWITCHES:
        overrides = dict(rel_pos=rel_pos, sep_pos_embed=video and not rel_pos, pool_mode=pool_mode,
                         q_pool_stride1=stride1, kv_pool_stride1=stride1, kernel_equals_stride=kernel_eq,
                         residual_pooling=residual)
        if mask_units:
            overrides.update(kv_pool=False, mask_unit_attn=(True, True, False, False), cls_token=False,
                             head_pool="mean")
        model = tiny("mvitv2_small_16x4" if video else "mvitv2_small", size, **overrides)
        model(torch.randn(1, 3, *size)).sum().backward()


@pytest.mark.parametrize("hiera_name, mvit_name, size", [
    ("hiera_tiny_224", "mvitv2_tiny", IMAGE),
    ("hiera_base_16x224", "mvitv2_base_32x3", VIDEO),
])
def test_row_f_is_hiera(hiera_name, mvit_name, size):
    """Row f of the table with Hiera's sizes has Hiera's keys (the mapping is the identity) and is its function."""
    torch.manual_seed(0)
    hiera = create_model(hiera_name, input_size=size).eval()
    cfg = hiera.config
    mvit = create_model(mvit_name, input_size=size, stages=cfg.stages, embed_dim=cfg.embed_dim,
                        num_heads=cfg.num_heads, num_classes=cfg.num_classes,
                        **simplification_overrides("f", video=len(size) == 3)).eval()
    mvit.load_state_dict(hiera.state_dict())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(mvit.forward_features(x), hiera.forward_features(x), atol=1e-5, rtol=0)
        for got, want in zip(mvit.forward_intermediates(x), hiera.forward_intermediates(x), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_slowfast_video_keys_and_shapes():
    """Key names and shapes as SlowFast's MViT builds them for MVITv2_S_16x4 and MVIT_B_16x4_CONV."""
    with torch.device("meta"):
        v2 = create_model("mvitv2_small_16x4").state_dict()
        v1 = create_model("mvit_base_16x4").state_dict()
    assert v2["cls_token"].shape == (1, 1, 96) and "pos_embed" not in v2
    assert v2["blocks.0.attn.rel_pos_t"].shape == (15, 96)
    assert v2["blocks.0.attn.rel_pos_h"].shape == (111, 96)
    assert v2["blocks.0.attn.pool_q.weight"].shape == (96, 1, 3, 3, 3)
    assert v2["blocks.0.attn.norm_k.weight"].shape == (96,)
    assert v2["blocks.1.proj.weight"].shape == (192, 96)
    assert v2["blocks.1.attn.qkv.weight"].shape == (3 * 192, 96)
    assert v2["head.projection.weight"].shape == (400, 768)
    assert {"pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"} <= set(v1)
    assert not any("rel_pos" in k for k in v1) and "blocks.0.attn.pool_q.weight" not in v1
    assert v1["blocks.0.proj.weight"].shape == (192, 96) and v1["blocks.0.mlp.fc2.weight"].shape == (192, 384)
    assert v1["blocks.15.attn.pool_k.weight"].shape == (96, 1, 3, 3, 3)  # stride-1 KV conv in stage 4


@pytest.mark.parametrize("name", ["mvitv2_small_16x4", "mvit_base_16x4"])
def test_slowfast_checkpoint_formats_load(name, tmp_path):
    """A SlowFast training checkpoint ({"model_state": ...} with other entries), also with separate q/k/v."""
    torch.manual_seed(0)
    source = tiny(name, VIDEO).eval()
    state = source.state_dict()
    separate = {}
    for key, value in state.items():
        if ".attn.qkv." in key:
            for part, chunk in zip("qkv", value.chunk(3)):
                separate[key.replace(".qkv.", f".{part}.")] = chunk
        else:
            separate[key] = value
    x = torch.randn(1, 3, *VIDEO)
    with torch.no_grad():
        expected = source(x)
    for i, weights in enumerate((state, separate)):
        path = tmp_path / f"checkpoint_{i}.pyth"
        torch.save({"model_state": weights, "epoch": 200, "cfg": "MVIT: ..."}, path)
        target = tiny(name, VIDEO).eval()
        report = load_pretrained(target, path)
        assert not report.missing and not report.unexpected
        with torch.no_grad():
            torch.testing.assert_close(target(x), expected)


def test_timm_checkpoint_loads_at_another_input_size():
    """Relative-position tables are resampled to the target model's sizes."""
    reference = timm.create_model("mvitv2_tiny", pretrained=False)
    ours = create_model("mvitv2_tiny", input_size=(96, 96))
    report = load_pretrained(ours, reference.state_dict())
    assert ours.blocks[0].attn.rel_pos_h.shape[0] == 2 * 24 - 1
    assert len(report.loaded) == len(ours.state_dict())


def test_input_size_other_than_configured_runs():
    """Relative positions are interpolated on the fly for an input the model was not built for."""
    model = tiny("mvitv2_small_16x4", VIDEO).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 6, 96, 96)).shape == (1, 10)


def test_wrong_shape_checkpoint_is_a_clear_error():
    state = create_model("mvitv2_small_16x4", input_size=VIDEO).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_pretrained(create_model("mvitv2_base_32x3", input_size=VIDEO), state)
    message = str(err.value)
    assert "missing (" in message and "mismatched (" in message and "checkpoint (192,) vs model (96,)" in message
    with pytest.raises(CheckpointError, match=r"head.projection.weight: checkpoint \(400, 768\) vs model"):
        load_pretrained(create_model("mvitv2_small_16x4", input_size=VIDEO, num_classes=10), state)


def test_invalid_switches_are_refused():
    with pytest.raises(ValueError, match="mask-unit attention"):
        create_model("mvitv2_small_16x4", mask_unit_attn=(True, True, False, False))
    with pytest.raises(ValueError, match="pool_mode"):
        create_model("mvitv2_tiny", pool_mode="lp")


def test_no_weight_decay_names():
    names = create_model("mvit_base_16x4", input_size=VIDEO).no_weight_decay()
    assert {"cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"} <= names
    assert "blocks.0.attn.rel_pos_h" in create_model("mvitv2_tiny", input_size=IMAGE).no_weight_decay()


@pytest.mark.parametrize("row", ["", "f"])
def test_traces_as_one_graph(row):
    model = tiny("mvitv2_small_16x4", VIDEO, **simplification_overrides(row, video=True)).eval()
    explained = torch._dynamo.explain(model)(torch.randn(1, 3, *VIDEO))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_rel_pos_bias_equals_the_definition():
    """The broadcast einsum bias against a loop over (query, key) pairs of REFERENCE.md §2's formula, with a cls
    token, q and k of different sizes, and tables of another length (interpolated)."""
    torch.manual_seed(0)
    attn = tiny("mvitv2_small_16x4", VIDEO).blocks[0].attn
    q_grid, k_grid, hd = (2, 4, 4), (2, 2, 2), attn.head_dim
    q = torch.randn(1, 1, 1 + 32, hd)
    bias = attn.rel_pos_bias(q, q_grid, k_grid)[0, 0]
    tables = [torch.nn.functional.interpolate(getattr(attn, n).detach().T[None], size=2 * max(a, b) - 1,
                                              mode="linear")[0].T
              for n, a, b in zip(attn.rel_pos_names, q_grid, k_grid)]
    want = torch.zeros(33, 9)
    for i, qi in enumerate(itertools.product(*map(range, q_grid))):
        for j, kj in enumerate(itertools.product(*map(range, k_grid))):
            for table, a, b, qa, kb in zip(tables, q_grid, k_grid, qi, kj):
                dist = int(qa * max(b / a, 1) - kb * max(a / b, 1) + (b - 1) * max(a / b, 1))
                want[1 + i, 1 + j] += q[0, 0, 1 + i] @ table[dist]
    torch.testing.assert_close(bias.detach(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [{}, {"cls_token": True, "head_pool": "cls"}], ids=["mean", "cls"])
def test_one_forward_gives_the_features_and_the_pooled_stages(overrides):
    """finetune.features --stages: forward_pooled is forward_features plus each stage averaged (cls left out),
    from one pass instead of two."""
    torch.manual_seed(0)
    model = tiny("mvitv2_tiny", IMAGE, **overrides).eval()
    x = torch.randn(2, 3, *IMAGE)
    with torch.no_grad():
        features, pooled = model.forward_pooled(x)
        assert torch.equal(features, model.forward_features(x))
        for stage, mean in zip(model.forward_intermediates(x), pooled, strict=True):
            torch.testing.assert_close(mean, stage.flatten(1, -2).mean(1))
