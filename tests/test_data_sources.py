"""Shards from anywhere: a real HTTP server on loopback and real pipe: commands against local disk, the node
cache, rank blocks over two ranks x two workers, mixed batches, webdataset interop and the index reads."""

import concurrent.futures
import dataclasses
import fcntl
import json
import os
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from webdataset.gopen import gopen_schemes

from data.loader import ShardLoader
from data.plan import EpochPlan
from data.samples import SampleConfig
from data.serve import ShardServer
from data.shards import SampleError, ShardReader, ShardSet, ShardSetError, index_tar, open_raw
from data.sources import FetchError, ShardCache, gopen_s3

SAMPLE = SampleConfig(num_frames=4, sampling_rate=2, crop_size=16, repeats=1)


def epoch(spec, **kwargs):
    return list(ShardLoader(spec, SAMPLE, batch_size=2, seed=5, drop_last=False, **kwargs))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        for name in ("video", "label", "index", "valid"):
            assert torch.equal(x[name], y[name]), name


def keys_of(batches):
    return [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok]


def test_http_pipe_and_brace_list_sources_give_the_batches_of_local_disk(demo_shards, tmp_path):
    local = demo_shards["train"]
    names = ShardSet.load(local).names
    reference = epoch(local)
    with ShardServer(local) as server:
        over_http = epoch(server.url, num_workers=2, cache=ShardCache(str(tmp_path / "a")))
        assert server.tar_requests() == dict.fromkeys(names, 1)  # two workers, one download per shard
        listed = epoch(f"{server.url}/shard-{{000000..{len(names) - 1:06d}}}.tar",
                       cache=ShardCache(str(tmp_path / "b")))
    piped = epoch(f"pipe:cat {local}/{{name}}", cache=ShardCache(str(tmp_path / "c")))
    for other in (over_http, listed, piped):
        assert_same_batches(reference, other)
    assert not list(tmp_path.rglob("*.part-*"))


def test_two_ranks_two_workers_over_http_one_node_and_two_nodes(demo_shards, tmp_path):
    local = demo_shards["train"]
    shards = ShardSet.load(local)
    everything = sorted(keys_of(epoch(local)))

    def loaders(caches):
        return [ShardLoader(server.url, SAMPLE, batch_size=2, rank=r, world_size=2, num_workers=2, seed=5,
                            shard_mix=2, cache=ShardCache(str(c))) for r, c in enumerate(caches)]

    with ShardServer(local) as server:
        one_node = loaders([tmp_path / "node", tmp_path / "node"])
        batches = [list(loader) for loader in one_node]
        assert len(batches[0]) == len(batches[1]) == len(one_node[0])
        assert sorted(keys_of(batches[0] + batches[1])) == everything
        assert server.tar_requests() == dict.fromkeys(shards.names, 1)  # a shared cache: one download each

        two_nodes = loaders([tmp_path / "node0", tmp_path / "node1"])
        for e in range(2):
            fetched, seen = [], []
            for rank, loader in enumerate(two_nodes):
                before = server.tar_requests()
                seen += keys_of(list(loader))
                fetched.append(server.tar_requests() - before)
                plan = EpochPlan(shards.counts, 2, rank, 2, seed=5, epoch=e, shard_mix=2)
                block = {shards.names[s] for s, _ in plan.resolve(plan.start + np.arange(plan.length))}
                assert set(fetched[rank]) <= block and all(n == 1 for n in fetched[rank].values())
            assert not set(fetched[0]) & set(fetched[1]), f"epoch {e}: a shard fetched by both ranks"
            assert sorted(seen) == everything


def test_unreachable_shards_are_skipped_and_counted_naming_the_url(demo_shards, tmp_path):
    shards = ShardSet.load(demo_shards["train"])
    with ShardServer(demo_shards["train"], die_after=2) as server:
        loader = ShardLoader(server.url, SAMPLE, batch_size=2, seed=5, drop_last=False, max_fail_fraction=1.0,
                             cache=ShardCache(str(tmp_path), retries=0))
        failures = [f for b in loader for f in b["failures"]]
        served = set(server.tar_requests())
    lost = [n for n in shards.names if n not in served]
    assert len(served) == 2 and len(failures) == sum(shards.counts[shards.names.index(n)] for n in lost)
    assert {name for name, _, _ in failures} == set(lost)
    assert all(f"{server.url}/{name}: failed after 1 attempts" in reason for name, _, reason in failures)
    assert loader.stats["samples_failed"] == len(failures)


