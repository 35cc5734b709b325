"""tools/gpu_check.sh --device cpu --quick: every section of the GPU check runs (at toy sizes) and reports."""

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_cpu_check_writes_its_report(demo_shards, tmp_path):
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--device", "cpu", "--quick", "--out", str(tmp_path),
                             "--shards", str(demo_shards["train"])], cwd=REPO, capture_output=True, text=True)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert result.returncode == 0, {n: s.get("log_tail") for n, s in sections.items()}
    assert {n: s["status"] for n, s in sections.items()} == dict.fromkeys(
        ["tests", "bench", "pretrain", "memory", "layout"], "ok")
    tests = sections["tests"]
    assert tests["tests"] == tests["skipped"] > 0  # the CUDA tests exist and skip without a GPU
    bench = sections["bench"]["results"]
    assert [r["case"] for r in bench] == ["hiera_base_224"]
    assert {"ours vs official", "ours vs timm", "ours bf16/fp32"} <= set(bench[0]["ratios"])
    pretrain = sections["pretrain"]
    assert [step for step, _ in pretrain["series"]["perf/samples_per_s"]] == [2, 4]
    assert pretrain["steady_mean"]["perf/samples_per_s"] > 0
    assert 0 <= pretrain["steady_mean"]["perf/data_wait_fraction"] <= 1
    (row,) = sections["memory"]["rows"]
    assert 0 < row["checkpointing"] < row["plain"]
    (layout,) = sections["layout"]["rows"]  # the demo's MAE step in both q/k/v layouts
    assert layout["case"] == "mae_hiera_base_16x224" and set(layout["seconds"]) == {"strided", "contiguous"}
    assert layout["contiguous_over_strided"] > 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| `mae_hiera_base_16x224` | 8 | fp32 |" in text and "| `mae_hiera_base_16x224` | 2 |" in text
