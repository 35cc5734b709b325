"""Every entry point turns a known error into one line on stderr and exit code 2 (issue 22), as pretrain, finetune
and make_shards do: here finetune.predict, finetune.features and tools/sweep.py, each with a bad input that used to
end in a traceback. MULTISCALE_MAE_TRACEBACK=1 shows the traceback instead."""

import shutil

import pytest
import torch
from launch import image_tree
from safetensors.torch import load_file

from data.errors import TRACEBACK_ENV
from data.make_shards.folder import folder_inputs
from data.make_shards.writer import shard_inputs
from data.synthetic import write_shard_dir
from finetune import features, predict
from finetune import main as finetune_main
from models import CheckpointError
from pretrain import main as pretrain_main
from tools import sweep

LADDER = "configs/ablation/image_cpu.ladder.yaml"


def one_line_error(capsys, main, *argv: str) -> str:
    """The line that `main(argv)` printed on stderr as it exited with code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    inputs, classes = folder_inputs(image_tree(root / "images", {"train": 2}) / "train")
    shard_inputs(inputs, classes, root / "shards", per_shard=6)
    return root / "shards"


def test_predict_names_a_truncated_checkpoint(mae_encoder, tmp_path, capsys, monkeypatch):
    """A safetensors file cut short (a full disk, a copy in progress) raised the library's own error."""
    cut = tmp_path / "encoder.safetensors"
    cut.write_bytes(mae_encoder.read_bytes()[:100])
    line = one_line_error(capsys, predict.main, "--checkpoint", cut, tmp_path / "clip.mp4")
    assert line.startswith(f"error: {cut}: unreadable checkpoint (not a safetensors file, or truncated")
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(CheckpointError):
        predict.main(["--checkpoint", str(cut), str(tmp_path / "clip.mp4")])
    with pytest.raises(SystemExit) as stopped:  # a batch of 0 crashed; views 0 silently meant "the run's"
        predict.main(["--checkpoint", str(cut), "--batch-size", "0", str(tmp_path / "clip.mp4")])
    assert stopped.value.code == 2 and "argument --batch-size: 0 is not at least 1" in capsys.readouterr().err


def test_features_name_a_malformed_run_config_and_an_output_that_is_a_file(mae_encoder, image_shards, tmp_path,
                                                                           capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(mae_encoder, run / "encoder.safetensors")
    (run / "config.yaml").write_text("model:\n  name: [hiera, \n")  # an edit gone wrong
    line = one_line_error(capsys, features.main, "--checkpoint", run, "--data", image_shards, "--out", tmp_path / "f")
    assert line.startswith(f"error: {run / 'config.yaml'}, line 3: not valid YAML: ")
    (run / "config.yaml").unlink()
    (tmp_path / "taken").write_text("")
    line = one_line_error(capsys, features.main, "--checkpoint", run, "--data", image_shards, "--out",
                          tmp_path / "taken", "--num-workers", "0")
    assert line == f"error: [Errno 17] File exists: '{tmp_path / 'taken'}'"


def test_features_stop_on_data_that_fails_to_load(mae_encoder, tmp_path, capsys):
    garbage = write_shard_dir(tmp_path / "shards", [[(f"bad{i}", "png", b"not a png", 0) for i in range(4)]],
                              media="image")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        features.main(["--checkpoint", str(mae_encoder), "--data", str(garbage), "--out", str(tmp_path / "f"),
                       "--num-workers", "0"])
    *progress, line = capsys.readouterr().err.strip().splitlines()  # the last line, after the progress bar's
    assert stopped.value.code == 2 and not any("error" in p for p in progress)
    assert line.startswith("error: 4 of 4 samples failed to load (not one sample loaded)")


def test_features_of_images_from_a_video_encoder_repeat_each_image_over_the_frames(mae_encoder, image_shards,
                                                                                   tmp_path):
    """Image shards given to a video encoder crashed inside the model; they are now cut as finetune.predict cuts
    an image for a video model: the image repeated over the model's frames."""
    assert features.main(["--checkpoint", str(mae_encoder), "--data", str(image_shards), "--out", str(tmp_path),
                          "--num-workers", "0"]) == 0
    chunk = load_file(tmp_path / "features-00000.safetensors")
    assert chunk["features"].shape[0] == 6 and torch.isfinite(chunk["features"]).all()


def test_sweep_names_a_ladder_that_is_not_yaml_and_an_output_that_is_a_file(tmp_path, capsys):
    ladder = tmp_path / "broken.ladder.yaml"
    ladder.write_text("title: x\nrows: [a, b\n")
    line = one_line_error(capsys, sweep.main, "--ladder", ladder, "--out", tmp_path / "out", "--iters", "0")
    assert line.startswith(f"error: {ladder}, line 3: not valid YAML: ")
    (tmp_path / "taken").write_text("")
    line = one_line_error(capsys, sweep.main, "--ladder", LADDER, "--out", tmp_path / "taken", "--iters", "0")
    assert line == f"error: [Errno 17] File exists: '{tmp_path / 'taken'}'"


@pytest.mark.parametrize("main", [pretrain_main.main, finetune_main.main], ids=["pretrain", "finetune"])
def test_a_model_override_that_cannot_be_built_is_one_line(main, image_shards, tmp_path, capsys):
    """A mask unit that the pooling does not tile was the model's ValueError with a traceback."""
    config = "configs/pretrain/demo.yaml" if main is pretrain_main.main else "configs/finetune/demo.yaml"
    line = one_line_error(capsys, main, "--config", config, "model.extra.mask_unit_size=[2,4,4]",
                          f"data.train={image_shards}", f"data.val={image_shards}", f"output_dir={tmp_path / 'run'}")
    assert line.startswith("error: Hiera: mask_unit_size (2, 4, 4) must equal q_stride"), line


def test_fewer_batches_than_accumulation_steps_is_one_line(image_shards, tmp_path, capsys):
    line = one_line_error(capsys, pretrain_main.main, "--config", "configs/pretrain/demo.yaml",
                          "model.input_size=[64,64]", "data.crop_size=64", "model.name=mae_hiera_tiny_224",
                          "model.extra={}",
                          f"data.train={image_shards}", "train.batch_size=2", "train.accum_steps=64",
                          f"output_dir={tmp_path / 'run'}")
    assert line == (f"error: {image_shards}: 6 batches of 2, fewer than train.accum_steps=64: lower "
                    "train.accum_steps or train.batch_size, or add data"), line
