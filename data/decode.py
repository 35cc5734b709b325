"""Decoding videos and images from bytes held in memory.

Video frames are chosen by presentation time, not by frame count, so variable frame rates and streams that
do not start at zero are handled: the frame shown at time ``t`` is the last frame whose timestamp is <= t.
Only frames that some requested time selects are converted to RGB (the conversion can cost more than the
decoding, REFERENCE.md §6), decoding starts from a seek to the key frame before the earliest requested time,
and the frames that are neither shown nor referenced are skipped by the decoder.

Short videos: a requested time past the last frame gets the last frame (the clip "freezes" at the end), and
a time before the first frame gets the first frame. Audio and other streams are never demuxed.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "mpg", "mpeg")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")


class DecodeError(ValueError):
    """The bytes are not a decodable video or image."""


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds of video, measured from the first frame
    fps: float  # average frame rate; 30 when the container does not say
    width: int
    height: int


def _open(data: bytes):
    if not data:
        raise DecodeError("zero-byte input")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise DecodeError(f"unreadable container: {e}") from e
    if not container.streams.video:
        container.close()
        raise DecodeError("no video stream")
    return container


def _stream_info(container) -> tuple[VideoInfo, float]:
    """(info, start) where ``start`` is the stream's first timestamp in seconds."""
    stream = container.streams.video[0]
    time_base = stream.time_base or Fraction(1, 1_000_000)
    start = float((stream.start_time or 0) * time_base)
    fps = float(stream.average_rate or stream.guessed_rate or 30)
    if stream.duration:
        duration = float(stream.duration * time_base)
    elif container.duration:
        duration = container.duration / av.time_base - start
    elif stream.frames:
        duration = stream.frames / fps
    else:
        duration = _demuxed_duration(container, stream, time_base, start)
    ctx = stream.codec_context
    return VideoInfo(duration=max(duration, 0.0), fps=fps, width=ctx.width, height=ctx.height), start


def _demuxed_duration(container, stream, time_base: Fraction, start: float) -> float:
    """Seconds from the first frame to the end of the last, read from the packet timestamps, for containers
    that state no duration and no frame count (WebM written as a live stream: PyAV reports ``frames == 0`` and
    ``duration is None``, PyAV#1131). Demuxing decodes nothing, so this costs little next to the decoding; the
    container is rewound to its start afterwards. 0.0 when no packet has a timestamp (every clip then starts at
    0 and repeats its last frame if needed)."""
    end = None
    for packet in container.demux(stream):
        if packet.pts is not None:
            packet_end = packet.pts + (packet.duration or 0)
            end = packet_end if end is None else max(end, packet_end)
    container.seek(stream.start_time or 0, stream=stream, backward=True, any_frame=False)
    return 0.0 if end is None else float(end * time_base) - start


def probe_video(data: bytes) -> VideoInfo:
    """Container metadata plus a check that a first frame decodes. Raises ``DecodeError``."""
    container = _open(data)
    try:
        info, _ = _stream_info(container)
        try:
            next(container.decode(video=0))
        except (av.FFmpegError, StopIteration) as e:
            raise DecodeError(f"no decodable frame: {e}") from e
        return info
    finally:
        container.close()


def decode_video(
    data: bytes, choose_times: Callable[[VideoInfo], np.ndarray]
) -> tuple[np.ndarray, VideoInfo]:
    """Frames shown at ``choose_times(info)`` (seconds from the first frame, any order, repeats allowed);
    the callback sees the metadata before any frame is decoded, so the container is opened once.

    Returns (frames [len(times), H, W, 3] uint8 RGB, info). Raises ``DecodeError``.
    """
    container = _open(data)
    try:
        info, start = _stream_info(container)
        times = np.asarray(choose_times(info), dtype=np.float64)
        try:
            frames = _frames_at(container, start, times)
        except av.FFmpegError as e:
            raise DecodeError(f"decoding failed: {e}") from e
    finally:
        container.close()
    return frames, info


def _frames_at(container, start: float, times: np.ndarray) -> np.ndarray:
    stream = container.streams.video[0]
    order = np.argsort(times, kind="stable")
    wanted = times[order] + start
    seek_to = wanted[0]
    if seek_to > start:
        # Seeking is advisory: if the demuxer lands after the target we rewind and decode from the start.
        container.seek(int(seek_to / stream.time_base), stream=stream, backward=True, any_frame=False)
    selected = _select(_shown_frames(container, stream, wanted), wanted, rewind_ok=seek_to > start)
    if selected is None:
        container.seek(0, stream=stream, backward=True, any_frame=False)
        selected = _select(_shown_frames(container, stream, wanted), wanted, rewind_ok=False)
    if not selected:
        raise DecodeError("no decodable frame")
    rgb = {}  # frame id -> array, so a frame picked by several times converts once
    out = np.empty((len(times), *_rgb(selected[0], rgb).shape), dtype=np.uint8)
    for slot, frame in zip(order, selected):
        out[slot] = _rgb(frame, rgb)
    return out


