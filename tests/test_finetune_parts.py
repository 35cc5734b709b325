"""Fine-tuning pieces against hand-computed cases: multi-view averaging, metrics, shuffled frames, layer-decay
parameter groups, video mixup and the initialisation checks."""

import pytest
import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2

from engine.checkpoint import encoder_metadata, export_encoder
from engine.config import load_config
from finetune.confusion import confusion_picture, confusion_table, picture_tensor
from finetune.evaluate import VideoScores, average_views, classification_metrics, shuffle_frames
from finetune.task import architecture, initialise
from models import CheckpointError, create_model

TINY_VIDEO = dict(input_size=(8, 32, 32), embed_dim=16, num_heads=1, stages=(1, 1, 2, 1), num_classes=3)


def test_average_views_hand_computed():
    # Two videos (positions 7 and 3) with 2 views each, in the order a batch holds them, plus one padding row.
    probs = torch.tensor([[0.6, 0.4], [0.0, 1.0], [0.9, 0.1], [0.5, 0.5], [1.0, 0.0]])
    index = torch.tensor([7, 7, 3, 3, 3])
    valid = torch.tensor([True, True, True, True, False])
    label = torch.tensor([0, 0, 1, 1, 1])
    videos, mean, labels = average_views(probs, index, valid, label)
    assert videos.tolist() == [3, 7]
    torch.testing.assert_close(mean, torch.tensor([[0.7, 0.3], [0.3, 0.7]]))
    assert labels.tolist() == [1, 0]
    # Video 7: views say 0 (0.6) and 1 (1.0): averaged, class 1 wins although view 1 alone would say 0.
    metrics = classification_metrics(mean, labels)
    assert metrics["top1"] == 0.0 and metrics["top5"] == 100.0
    assert metrics["confusion"].tolist() == [[0, 1], [1, 0]]


def test_softmax_scores_are_averaged_not_logits():
    scores = VideoScores.empty()
    logits = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # one confident view, two mild ones
    scores.add(logits, {"index": torch.tensor([0, 0, 0]), "valid": torch.ones(3, dtype=torch.bool),
                        "label": torch.tensor([0, 0, 0])})
    probs, labels = scores.gather(Accelerator(cpu=True), num_classes=2)
    expected = logits.softmax(-1).mean(0, keepdim=True)
    torch.testing.assert_close(probs, expected)
    assert probs.argmax().item() == 0  # mean logits would say class 1
    assert labels.tolist() == [0]


def test_metrics_per_class_top5_and_unlabelled():
    probs = torch.eye(6)[[0, 1, 1, 5, 2]]  # predictions 0, 1, 1, 5, 2
    labels = torch.tensor([0, 1, 2, 3, -1])  # the last video is unlabelled
    metrics = classification_metrics(probs, labels)
    assert metrics["num_videos"] == 4 and metrics["top1"] == 50.0
    assert metrics["per_class"] == [100.0, 100.0, 0.0, 0.0, None, None]
    assert metrics["top5"] == 75.0  # label 3 is ranked last of 6 for the fourth video


def test_shuffled_frames_are_a_fixed_permutation_per_video():
    T = 8
    video = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1, 1).expand(4, 3, T, 2, 2).contiguous()
    index = torch.tensor([5, 5, 9, 9])
    shuffled = shuffle_frames(video, index, seed=0)
    orders = shuffled[:, 0, :, 0, 0].long()
    assert all(sorted(o.tolist()) == list(range(T)) for o in orders)  # a permutation of the frames
    assert torch.equal(orders[0], orders[1]) and torch.equal(orders[2], orders[3])  # same for a video's views
    assert not torch.equal(orders[0], orders[2]) and orders[0].tolist() != list(range(T))
    assert torch.equal(shuffle_frames(video, index, seed=0), shuffled)  # reproducible
    assert torch.equal(shuffled[:, 1], shuffled[:, 0])  # channels and pixels move with their frame


@pytest.mark.parametrize("name, extra", [("hiera_base_16x224", {"embed_dim": 16}),
                                         ("mvitv2_small_16x4", {})])