def test_a_shard_that_could_not_be_fetched_is_tried_again_next_epoch(demo_shards, tmp_path):
    """Training workers, and their readers, live for the whole run: an outage must not cost every later epoch."""
    copy = tmp_path / "copy"
    shutil.copytree(demo_shards["train"], copy)
    shards = ShardSet.load(f"pipe:cat {copy}/{{name}}")
    (copy / shards.names[0]).rename(tmp_path / "away.tar")
    with ShardReader(shards, cache=ShardCache(str(tmp_path / "cache"), retries=0)) as reader:
        with pytest.raises(SampleError, match="failed after 1 attempts"):
            reader.read(0, 0)
        (tmp_path / "away.tar").rename(copy / shards.names[0])  # the server is back
        with pytest.raises(SampleError):  # within the epoch the shard stays skipped: no retry per sample
            reader.read(0, 1)
        reader.new_epoch()
        assert reader.read(0, 0)[2]


def test_batches_mix_shards_and_rank_blocks_barely_overlap():
    counts = (10,) * 40
    for rank in range(2):
        plan = EpochPlan(counts, 16, rank, 2, seed=0, epoch=3, shard_mix=8)
        distinct = [len(set(plan.resolve(plan.batch(j).positions)[:, 0].tolist())) for j in range(plan.num_batches)]
        assert min(distinct) >= 8, distinct
    blocks = [{s for s, _ in EpochPlan(counts, 16, r, 3, seed=0, epoch=0).resolve(np.arange(133) + r * 133)}
              for r in range(3)]
    assert len(blocks[0] & blocks[1]) + len(blocks[1] & blocks[2]) <= 2  # only the shards a boundary cuts


def test_a_download_does_not_wait_for_the_shards_other_holders(demo_shards, tmp_path):
    """Another worker holds the shard's shared lock (it looked for the shard, or has it open and sits idle): a
    fetch that must download still finishes. Upgrading the shared lock to an exclusive one waited for every
    holder to close the shard, which an idle DataLoader worker never does (a suite hang)."""
    shards = ShardSet.load(demo_shards["train"])
    cache, url = ShardCache(str(tmp_path / "cache"), retries=0), f"pipe:cat {shards.urls[0]}"
    path, fd = cache.fetch(url, shards.sizes[0])
    cache.release(fd)
    path.unlink()  # as if never downloaded; the other worker holds the lock while it waits or reads
    other = os.open(f"{path}.lock", os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_SH)
    done = concurrent.futures.ThreadPoolExecutor(1).submit(cache.fetch, url, shards.sizes[0])
    try:
        path, fd = done.result(timeout=30)
        assert path.stat().st_size == shards.sizes[0]
        cache.release(fd)
    finally:
        os.close(other)


def test_cache_keeps_open_shards_evicts_least_recent_and_checks_sizes(demo_shards, tmp_path):
    shards = ShardSet.load(demo_shards["train"])
    urls = [f"pipe:cat {u}" for u in shards.urls]
    size = max(shards.sizes)
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=2 * size, retries=0)
    held = [cache.fetch(u, s) for u, s in zip(urls[:3], shards.sizes)]  # three open: over the bound, kept
    assert all(path.is_file() for path, _ in held)
    for _, fd in held:
        cache.release(fd)
    fourth, fd = cache.fetch(urls[3], shards.sizes[3])
    cache.release(fd)
    assert [p.is_file() for p, _ in held] == [False, False, True] and fourth.is_file()

    with pytest.raises(FetchError, match=r"records 5 .*shard-000000.tar|shard-000000.tar.*records 5"):
        ShardCache(str(tmp_path / "other"), retries=0).fetch(urls[0], 5)
    with pytest.raises(FetchError, match="cat: /nowhere/shard-000009.tar: No such file"):  # stderr is quoted
        ShardCache(str(tmp_path / "other"), retries=0).fetch("pipe:cat /nowhere/shard-000009.tar", None)
    assert not [p for p in (tmp_path / "other").iterdir() if not p.name.endswith((".lock", ".download"))]
    assert gopen_schemes["s3"] is gopen_s3  # webdataset itself has no s3:// handler


class CountingOpener:
    """Opens files like the reader's default, logging every read as "pid path offset size"."""

    def __init__(self, log):
        self.log = str(log)

    def __call__(self, path):
        return CountingFile(open_raw(path), path, self.log)


