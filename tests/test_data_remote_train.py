"""Pretraining from shards on a web server and from shards another tool wrote, as users run it: real
processes, a real HTTP server on loopback, real webdataset ShardWriter tars."""

import torch
import webdataset as wds
from safetensors.torch import load_file
from test_pretrain import pretrain_command, run

from data import make_shards
from data.loader import ShardLoader
from data.samples import SampleConfig
from data.serve import ShardServer
from data.shards import ShardSet
from engine import checkpoint

# 2 lanes of the 16 one-sample shards: the first batch (8 videos) reads 8 shards, the second the other 8.
ARGS = ("train.max_steps=4", "train.checkpoint_every=1", "model.drop_path_rate=0.2", "log.visualize_every=0",
        "data.shard_mix=2", "data.max_fail_fraction=0", "data.fetch_retries=1")


def test_server_killed_mid_epoch_stops_naming_the_url_and_resume_matches_a_local_run(demo_shards, tmp_path):
    raw = demo_shards["train"].parents[1] / "raw"
    shards = tmp_path / "shards"
    make_shards.main(["kinetics", "--csv", str(raw / "train.csv"), "--videos", str(raw / "videos"),
                      "--out", str(shards), "--per-shard", "1", "--workers", "2"])
    local = run(pretrain_command(shards, tmp_path / "local", *ARGS))
    assert local.returncode == 0, local.stderr[-3000:]

    out, cache = tmp_path / "remote", f"data.cache_dir={tmp_path / 'cache'}"
    with ShardServer(shards, die_after=8) as server:  # dies once the first batch's shards are served
        killed = run(pretrain_command(server.url, out, *ARGS, cache))
    assert killed.returncode != 0
    assert f"{server.url}/shard-" in killed.stderr and "failed after 2 attempts" in killed.stderr
    assert checkpoint.latest_checkpoint(out).name == "checkpoint-00000001"
    # Never half a shard under its real name: a worker terminated mid-download when the run stopped may leave a
    # `.part-<pid>` file, which the next download removes (below, after the resume: none is left).
    sizes = dict(zip(ShardSet.load(shards).names, ShardSet.load(shards).sizes))
    cached = [p for p in (tmp_path / "cache").iterdir() if p.suffix not in (".lock", ".download") and
              ".part-" not in p.name]
    assert cached and all(p.stat().st_size == sizes[p.name.split("-", 1)[1]] for p in cached)

    with ShardServer(shards, port=server.port) as again:
        resumed = run(pretrain_command(again.url, out, *ARGS, cache, "resume=auto"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert sum(again.tar_requests().values()) == 8  # the other 8 were in the cache
    assert not list((tmp_path / "cache").glob("*.part-*"))

    expected = load_file(tmp_path / "local" / "checkpoint-00000004" / "model.safetensors")
    got = load_file(out / "checkpoint-00000004" / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_shard_writer_shards_with_dotted_keys_train_after_indexing(demo_shards, tmp_path):
    videos = sorted((demo_shards["train"].parents[1] / "raw" / "videos").rglob("*.mp4"))
    assert len(videos) == 32  # train and val: 4 shards of 8
    with wds.ShardWriter(str(tmp_path / "part-%03d.tar"), maxcount=8) as sink:
        for i, video in enumerate(videos):  # webdataset cuts "clip3.take.1" at the first dot: key "clip3"
            sink.write({"__key__": f"clip{i}.take.{i % 2}", "mp4": video.read_bytes(), "cls": i % 4})
    make_shards.main(["index", str(tmp_path / "part-{000..003}.tar"), "--out", str(tmp_path / "info.json")])

    loader = ShardLoader(tmp_path, SampleConfig(num_frames=4, sampling_rate=2, crop_size=16), batch_size=4)
    labels = {k: int(b["label"][i]) for b in loader for i, k in enumerate(b["key"])}
    assert labels == {f"clip{i}": i % 4 for i in range(len(videos))} and loader.shards.classes == ("0", "1", "2", "3")
    trained = run(pretrain_command(tmp_path, tmp_path / "run", "train.max_steps=2", "log.visualize_every=0"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "checkpoint-00000002"