def test_layer_decay_groups(name, extra):
    model = create_model(name, input_size=(4, 32, 32), stages=(1, 1, 2, 1), num_classes=3, **extra)
    decay, depth = 0.5, 5
    optimizer = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=decay)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for param_name, p in model.named_parameters():
        group = group_of[id(p)]
        if param_name.startswith(("patch_embed", "pos_embed", "cls_token")):
            layer = 0
        elif param_name.startswith("blocks."):
            layer = int(param_name.split(".")[1]) + 1
        else:  # final norm and head
            layer = depth + 1
        assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer)), param_name
        no_decay = p.ndim <= 1 or "pos_embed" in param_name or "rel_pos" in param_name or param_name == "cls_token"
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), param_name
    assert {"head.projection.weight", "norm.weight"} <= {n for n, _ in model.named_parameters()}


def test_initialise_checks_what_stays_fresh(tmp_path):
    torch.manual_seed(0)
    source = create_model("hiera_base_16x224", **{**TINY_VIDEO, "num_classes": 5})
    torch.save({"model_state": source.state_dict()}, tmp_path / "five.pth")
    model = create_model("hiera_base_16x224", **TINY_VIDEO)
    report = initialise(model, str(tmp_path / "five.pth"), need_head=False)
    assert [m.split(":")[0] for m in report.mismatched] == ["head.projection.weight", "head.projection.bias"]
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    with pytest.raises(CheckpointError, match="evaluation needs a fine-tuned classifier"):
        initialise(create_model("hiera_base_16x224", **TINY_VIDEO), str(tmp_path / "five.pth"), need_head=True)
    other = create_model("hiera_base_16x224", **{**TINY_VIDEO, "embed_dim": 32})
    with pytest.raises(CheckpointError, match="blocks.0"):
        initialise(other, str(tmp_path / "five.pth"), need_head=False)


def test_architecture_comes_from_the_export_but_the_input_size_from_this_run(tmp_path):
    saved = {**TINY_VIDEO, "input_size": (4, 32, 32)}
    encoder = create_model("hiera_base_16x224", **saved)
    export_encoder(tmp_path / "encoder.safetensors", encoder.state_dict(), encoder_metadata("hiera_base_16x224", saved))
    cfg = load_config([], ["model.name=mae_hiera_base_16x224", f"model.pretrained={tmp_path}"])
    name, overrides = architecture(cfg, classes=("a", "b"))
    assert name == "hiera_base_16x224" and "input_size" not in overrides
    assert overrides == {"embed_dim": 16, "num_heads": 1, "stages": [1, 1, 2, 1], "num_classes": 2}
    cfg = load_config([], ["model.name=hiera_base_16x224", f"model.pretrained={tmp_path}",
                           "model.input_size=[8,32,32]"])
    assert tuple(architecture(cfg, classes=())[1]["input_size"]) == (8, 32, 32)


def test_confusion_picture_names_the_classes_and_keeps_the_largest():
    confusion = torch.zeros(40, 40, dtype=torch.long)
    confusion[torch.arange(40), torch.arange(40)] = torch.arange(40) + 1  # class i: i + 1 videos, all right
    confusion[39, 0] = 7  # 7 videos of class 39 predicted as class 0, which is not among the largest
    names = [f"class_{i:02d}" for i in range(40)]
    shown, table, other = confusion_table(confusion, names, top=5)
    assert shown == ["class_35", "class_36", "class_37", "class_38", "class_39"] and other
    assert table.shape == (5, 6) and table[:, -1].tolist() == [0, 0, 0, 0, 7]
    assert torch.equal(table.sum(1), confusion[35:].sum(1))  # rows still add up to the class's videos
    few = confusion_table(confusion[:3, :3], names[:3], top=5)
    assert few[0] == names[:3] and torch.equal(few[1], confusion[:3, :3]) and not few[2]

    small = confusion_picture(confusion, names, top=20)
    wide = confusion_picture(confusion, [f"a much longer name for class {i}" for i in range(40)], top=20)
    assert wide.width > small.width and wide.height > small.height  # room for the names on both axes
    assert confusion_picture(confusion, names, top=30).width > small.width  # one column per shown class
    pixels = picture_tensor(small)
    assert pixels.shape == (3, small.height, small.width) and (pixels.mean(0) < 0.4).sum() > 200  # dark text
