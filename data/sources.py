"""Where shards come from, through webdataset's URL machinery, and the node-local cache of remote shards.

A dataset spec (``data.train`` / ``data.val``) is one of:

- a local directory holding ``info.json``, or the path of an ``info.json`` (its shard names are relative to it,
  or absolute paths / URLs, as ``make_shards index`` writes them for shards that live elsewhere);
- an ``http(s)://`` or ``s3://`` base URL (``info.json`` and the shards under it), or the URL of an info.json;
- a ``pipe:`` command template with ``{name}`` standing for a file name:
  ``pipe:aws s3 cp s3://bucket/k400/{name} -`` (``info.json`` comes through the same command);
- a brace-expanded shard list as webdataset users write them (``shards/train-{000000..000999}.tar``,
  ``https://host/k400/train-{000..099}.tar``, ``pipe:cat /data/train-{0..9}.tar``, several joined by ``::``):
  the listed shards, with ``info.json`` read from beside the first one.

Remote URLs are opened with ``webdataset.gopen.gopen`` (curl for http(s), a shell for ``pipe:``; ``s3://`` is
registered here, through the aws CLI) and expanded with ``webdataset.shardlists.expand_urls``. A remote shard is
downloaded whole into the cache on first touch (``ShardCache.fetch``): local files are read in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

from webdataset.gopen import Pipe, gopen, gopen_schemes
from webdataset.shardlists import expand_urls

INFO_NAME = "info.json"
# A shard's file name inside a URL or a pipe command: the last path component ending in .tar (.tgz, .tar.gz).
_SHARD_NAME = re.compile(r"([^/\s'\"]+\.(?:tar|tgz|tar\.gz))(?=$|[\s'\"])")
# curl's exit codes that a failed shard download usually ends with (curl runs with -s: it prints nothing).
_CURL_EXITS = {6: "could not resolve the host", 7: "could not connect to the server", 18: "partial transfer",
               22: "HTTP error (4xx/5xx)", 28: "timed out", 35: "TLS handshake failed", 52: "empty reply",
               56: "connection reset"}


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192):
    """``s3://bucket/key`` through the aws CLI, as webdataset's own handlers use their command-line tools."""
    if mode[0] != "r":
        raise ValueError(f"{url}: s3:// is read-only here")
    return Pipe(["aws", "s3", "cp", "--only-show-errors", url, "-"], mode=mode, bufsize=bufsize,
                          ignore_status=[141])


gopen_schemes.setdefault("s3", gopen_s3)


_STDERR_LOCK = threading.Lock()


class FetchError(OSError):
    """A remote file could not be read after its retries; the message names the URL and the command's stderr."""


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or urlparse(url).scheme not in ("", "file")


def local_path(url: str) -> Path:
    return Path(urlparse(url).path) if url.startswith("file:") else Path(url)


def _is_absolute(name: str) -> bool:
    return name.startswith("/") or is_remote(name) or name.startswith("file:")


def shard_name(url: str) -> str:
    """The shard's file name in a path, URL or pipe command (``pipe:cat /d/a-0.tar`` -> ``a-0.tar``)."""
    if url.startswith("pipe:"):
        found = _SHARD_NAME.findall(url)
        if not found:
            raise ValueError(f"{url}: no shard file name (*.tar) in the command")
        return found[-1]
    return urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Source:
    """Where a dataset's ``info.json`` is and how a shard name in it becomes a URL.

    ``selected``: the shard URLs of a brace-expanded list (in its order), or None for every shard of info.json.
    """

    spec: str
    info_url: str
    template: str  # "{name}" -> a file's URL (for a list spec: beside its first shard)
    selected: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, spec: str | Path) -> Source:
        spec = str(spec)
        if "{name}" in spec:
            return cls(spec, spec.replace("{name}", INFO_NAME), spec)
        urls = expand_urls(spec)
        if len(urls) > 1 or _SHARD_NAME.search(urls[0]):
            first = urls[0]
            name = shard_name(first)
            cut = first.rfind(name)
            template = first[:cut] + "{name}" + first[cut + len(name):]
            return cls(spec, template.replace("{name}", INFO_NAME), template, tuple(urls))
        if spec.endswith(".json"):
            base = spec.rsplit("/", 1)[0] if "/" in spec else "."
            return cls(spec, spec, f"{base}/{{name}}")
        base = spec.rstrip("/") or "/"
        return cls(spec, f"{base}/{INFO_NAME}", f"{base}/{{name}}")

    def url(self, name: str) -> str:
        """The URL of a file named in info.json (absolute names are kept)."""
        return name if _is_absolute(name) else self.template.replace("{name}", name)


