"""The ablation ladders (configs/ablation) and the sweep over them (tools/sweep.py)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from launch import image_tree
from PIL import Image

from data.make_shards.folder import folder_inputs
from data.make_shards.writer import shard_inputs
from engine.config import ConfigError, flatten, load_config
from models.mvitv2 import simplification_overrides
from models.registry import get_config
from tools import sweep

REPO = Path(__file__).resolve().parents[1]
ABLATION = REPO / "configs" / "ablation"
LADDERS = ["image_l", "video_l", "image_cpu", "video_cpu", "image_fmnist"]
ROWS = ["baseline", "a", "b", "c", "d", "e", "f"]
# The paper's one change per row (REFERENCE.md §3), as the encoder config fields that must differ from the row
# above; video also swaps the absolute positions for separate space/time tables (a) and drops its cls token (f).
CHANGES = {
    "a": {"rel_pos"}, "b": {"pool_mode"}, "c": {"q_pool_stride1", "kv_pool_stride1"},
    "d": {"kernel_equals_stride"}, "e": {"residual_pooling"}, "f": {"kv_pool", "mask_unit_attn", "head_pool"},
}
VIDEO_CHANGES = {"a": {"sep_pos_embed"}, "f": {"cls_token"}}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded shared machine each op of a 2-thread pool waits for a time slice, which
    makes a tiny model's forward 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ladder_path(name: str) -> Path:
    return ABLATION / f"{name}.ladder.yaml"


def row_configs(name: str) -> dict:
    ladder = sweep.load_ladder(ladder_path(name))
    return {row: load_config([str(sweep.row_config_path(ladder_path(name), ladder, row))], []) for row in ladder.rows}


def encoder_config(cfg):
    name, overrides = sweep.encoder_spec(cfg)
    return get_config(name, **overrides)


@pytest.mark.parametrize("name", LADDERS)
def test_rows_are_the_papers_rows_in_order(name):
    ladder = sweep.load_ladder(ladder_path(name))
    assert list(ladder.rows) == ROWS
    assert [r.mae for r in ladder.rows.values()] == [False] + [True] * 6  # the baseline is the supervised row
    assert all(r.label and r.paper_acc and r.paper_speed for r in ladder.rows.values())


@pytest.mark.parametrize("name", LADDERS)
def test_each_row_changes_exactly_the_papers_switch(name):
    cfgs = row_configs(name)
    video = len(cfgs["baseline"].model.input_size) == 3
    for previous, row in zip(ROWS, ROWS[1:]):
        before, after = encoder_config(cfgs[previous]), encoder_config(cfgs[row])
        differ = {f.name for f in dataclasses.fields(after) if getattr(before, f.name) != getattr(after, f.name)}
        assert differ == CHANGES[row] | (VIDEO_CHANGES.get(row, set()) if video else set()), row
        # Nothing but the model's switches changes between rows (same data, recipe, decoder, size).
        old, new = flatten(cfgs[previous]), flatten(cfgs[row])
        changed_keys = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
        assert all(k.startswith("model.extra.") for k in changed_keys), (row, changed_keys)
        # The cumulative switches are the model's own definition of the row.
        base_name, base_overrides = sweep.encoder_spec(cfgs["baseline"])
        stages = len(encoder_config(cfgs["baseline"]).stages)
        assert after == get_config(base_name, **{**base_overrides, **simplification_overrides(row, video, stages)})


@pytest.mark.parametrize("modality", ["image", "video"])
def test_l_rows_inherit_the_row_above_and_cpu_rows_their_l_row(modality):
    for previous, row in zip(ROWS, ROWS[1:]):
        assert yaml.safe_load((ABLATION / f"{modality}_l" / f"{row}.yaml").read_text())["_base_"] == f"{previous}.yaml"
    for row in ROWS:
        for small in (f"{modality}_cpu", "image_fmnist") if modality == "image" else (f"{modality}_cpu",):
            base = yaml.safe_load((ABLATION / small / f"{row}.yaml").read_text())["_base_"]
            assert base == [f"../{modality}_l/{row}.yaml", "size.yaml"]


def test_l_ladders_are_the_papers_sizes():
    image, video = row_configs("image_l"), row_configs("video_l")
    assert encoder_config(image["baseline"]) == get_config("mvitv2_large", drop_path_rate=0.2)
    assert encoder_config(video["f"]).input_size == (16, 224, 224)
    assert encoder_config(video["baseline"]).stages == encoder_config(image["baseline"]).stages == (2, 6, 36, 4)


# Smaller still than the CPU size, so that a whole ladder sweeps in seconds.
TINY = {"image_cpu": {"model": {"input_size": [64, 64], "extra": {"embed_dim": 16, "stages": [1, 1, 1, 1]}},
                      "data": {"crop_size": 64}},
        "video_cpu": {"model": {"input_size": [4, 64, 64], "extra": {"embed_dim": 16, "stages": [1, 1, 1, 1]}},
                      "data": {"num_frames": 4, "crop_size": 64}}}


def tiny_ladder(name: str, folder: Path) -> Path:
    """A copy of a CPU ladder in `folder` whose rows are the CPU rows at the TINY size."""
    (folder / "rows").mkdir()
    for row in ROWS:
        config = {"_base_": str(ABLATION / name / f"{row}.yaml"), **TINY[name]}
        (folder / "rows" / f"{row}.yaml").write_text(yaml.safe_dump(config))
    path = folder / f"{name}.ladder.yaml"
    path.write_text(yaml.safe_dump({"_base_": str(ladder_path(name)), "configs": "rows"}))
    return path


@pytest.mark.parametrize("name", ["image_cpu", "video_cpu"])
def test_cpu_ladder_sweeps_end_to_end(name, tmp_path):
    out = tmp_path / "out"
    results = sweep.sweep(tiny_ladder(name, tmp_path), out, torch.device("cpu"), batch=1, warmup=1, iters=2)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    rows = on_disk["rows"]
    assert [r["row"] for r in rows] == ROWS
    for r in rows:
        assert r["params"] > 0 and r["gflops"] > 0 and r["gmacs"] == pytest.approx(r["gflops"] / 2)
        assert r["throughput"] > 0 and r["speedup"] > 0 and r["paper_speedup"] > 0 and r["label"]
        assert len(r["seconds_per_batch"]) == 2 and r["spread"] >= 0
        assert r["accuracy"] is None  # not trained: no number is made up
    assert rows[0]["speedup"] == rows[0]["paper_speedup"] == 1.0
    assert rows[-1]["paper_speedup"] == pytest.approx(531.4 / 219.8 if name == "image_cpu" else 40.8 / 20.5)
    settings = on_disk["settings"]
    assert settings["device"] == "cpu" and settings["dtype"] == "fp32" and settings["threads"] >= 1
    assert (settings["batch"], settings["warmup"], settings["iters"]) == (1, 1, 2) and settings["torch"]
    table = (out / "table.md").read_text()
    assert all(r["label"] in table for r in rows) and "rel. speed, paper" in table and "rel. speed, ours" in table
    with Image.open(out / "chart.png") as chart:
        assert chart.format == "PNG" and chart.width > 400 and chart.height > 200


def test_l_baseline_counts_as_published():
    counts = sweep.count(row_configs("image_l")["baseline"], ABLATION / "image_l" / "baseline.yaml")
    assert counts["params"] == pytest.approx(218, rel=0.01) and counts["gmacs"] == pytest.approx(42.1, rel=0.05)


def test_without_timing_still_tables_and_charts(tmp_path):
    """--iters 0: params and FLOPs only; throughput and speedups are null, shown as "–"."""
    rows = sweep.sweep(tiny_ladder("image_cpu", tmp_path), tmp_path / "out", torch.device("cpu"), iters=0)["rows"]
    assert all(r["throughput"] is None and r["speedup"] is None and r["gflops"] > 0 for r in rows)
    assert (tmp_path / "out" / "chart.png").stat().st_size > 0 and "–" in (tmp_path / "out" / "table.md").read_text()


def test_train_commands_pretrain_mae_rows_and_finetune_every_row(tmp_path):
    ladder = sweep.load_ladder(ladder_path("video_cpu"))
    paths = {row: sweep.row_config_path(ladder_path("video_cpu"), ladder, row) for row in ("baseline", "f")}
    recipe = ["--config", str(REPO / "configs" / "finetune" / "k400_mvitv2_large_40x3.yaml"), "train.max_steps=3"]
    [finetune_only] = sweep.train_commands(paths["baseline"], ladder.rows["baseline"], tmp_path, [], recipe)
    assert finetune_only[1] == "finetune/main.py"
    assert finetune_only[-2:] == ["model.pretrained=null", "train.layer_decay=null"]  # from scratch: no layer decay
    pretrain, finetune = sweep.train_commands(paths["f"], ladder.rows["f"], tmp_path, ["train.max_steps=5"], recipe)
    assert pretrain[1:4] == ["pretrain/main.py", "--config", str(paths["f"])] and "train.max_steps=5" in pretrain
    assert f"model.pretrained={tmp_path / 'pretrain' / 'encoder.safetensors'}" in finetune
    # Fine-tuning resolves to the recipe's training with the row's classifier and geometry.
    cfg = load_config([recipe[1]], [a for a in finetune[4:] if "=" in a])
    assert cfg.train.max_steps == 3 and cfg.train.layer_decay == load_config([recipe[1]], []).train.layer_decay
    assert (cfg.data.num_frames, cfg.data.crop_size) == (8, 96)
    assert get_config(cfg.model.name, **sweep.encoder_spec(cfg)[1]) == dataclasses.replace(
        encoder_config(row_configs("video_cpu")["f"]), drop_path_rate=cfg.model.drop_path_rate)


def test_train_measures_each_row_per_seed_with_knn_and_resumes(tmp_path):
    """`--train` for real on shards made here: the Fashion-MNIST row f, shrunk, pretrained with the k-NN monitor
    and fine-tuned, twice (seeds 0 and 1); the rerun reuses both runs."""
    images = image_tree(tmp_path / "images", {"train": 8})
    shards = tmp_path / "shards"
    inputs, classes = folder_inputs(images / "train")
    shard_inputs(inputs, classes, shards, per_shard=16)
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "f.yaml").write_text(yaml.safe_dump(
        {"_base_": str(ABLATION / "image_fmnist" / "f.yaml"), "model": {"extra": {"embed_dim": 16}}}))
    ladder = tmp_path / "one.ladder.yaml"
    ladder.write_text(yaml.safe_dump({"title": "row f, tiny", "configs": "rows", "batch": 2,
                                      "rows": {"f": {"label": "f. Hiera", "paper_acc": 85.6, "paper_speed": 531.4}}}))
    small = f"train.batch_size=8 data.num_workers=0 log.every=1 data.train={shards}"
    args = dict(warmup=0, iters=1, train=True, seeds=2,
                pretrain_args=tuple(f"{small} train.max_steps=2 eval.knn.train={shards} eval.knn.val={shards}".split()),
                finetune_args=("--config", str(REPO / "configs/finetune/fmnist_hiera.yaml"),
                               *f"{small} data.val={shards} train.max_steps=2 eval.batch_size=8".split()))
    results = sweep.sweep(ladder, tmp_path / "out", torch.device("cpu"), **args)
    [row] = results["rows"]
    assert len(row["accuracy_runs"]) == len(row["knn_runs"]) == 2 and row["accuracy_std"] is not None
    assert row["accuracy"] == pytest.approx(sum(row["accuracy_runs"]) / 2) and 0 <= row["knn"] <= 100
    for seed in (0, 1):  # each seed's runs were made with that seed
        assert load_config([str(tmp_path / "out" / "f" / f"seed{seed}" / "pretrain" / "config.yaml")], []).seed == seed
    table = (tmp_path / "out" / "table.md").read_text()
    assert "k-NN, ours" in table and f"{row['accuracy']:.1f} ± {row['accuracy_std']:.1f}" in table
    assert Image.open(tmp_path / "out" / "accuracy.png").width > 400
    log = tmp_path / "out" / "f" / "seed0" / "finetune.log"
    before = log.stat().st_mtime_ns
    assert sweep.sweep(ladder, tmp_path / "out", torch.device("cpu"), **args)["rows"][0]["accuracy_runs"] == \
        row["accuracy_runs"] and log.stat().st_mtime_ns == before  # nothing ran again
    other = {**args, "pretrain_args": (*args["pretrain_args"], "model.mask_ratio=0.9")}
    with pytest.raises(ConfigError, match="train_args.json: this folder's runs were trained with"):
        sweep.sweep(ladder, tmp_path / "out", torch.device("cpu"), **other)  # would mix two recipes in one row
    shutil.rmtree(tmp_path / "out" / "f" / "seed1")  # seed 1 again, and its fine-tuning fails: the report that is
    broken = {**args, "finetune_args": (*args["finetune_args"], "train.max_step=1")}  # left holds seed 0's run
    (tmp_path / "out" / "train_args.json").unlink()  # forget the recipe, so that the broken one may run
    with pytest.raises(RuntimeError, match="failed with exit code 2"):
        sweep.sweep(ladder, tmp_path / "out", torch.device("cpu"), **broken)
    [partial] = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert partial["accuracy_runs"] == row["accuracy_runs"][:1] and partial["accuracy_std"] is None
    assert f"| {row['accuracy_runs'][0]:.1f} (1 of 2 seeds) |" in (tmp_path / "out" / "table.md").read_text()


def test_rows_split_a_ladder_between_sweeps_that_share_the_output(tmp_path, monkeypatch):
    """`rows` trains only those rows; the report also holds the runs that another sweep (here: the result.json
    files it leaves) finished for the other rows, before and while this one runs, and an unknown row is refused
    before anything runs."""
    out = tmp_path / "out"
    done = {("baseline", 0): 81.0, ("baseline", 1): 80.0, ("c", 1): 82.5}
    for (row, seed), top1 in done.items():
        (out / row / f"seed{seed}").mkdir(parents=True)
        (out / row / f"seed{seed}" / "result.json").write_text(json.dumps({"top1": top1, "knn": None}))
    args = dict(iters=0, train=True, seeds=2)  # baseline's seeds are both recorded: nothing trains
    results = sweep.sweep(ladder_path("image_fmnist"), out, torch.device("cpu"), rows=("baseline",), **args)
    rows = {r["row"]: r for r in results["rows"]}
    assert rows["baseline"]["accuracy_runs"] == [81.0, 80.0] and rows["c"]["accuracy_runs"] == [82.5]
    assert all(rows[r]["accuracy"] is None for r in "abdef") and results["settings"]["train"]["rows"] == ["baseline"]
    assert "| 82.5 (1 of 2 seeds) |" in (out / "table.md").read_text()
    def meanwhile(config, row, out_dir, *args):  # this sweep trains a seed while another finishes one of row f
        for done_dir, top1 in ((out_dir, 83.0), (out / "f" / "seed0", 79.5)):  # c's seed 1 is recorded already
            done_dir.mkdir(parents=True, exist_ok=True)
            if not (done_dir / "result.json").exists():
                (done_dir / "result.json").write_text(json.dumps({"top1": top1, "knn": 77.0}))

    monkeypatch.setattr(sweep, "train_row", meanwhile)
    rows = {r["row"]: r for r in sweep.sweep(ladder_path("image_fmnist"), out, torch.device("cpu"), rows=("c",),
                                             **args)["rows"]}
    assert rows["c"]["accuracy_runs"] == [83.0, 82.5] and rows["f"]["accuracy_runs"] == [79.5]
    assert "| 79.5 (1 of 2 seeds) |" in (out / "table.md").read_text()
    with pytest.raises(ConfigError, match="--rows g: .* has the rows baseline, a, b"):
        sweep.sweep(ladder_path("image_fmnist"), tmp_path / "other", torch.device("cpu"), rows=("a", "g"), **args)
    assert not (tmp_path / "other").exists()


def test_train_refuses_without_the_finetuning_app(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "REPO", tmp_path)  # a checkout without finetune/main.py
    with pytest.raises(ConfigError, match="finetune/main.py"):
        sweep.sweep(ladder_path("image_cpu"), tmp_path / "out", torch.device("cpu"), iters=0, train=True)
    assert not (tmp_path / "out" / "results.json").exists()


def test_bad_ladder_exits_with_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.ladder.yaml"
    bad.write_text(f"_base_: {ladder_path('image_cpu')}\nconfigs: {ABLATION / 'image_cpu'}\nbatchsize: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--ladder", str(bad), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "batchsize" in capsys.readouterr().err



def test_a_failed_training_run_stops_the_sweep_with_one_line_naming_its_log(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the fine-tuning app refuses the misspelt key with exit code 2
        sweep.main(["--ladder", str(ladder_path("image_fmnist")), "--out", str(tmp_path / "out"), "--iters", "0",
                    "--warmup", "0", "--train", "--finetune-args", "train.max_step=1"])
    log = tmp_path / "out" / "baseline" / "seed0" / "finetune.log"  # the first row is trained from scratch
    [line] = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1
    assert line.startswith("error: ") and line.endswith(f"failed with exit code 2; see {log}")
    assert "train.max_step" in log.read_text()