class CountingFile:
    def __init__(self, f, path, log):
        self.f, self.path, self.log = f, path, log

    def read(self, n=-1):
        offset = self.f.tell()
        data = self.f.read(n)
        with open(self.log, "a") as out:
            out.write(f"{os.getpid()} {self.path} {offset} {len(data)}\n")
        return data

    def __getattr__(self, name):  # seek, tell, close, name, mode: the file's own
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def reads_of(log):
    return [(int(pid), path, int(offset), int(size))
            for pid, path, offset, size in (line.split() for line in log.read_text().splitlines())]


@pytest.mark.parametrize("sidecars", [True, False])
def test_indexes_are_read_once_per_shard_per_worker(demo_shards, tmp_path, sidecars):
    """Issue 15: with sidecars, indexing reads each sidecar at most once per worker and no tar header; without,
    one header scan per shard per worker, in reads of at most 512 bytes. Either way each media member of the
    epoch is read once, with its header in the same read, and nothing else is read from the tars."""
    root = shutil.copytree(demo_shards["train"], tmp_path / "shards")
    if not sidecars:
        info = json.loads((root / "info.json").read_text())
        for entry in info["shards"]:
            del entry["index"]
        (root / "info.json").write_text(json.dumps(info))
    log = tmp_path / "reads.log"
    shards = ShardSet.load(root)
    loader = ShardLoader(dataclasses.replace(shards, opener=CountingOpener(log)), SAMPLE, batch_size=2,
                         num_workers=2, shard_mix=2, drop_last=False)
    assert len(keys_of(list(loader))) == shards.num_samples
    reads = reads_of(log)
    members = {str(root / n): {w[0]: (ext, w[1]) for _, files, _ in index_tar(root / n)
                               for ext, w in files.items()} for n in shards.names}
    media_read, label_read, other_tar_reads, sidecar_opens = 0, 0, {}, {}
    for pid, path, offset, size in reads:
        if path.endswith(".tar"):
            ext, member_size = members[path].get(offset, (None, None))
            media, media_size = members[path].get(offset + 512, (None, None))
            if media == "mp4" and size == media_size + 512:  # the member with its header, checked against the index
                media_read += 1
            elif ext == "json" and size == member_size:  # without a sidecar, the label is in the tar
                label_read += 1
            else:
                assert size <= 512 and ext is None, (path, offset, size)
                other_tar_reads[pid, path] = other_tar_reads.get((pid, path), 0) + 1
        else:
            sidecar_opens[pid, path] = sidecar_opens.get((pid, path), 0) + 1  # one read() per open
    assert media_read == shards.num_samples
    if sidecars:
        assert not other_tar_reads and not label_read and max(sidecar_opens.values()) == 1
    else:
        assert not sidecar_opens and label_read == shards.num_samples
        # One scan: per member its 512-byte header and the 1-byte read by which tarfile checks that the data
        # is there, then the end-of-archive block.
        assert all(n <= 2 * len(members[path]) + 1 for (_, path), n in other_tar_reads.items())


def test_a_plain_webdataset_pipeline_reads_our_shards(demo_shards):
    local = demo_shards["train"]
    shards = ShardSet.load(local)
    ours = {k: int(b["label"][i]) for b in epoch(local) for i, k in enumerate(b["key"])}
    theirs = wds.WebDataset(f"{local}/shard-{{000000..{len(shards.names) - 1:06d}}}.tar", shardshuffle=False)
    assert {s["__key__"]: json.loads(s["json"])["label"] for s in theirs} == ours


def test_small_dataset_and_changed_shards_are_named(demo_shards, tmp_path):
    """ShardSetErrors: the apps print them as one line (they were plain ValueErrors, a traceback)."""
    with pytest.raises(ShardSetError, match="16 samples are fewer than one global batch of 16 samples per rank "
                                         "x 2 ranks"):
        ShardLoader(demo_shards["train"], SAMPLE, batch_size=16, world_size=2)
    state = ShardLoader(demo_shards["train"], SAMPLE, batch_size=2).state_dict()
    info = json.loads((demo_shards["train"] / "info.json").read_text())
    info["shards"] = [{**e, "name": str(demo_shards["train"] / e["name"])} for e in info["shards"][1:]]
    (tmp_path / "info.json").write_text(json.dumps(info))  # one shard fewer
    with pytest.raises(ShardSetError, match="another shard list"):
        ShardLoader(tmp_path, SAMPLE, batch_size=2).load_state_dict(state)