def read_url(url: str, retries: int = 0) -> bytes:
    """The whole content of a local file or a URL (small files: info.json, sidecar indexes)."""
    if not is_remote(url):
        return local_path(url).read_bytes()
    return _with_retries(url, retries, lambda err: _read_remote(url, err))


def _read_remote(url: str, stderr) -> bytes:
    chunks = []
    with _gopen_capturing_stderr(url, stderr) as stream:
        while chunk := stream.read(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


def _gopen_capturing_stderr(url: str, stderr):
    """gopen(url) whose command (curl, aws, the pipe) writes its stderr into the file ``stderr``.

    webdataset's Pipe lets the child inherit this process's stderr; pointing fd 2 at the file only while the
    child is spawned gives it that file and leaves this process's own stderr as it was.
    """
    with _STDERR_LOCK:  # fd 2 is the process's: threads (prefetching) take turns
        saved = os.dup(2)
        try:
            os.dup2(stderr.fileno(), 2)
            return gopen(url, "rb")
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this node still runs (the cache is node-local)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _with_retries(url: str, retries: int, attempt, backoff: float = 1.0):
    """``attempt(stderr_file)`` up to ``retries + 1`` times, sleeping backoff x 1, 2, 4, ... s in between."""
    for n in range(retries + 1):
        with tempfile.TemporaryFile() as stderr:
            try:
                return attempt(stderr)
            except (OSError, ValueError) as err:
                stderr.seek(0)
                said = stderr.read().decode(errors="replace").strip()[-2000:]
                last = f"{_explain(err)}; stderr: {said or '(empty)'}"
        if n < retries:
            time.sleep(backoff * 2**n)
    raise FetchError(f"{url}: failed after {retries + 1} attempts: {last}")


def _explain(err: Exception) -> str:
    match = re.search(r"exit (\d+)", str(err))
    if match and "curl" in str(err) and int(match.group(1)) in _CURL_EXITS:
        return f"curl exit {match.group(1)} ({_CURL_EXITS[int(match.group(1))]})"
    return f"{type(err).__name__}: {err}"


@dataclass(frozen=True)
class ShardCache:
    """A directory of whole remote shards shared by the processes of one node.

    Files are ``<sha1(url)[:16]>-<shard name>``, with two lock files. A process holds a shared lock on
    ``<that>.lock`` from before it looks for the shard until it closes it, and eviction (least recently used
    first, by mtime, until the cache fits ``max_bytes``; 0 = no bound) takes that lock exclusively without
    waiting, so it only removes shards that nobody holds. The download itself is serialised by an exclusive
    lock on ``<that>.download``, so the workers of a node download each shard once; the others wait for that
    lock alone. (Upgrading the shared lock to an exclusive one instead deadlocked: a waiter then waits for
    every other holder to close the shard, and a worker idle with the shard open never does.) A download goes
    to a temporary name and is renamed into place once its size matches the size recorded in info.json, so a
    killed run never leaves half a shard under the real name.
    """

    root: str = ""  # "": a folder in the system's temp dir (node-local)
    max_bytes: int = 0
    retries: int = 3
    backoff: float = 1.0  # seconds before the first retry; doubled each time

    @property
    def path(self) -> Path:
        return Path(self.root) if self.root else Path(tempfile.gettempdir()) / "multiscale-mae-shards"

    def fetch(self, url: str, size: int | None) -> tuple[Path, int]:
        """(local path, lock fd) of the shard at ``url``, downloaded first if missing. The caller holds the
        shared lock until it closes the shard: ``release(fd)``."""
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{shard_name(url)}"
        fd = os.open(f"{target}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not self._complete(target, size):
                with open(f"{target}.download", "a") as download:  # released when closed
                    fcntl.flock(download, fcntl.LOCK_EX)
                    if not self._complete(target, size):  # someone else may have finished it meanwhile
                        self._download(url, target, size)
            os.utime(target)  # recently used: evicted last
        except BaseException:
            os.close(fd)
            raise
        return target, fd

    def check_room(self, largest: int | None, open_per_rank: int) -> None:
        """Warn when the size bound cannot hold what this node's ranks (``LOCAL_WORLD_SIZE``) may hold open at
        once (``open_per_rank`` shards of up to ``largest`` bytes): open shards are never evicted, so the cache
        would then grow past its bound."""
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if self.max_bytes and largest and ranks * open_per_rank * largest > self.max_bytes:
            warnings.warn(f"the shard cache bound ({self.max_bytes / 2**30:.2f} GiB) is below what {ranks} rank(s) "
                          f"may hold open ({open_per_rank} shards of up to {largest / 2**30:.2f} GiB each): it will "
                          f"grow past it; raise data.cache_gb or lower data.shard_mix", stacklevel=2)

    def prefetch(self, url: str, size: int | None) -> None:
        """Download ``url`` into the cache if missing, holding nothing afterwards. Errors are left to the fetch
        that needs the shard, which retries and reports them."""
        with contextlib.suppress(OSError, ValueError):  # no retries here: the lock would make the user wait
            self.release(replace(self, retries=0).fetch(url, size)[1])

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # closing drops the lock

    @staticmethod
    def _complete(target: Path, size: int | None) -> bool:
        return target.is_file() and (size is None or target.stat().st_size == size)

    def _download(self, url: str, target: Path, size: int | None) -> None:
        for stale in target.parent.glob("*.part-*"):  # a killed download's (a worker terminated mid-way)
            pid = int(stale.name.rpartition("-")[2])
            if stale.name.startswith(f"{target.name}.part-") or not _process_alive(pid):  # ours: we hold the lock
                stale.unlink(missing_ok=True)
        if self.max_bytes:
            self._evict(need=size or 0, keep=target)
        part = target.with_name(f"{target.name}.part-{os.getpid()}")

        def attempt(stderr) -> None:
            with _gopen_capturing_stderr(url, stderr) as stream, open(part, "wb") as out:
                while chunk := stream.read(1 << 20):
                    out.write(chunk)
            got = part.stat().st_size
            if size is not None and got != size:
                part.unlink()
                raise ValueError(f"downloaded {got} bytes, info.json records {size}")

        try:
            _with_retries(url, self.retries, attempt, self.backoff)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, target)

    def _evict(self, need: int, keep: Path) -> None:
        """Remove the least recently used shards that nobody holds until ``need`` more bytes fit."""
        shards = []
        for path in self.path.iterdir():
            if path.suffix in (".lock", ".download") or ".part-" in path.name or path == keep:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            shards.append((stat.st_mtime, stat.st_size, path))
        used = sum(size for _, size, _ in shards)
        for _, size, path in sorted(shards):
            if used + need <= self.max_bytes:
                return
            fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # open in some worker: never evicted
            path.unlink(missing_ok=True)
            used -= size
            os.close(fd)


class Prefetcher:
    """Downloads shards into a cache on background threads, ahead of their first use, so that a worker whose
    lanes move into new shards finds them there instead of waiting for the download. Each shard is asked for
    once until ``forget()`` (a new epoch)."""

    def __init__(self, cache: ShardCache, threads: int = 2):
        self.cache, self.asked = cache, set()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-prefetch")

    def want(self, shards: list[tuple[str, int | None]]) -> None:
        for url, size in shards:
            if url not in self.asked:
                self.asked.add(url)
                self.pool.submit(self.cache.prefetch, url, size)

    def forget(self) -> None:
        self.asked.clear()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
