"""The sampling benchmark (tools/sampling_bench.py) at smoke size on Moving Fashion-MNIST clips of idx files
written here: both samplings fine-tune from the same start and are scored on test, plain and shuffled; clips
of another length in the same folder are refused. Accuracy is not checked: that is the benchmark's job."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launch import write_idx

from data.decode import decode_video
from data.fashion_mnist import FashionMnistError
from data.moving_fashion_mnist import write_clips

REPO = Path(__file__).resolve().parents[1]


def test_clip_and_segment_sampling_fine_tune_the_same_clips(tmp_path):
    rng = np.random.default_rng(0)
    source = write_idx(tmp_path / "idx", rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
                       np.arange(40, dtype=np.uint8) % 10)
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "tools.sampling_bench", "--out", str(out), "--frames", "24", "--clips", "20",
               "8", "--quick"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FASHION_MNIST_DIR": str(source)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    clip = json.loads((out / "clips" / "test.json").read_text())[0]
    frames, _ = decode_video((out / "clips" / clip["file"]).read_bytes(), lambda info: np.arange(24) / info.fps)
    assert clip["frames"] == 24 and frames.shape[0] == 24
    results = json.loads((out / "results.json").read_text())
    assert results["frames"] == 24 and results["encoder"] is None
    for sampling in ("clip", "segment"):
        assert set(results[sampling]) == {"top1", "top1_shuffled", "val_top1"}
        assert len(results[sampling]["top1"]["runs"]) == 1
        config = (out / "seed0" / sampling / "config.yaml").read_text()
        assert f"sampling: {sampling}" in config
    assert len([r for r in (out / "table.md").read_text().splitlines() if r.startswith("| ")]) == 1 + 2
    assert results["paths"] == "bounce" and 50 <= results["order_blind_top1"] <= 100
    assert "A model blind to frame order can reach at most" in (out / "table.md").read_text()
    with pytest.raises(FashionMnistError, match=r"clips of \(frames, paths\) \[\(24, 'bounce'\)\], not \(16,"):
        write_clips(out / "clips", {"train": 20})


def test_a_missing_encoder_stops_with_one_line(tmp_path):
    missing = tmp_path / "encoder.safetensors"
    run = subprocess.run([sys.executable, "-m", "tools.sampling_bench", "--out", str(tmp_path / "b"), "--encoder",
                          str(missing)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [f"error: --encoder {missing}: no such file"]
    assert not (tmp_path / "b").exists()  # stopped before writing anything
