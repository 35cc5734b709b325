"""Shared fixtures: a small real dataset (synthetic mp4 videos -> tar shards), made once per session."""

from pathlib import Path

import pytest
import torch
from launch import write_demo_shards

from engine import checkpoint
from models import create_model

REPO = Path(__file__).resolve().parents[1]
# A tiny video Hiera on 8 x 32 x 32 clips: 4 x 8 x 8 tokens, one mask unit per frame pair.
TINY = dict(input_size=[8, 32, 32], embed_dim=16, num_heads=1, stages=[1, 1, 2, 1])


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> dict[str, Path]:
    """4 videos per class and split, in shards of 4."""
    return write_demo_shards(tmp_path_factory.mktemp("demo"), per_class=4, per_shard=4)


@pytest.fixture(scope="session")
def mae_encoder(tmp_path_factory) -> Path:
    """The tiny Hiera's encoder as an MAE exports it (file + name/overrides metadata), before any training:
    real pretraining is what `make demo` runs; here the fine-tuning has to do all the learning."""
    torch.manual_seed(0)
    mae = create_model("mae_hiera_base_16x224", **TINY, decoder_embed_dim=32, decoder_depth=1, mask_ratio=0.75)
    path = tmp_path_factory.mktemp("pretrain") / "encoder.safetensors"
    checkpoint.export_encoder(path, mae.encoder_state_dict(), checkpoint.encoder_metadata("hiera_base_16x224", TINY))
    return path


# The files that take longest, longest first: `make test` hands whole files to two workers in collection order
# (pytest -n 2 --dist loadfile), and a long file handed out last keeps the other core idle at the end.
LONGEST_FILES = ("test_sharded.py", "test_finetune.py", "test_knn.py", "test_real_bench.py", "test_faults.py",
                 "test_pretrain.py", "test_sweep.py", "test_trackers.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: a file keeps its order
