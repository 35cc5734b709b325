"""The shard writer on a synthetic Kinetics-layout collection with missing and bad inputs."""

import io
import json
import tarfile

import av
import numpy as np
import pytest
from PIL import Image

from data import make_shards
from data.shards import ShardReader, ShardSet, index_tar
from data.synthetic import (
    CLASSES,
    kinetics_name,
    motion_clip,
    write_corrupt,
    write_kinetics_dataset,
    write_video,
    write_zero_byte,
)

PER_CLASS = 3  # 12 good videos


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    """Synthetic Kinetics train split plus four bad rows and one good clip with audio and an odd size."""
    root = tmp_path_factory.mktemp("k400")
    csv_path = write_kinetics_dataset(root, per_class=PER_CLASS, splits=("train",), num_frames=16)["train"]
    videos = root / "videos"
    good = next(videos.rglob("*.mp4"))
    write_video(videos / "growing" / kinetics_name("odd-audio", 1, 2),
                motion_clip(2, np.random.default_rng(0), 10, 35, 81), audio=True)
    write_zero_byte(videos / "growing" / kinetics_name("zero", 3, 4))
    write_corrupt(videos / "shrinking" / kinetics_name("corrupt", 5, 6), good)
    write_corrupt(videos / "flat-noise_000007_000008.mp4")  # flat layout is found too
    with open(csv_path, "a") as f:
        f.write("growing,odd-audio,1,2,train\ngrowing,zero,3,4,train\nshrinking,corrupt,5,6,train\n"
                "shrinking,flat-noise,7,8,train\nmoving_left,missing,9,10,train\n")
    return csv_path, videos


def shard(argv):
    return make_shards.main([*argv, "--workers", "2"])


def test_kinetics_shards_skip_bad_inputs_with_reasons(kinetics, tmp_path):
    csv_path, videos = kinetics
    info = shard(["kinetics", "--csv", str(csv_path), "--videos", str(videos), "--out", str(tmp_path),
                  "--per-shard", "5"])
    assert info["num_samples"] == 4 * PER_CLASS + 1
    assert info["classes"] == sorted(CLASSES)
    reasons = {r["input"].rsplit("/", 1)[-1].split("_")[0]: r["reason"] for r in info["skipped"]}
    assert set(reasons) == {"zero", "corrupt", "flat-noise", "missing"}
    assert reasons["missing"] == "missing" and "zero-byte" in reasons["zero"]
    assert json.loads((tmp_path / "info.json").read_text()) == info

    shards = ShardSet.load(tmp_path)
    assert shards.counts == tuple(s["num_samples"] for s in info["shards"]) and shards.num_samples == 13
    labels = []
    with ShardReader(shards) as reader:
        for s, count in enumerate(shards.counts):
            for m in range(count):
                key, ext, data, meta = reader.read(s, m)
                assert "." not in key and ext == "mp4" and len(data) > 0
                labels.append(meta["label"])
                if "odd-audio" in key:  # original bytes kept: the audio stream is still there
                    with av.open(io.BytesIO(data)) as container:
                        assert len(container.streams.audio) == 1
    assert sorted(labels) == sorted([i for i in range(4) for _ in range(PER_CLASS)] + [0])


def test_short_side_resize_and_rerun_skips_finished_shards(kinetics, tmp_path):
    csv_path, videos = kinetics
    argv = ["kinetics", "--csv", str(csv_path), "--videos", str(videos), "--out", str(tmp_path),
            "--per-shard", "4", "--short-side", "24"]
    info = shard(argv)
    with ShardReader(ShardSet.load(tmp_path)) as reader:
        _, ext, data, _ = reader.read(0, 0)
    with av.open(io.BytesIO(data)) as container:
        codec = container.streams.video[0].codec_context
        assert ext == "mp4" and min(codec.width, codec.height) == 24

    # Simulate an interruption: one shard never renamed into place, a stale temporary left behind.
    finished = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.tar")}
    (tmp_path / "shard-000001.tar").rename(tmp_path / "shard-000001.tar.tmp")
    (tmp_path / "info.json").unlink()
    again = shard(argv)
    assert again == info
    for name, mtime in finished.items():
        if name != "shard-000001.tar":
            assert (tmp_path / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert not list(tmp_path.glob("*.tmp"))

    with pytest.raises(SystemExit, match="different job"):
        shard([*argv[:-1], "32"])


def test_list_and_folder_commands_with_images(tmp_path):
    root = tmp_path / "images"
    for c in ("cat", "dog"):
        for i in range(3):
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40 + i, 30), (i * 40, 0, 0)).save(root / c / f"img.{i}.png")
    write_zero_byte(root / "dog" / "broken.png")
    info = shard(["folder", "--root", str(root), "--out", str(tmp_path / "f"), "--per-shard", "4",
                  "--short-side", "20"])
    assert info["media"] == "image" and info["classes"] == ["cat", "dog"] and info["num_samples"] == 6
    assert [s["reason"] for s in info["skipped"]] == ["zero-byte input"]
    with tarfile.open(tmp_path / "f" / info["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert all(n.count(".") == 1 for n in names)  # "img.0.png" became a dot-free key
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "json"}

    (tmp_path / "list.txt").write_text("images/cat/img.0.png 0\nimages/dog/img.1.png 1\nnope.png 1\n")
    info = shard(["list", "--list", str(tmp_path / "list.txt"), "--out", str(tmp_path / "l")])
    assert info["num_samples"] == 2 and info["classes"] == ["0", "1"]
    assert info["skipped"][0]["reason"] == "missing"
    assert len(index_tar(tmp_path / "l" / "shard-000000.tar")) == 2 and info["media"] == "image"


def test_head_keeps_the_first_samples_in_shard_order(demo_shards):
    shards = ShardSet.load(demo_shards["train"])  # 4 shards of 4
    cut = shards.head(6)
    assert cut.num_samples == 6 and cut.names == shards.names[:2] and cut.counts == (4, 2)
    assert cut.urls == shards.urls[:2] and cut.classes == shards.classes
    assert shards.head(None) is shards and shards.head(99) is shards
