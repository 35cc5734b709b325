"""Multi-label pieces on hand-made tensors: the multi-hot mixup, the view merge and the mAP; and the feature
export of a multi-label set."""

import json

import numpy as np
import pytest
import torch
from launch import labelled_images
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score

from data import ShardLoader
from engine.average_precision import multi_label_metrics
from engine.config import DataConfig, EvalConfig, load_config
from engine.loaders import eval_sample
from finetune.evaluate import average_views
from finetune.features import chunk_name, export
from finetune.inference import Loaded
from finetune.multi_hot import MultiHotMixup, smooth
from models import IMAGENET


def numbered_images(batch: int, size: int = 16) -> torch.Tensor:
    """[batch, 3, size, size]: image i holds the value i everywhere, so a mixed pixel says whose it is."""
    return torch.arange(batch, dtype=torch.float32)[:, None, None, None].expand(batch, 3, size, size).clone()


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_multi_hot_targets_mix_with_the_images_lambda_and_box(mixup, cutmix):
    batch = 6
    targets = torch.eye(batch)  # row i: class i only, so target[i, j] is the share of image j in row i
    for seed in range(8):
        torch.manual_seed(seed)
        np.random.seed(seed)  # timm draws lambda and the mixup / cutmix choice from numpy
        mixer = MultiHotMixup(mixup, cutmix, label_smoothing=0.0)
        x, mixed = mixer(numbered_images(batch), targets.clone())
        for i in range(batch):
            partner = batch - 1 - i
            if cutmix and not torch.allclose(x[i], x[i].flatten()[0]):  # a box: pixels are i's or the partner's
                own = (x[i] == i).float().mean()
            else:  # blended: every pixel is lam * i + (1 - lam) * partner
                own = (x[i, 0, 0, 0] - partner) / (i - partner) if i != partner else torch.tensor(1.0)
            assert mixed[i, i] == pytest.approx(float(own), abs=1e-5)
            assert mixed[i, partner] == pytest.approx(1 - float(own), abs=1e-5)
            assert mixed[i].sum() == pytest.approx(1.0, abs=1e-5)


def test_multi_hot_smoothing_follows_timm_values():
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    smoothed = smooth(targets, 0.1)
    # 1 - s + s/K where a class is present, s/K where it is not
    torch.testing.assert_close(smoothed, torch.tensor([[0.925, 0.025, 0.925, 0.025], [0.025] * 4]))
    x, mixed = MultiHotMixup(0.0, 1.0, label_smoothing=0.1)(numbered_images(2), targets)
    lam = float((x[0] == 0).float().mean())
    torch.testing.assert_close(mixed[0], smoothed[0] * lam + smoothed[1] * (1 - lam))


def test_views_merge_by_max_and_map_matches_sklearn():
    scores = torch.tensor([[0.1, 0.9, 0.2], [0.4, 0.3, 0.1], [0.8, 0.2, 0.3], [0.6, 0.7, 0.5], [0.5, 0.5, 0.5]])
    index, valid = torch.tensor([7, 7, 3, 3, 5]), torch.tensor([True, True, True, True, False])
    labels = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 0]])
    videos, merged, merged_labels = average_views(scores, index, valid, labels, by_max=True)
    assert videos.tolist() == [3, 7]
    torch.testing.assert_close(merged, torch.tensor([[0.8, 0.7, 0.5], [0.4, 0.9, 0.2]]))
    assert merged_labels.tolist() == [[0, 1, 0], [1, 0, 0]]

    rng = np.random.default_rng(0)
    targets = (rng.random((40, 5)) < 0.3).astype(np.float32)
    targets[:, 3] = 0  # a class without positives: left out, as SlowFast's get_map leaves it out
    probs = rng.random((40, 5)).astype(np.float32)
    metrics = multi_label_metrics(torch.from_numpy(probs), torch.from_numpy(targets))
    kept = [0, 1, 2, 4]
    expected = average_precision_score(targets[:, kept], probs[:, kept], average=None)
    assert metrics["mAP"] == pytest.approx(100 * expected.mean())
    assert metrics["per_class_ap"][3] is None and metrics["classes_scored"] == 4
    assert [metrics["per_class_ap"][k] for k in kept] == pytest.approx(list(100 * expected))


class MeanColour(torch.nn.Module):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def test_feature_export_of_a_multi_label_set_writes_its_multi_hot_rows(tmp_path):
    shards = labelled_images(tmp_path / "set", 10, 0)
    sample = eval_sample(load_config([], ["data.crop_size=32"]), is_image=True, views=(1, 1))
    loader = ShardLoader(shards, sample, 4, shuffle=False, drop_last=False, shard_mix=1)
    expected = torch.cat([batch["label"][batch["valid"]] for batch in loader])
    loaded = Loaded(model=MeanColour(), name="stub", classes=(), data=DataConfig(), evaluation=EvalConfig(),
                    normalization=IMAGENET)
    export(loaded, loader, tmp_path, {"stages": False, "batches_per_chunk": 2}, torch.device("cpu"))
    labels = torch.cat([load_file(tmp_path / chunk_name(c))["labels"] for c in range(2)])
    assert expected.shape == (10, 4) and torch.equal(labels, expected)
    assert json.loads((tmp_path / "info.json").read_text())["multi_label"] is True