# Decoding order and display order differ by the B-frame reordering depth, at most 16 frames in H.264/HEVC.
_REORDER_DEPTH = 16
# Decoders that read ``skip_frame`` for every packet. Others must decode every frame: dav1d (AV1), for one,
# reads it once when it opens, and would then drop shown frames too.
_SKIP_PLAN_CODECS = frozenset({"h264", "hevc"})


def _shown_frames(container, stream, wanted: np.ndarray):
    """Yields, in display order, decoded frames that include those on screen at the sorted ``wanted`` times.

    The packets up to the last wanted time are demuxed first (cheap: no decoding), which tells from their
    timestamps which frames are shown. Frames that are not shown and that no other frame references (most
    B-frames) are then skipped by the decoder instead of decoded: about 40% of x264's frames, so decoding a
    16x4 clip costs ~1.3x less. Other codecs, AVI (which stores no presentation times for B-frames) and
    packets without timestamps get no plan: every frame is decoded and yielded.
    """
    if container.format.name == "avi" or stream.codec_context.name not in _SKIP_PLAN_CODECS:
        yield from container.decode(stream)
        return
    time_base = float(stream.time_base)
    packets, after_last = [], 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        packets.append(packet)
        after_last += packet.pts is not None and packet.pts * time_base > wanted[-1] + 1e-6
        if after_last > _REORDER_DEPTH:
            break
    pending = None  # pts -> number of shown frames with that pts still to come
    if packets and all(p.pts is not None for p in packets):
        pts = np.unique([p.pts for p in packets])
        on_screen = np.searchsorted(pts * time_base, wanted + 1e-6, side="right") - 1
        shown = set(pts[np.clip(on_screen, 0, len(pts) - 1)].tolist())
        pending = Counter(p.pts for p in packets if p.pts in shown)
    codec = stream.codec_context
    for packet in [*packets, None]:  # None drains the frames the decoder still holds
        skip = pending is not None and packet is not None and packet.pts not in pending
        codec.skip_frame = "NONREF" if skip else "DEFAULT"
        for frame in codec.decode(packet):
            if pending is None or pending[frame.pts] > 0:
                frame.time_base = stream.time_base  # frames drained by ``None`` come without one
                yield frame
                if pending is not None:
                    pending[frame.pts] -= 1
                    if pending.total() == 0:
                        return


# ``frame.to_ndarray(format=...)`` builds a new swscale context for every frame; one shared reformatter
# reuses its context and makes the RGB conversion, the costliest step of loading, ~7x cheaper (measured
# here: 0.72 -> 0.095 ms per 320x240 frame). It must run single-threaded: by default swscale starts a
# thread pool, which a forked DataLoader worker inherits without its threads and then waits on forever.
_REFORMATTER = VideoReformatter()


def rgb24(frame) -> np.ndarray:
    """[H, W, 3] uint8. Same-size conversion, so the interpolation only affects chroma upsampling."""
    return _REFORMATTER.reformat(frame, format="rgb24", interpolation="FAST_BILINEAR", threads=1).to_ndarray()


def _rgb(frame, cache: dict) -> np.ndarray:
    key = id(frame)
    if key not in cache:
        cache[key] = rgb24(frame)
    return cache[key]


def _select(frames, wanted: np.ndarray, rewind_ok: bool):
    """For sorted ``wanted`` times, the frame on screen at each; None (rewind and retry) if the first frame
    overshot or, after a seek, no frame came (leading B-frames of an open GOP are dropped after a seek).

    After the last frame every remaining time gets the last frame (short-video policy).
    """
    eps = 1e-6
    picked, previous, i = [], None, 0
    for frame in frames:
        if frame.time is None:
            continue
        if previous is None and rewind_ok and frame.time > wanted[0] + eps:
            return None
        while i < len(wanted) and frame.time > wanted[i] + eps:
            picked.append(previous if previous is not None else frame)
            i += 1
        if i == len(wanted):
            break
        previous = frame
    if previous is None and not picked:
        return None if rewind_ok else []
    picked.extend([previous] * (len(wanted) - i))
    return picked


def decode_image(data: bytes) -> np.ndarray:
    """An image [H, W, 3] uint8 RGB. Raises ``DecodeError``."""
    if not data:
        raise DecodeError("zero-byte input")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy needs one
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise DecodeError(f"unreadable image: {e}") from e
