"""Decoding videos and images from bytes held in memory.

Video frames are chosen by presentation time, not by frame count, so variable frame rates and streams that
do not start at zero are handled: the frame shown at time ``t`` is the last frame whose timestamp is <= t.
Only frames that some requested time selects are converted to RGB (the conversion can cost more than the
decoding, REFERENCE.md §6), decoding starts from a seek to the key frame before the earliest requested time,
and the frames that are neither shown nor referenced are skipped by the decoder.

Short videos: a requested time past the last frame gets the last frame (the clip "freezes" at the end), and
a time before the first frame gets the first frame. Audio and other streams are never demuxed.

Memory follows the output, not the source. With ``Crops`` (what a training or evaluation sample asks for), each
frame is cut and resized as soon as the decoder hands it over and then let go, so at most one frame is held in
RGB, and a frame much larger than its crops is converted to RGB at a fraction of its size in the same pass
(``reduction``): a 16-frame 224-pixel clip from 8K video no longer holds sixteen 100 MB frames, twice. Images
take the same path (JPEG decodes at 1/2, 1/4 or 1/8 of its size, others are averaged down before the RGB
conversion). ``max_pixels`` refuses larger sources before their first frame is decoded: the decoder's own
frames are full size whatever is done with them (docs/bad_input.md has the measured peaks).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image

from .transforms import Box, crop_resize

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "mpg", "mpeg")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")
# The default of data.max_pixels: 8K video (7680x4320, 33.2 MP) and photos up to 40 MP decode; 12K and 16K video
# or larger images fail as samples (what decoding them costs: docs/bad_input.md).
DEFAULT_MAX_PIXELS = 40e6


class DecodeError(ValueError):
    """The bytes are not a decodable video or image."""


@dataclass(frozen=True)
class Crops:
    """What a sample keeps of its decoded pixels: ``boxes(height, width)`` gives, from the decoded size, one box
    (top, left, height, width in source pixels) per requested frame of a video or per view of an image, and each
    box is resized to ``size`` x ``size`` (``transforms.crop_resize``: bilinear, antialiased)."""

    boxes: Callable[[int, int], Sequence[Box]]
    size: int


# A frame is converted to RGB at 1/k of its size (k >= 2) only while every box keeps at least this many pixels per
# output pixel along its short side: the final antialiased resize then still averages over 2 or more pixels, as
# from the full frame. Sources too small for k = 2 (a box under 4 x size, e.g. any crop of a 340-pixel Kinetics
# video or an ImageNet photo) take the full-size path, and their output is exactly what it was before reduction.
_PIXELS_PER_OUTPUT = 2


def reduction(boxes: Sequence[Box], size: int) -> int:
    """The integer factor k >= 1 by which a frame with these crop boxes can be shrunk before its RGB conversion."""
    smallest = min(min(h, w) for _, _, h, w in boxes)
    return max(1, smallest // (_PIXELS_PER_OUTPUT * size))


def check_pixels(width: int, height: int, max_pixels: float | None, what: str) -> None:
    """Raises DecodeError for a source above ``max_pixels`` (None: no bound), naming its size."""
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(f"{what} larger than data.max_pixels: {width}x{height} = {width * height / 1e6:.3g} MP "
                          f"> {max_pixels / 1e6:.3g} MP; shrink the data (make_shards --short-side N) or raise "
                          f"data.max_pixels")


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
    data: bytes, choose_times: Callable[[VideoInfo], np.ndarray], crops: Crops | None = None,
    max_pixels: float | None = None,
) -> tuple[np.ndarray, VideoInfo]:
    """Frames shown at ``choose_times(info)`` (seconds from the first frame, any order, repeats allowed);
    the callback sees the metadata before any frame is decoded, so the container is opened once.

    Returns (frames, info): frames [len(times), H, W, 3] uint8 RGB, or with ``crops`` [len(times), S, S, 3],
    frame i cut to its box i and resized. A video whose frames have more than ``max_pixels`` pixels is refused
    before any frame is decoded. Raises ``DecodeError``.
    """
    container = _open(data)
    try:
        info, start = _stream_info(container)
        check_pixels(info.width, info.height, max_pixels, "video")
        times = np.asarray(choose_times(info), dtype=np.float64)
        try:
            frames = _frames_at(container, start, times, crops)
        except av.FFmpegError as e:
            raise DecodeError(f"decoding failed: {e}") from e
    finally:
        container.close()
    return frames, info


def _frames_at(container, start: float, times: np.ndarray, crops: Crops | None) -> np.ndarray:
    order = np.argsort(times, kind="stable")
    wanted = times[order] + start
    sink, done = None, 0
    for frame, count in _on_screen(container, start, wanted):
        if sink is None:
            sink = _FrameSink(len(times), frame.height, frame.width, crops)
        sink.add(frame, order[done : done + count])
        done += count
    if sink is None:
        raise DecodeError("no decodable frame")
    return sink.out


class _FrameSink:
    """Takes the decoded frames one at a time into ``out``: [n, H, W, 3] RGB, or with ``crops`` [n, S, S, 3] of
    each slot's box, from an RGB conversion at ``reduction`` of the frame's size. The first frame's size sets the
    boxes; a later frame of another size (a stream that changes resolution) fails the sample."""

    def __init__(self, n: int, height: int, width: int, crops: Crops | None):
        self.source_size, self.crops = (height, width), crops
        if crops is None:
            self.out = np.empty((n, height, width, 3), dtype=np.uint8)
            return
        self.boxes = list(crops.boxes(height, width))
        k = reduction(self.boxes, crops.size)
        self.convert_size = (max(1, round(height / k)), max(1, round(width / k)))
        self.out = np.empty((n, crops.size, crops.size, 3), dtype=np.uint8)

    def add(self, frame, slots: np.ndarray) -> None:
        """The frame shown at the times of ``slots`` (indices into the requested times)."""
        if (frame.height, frame.width) != self.source_size:
            height, width = self.source_size
            raise DecodeError(f"frame size changes from {width}x{height} to {frame.width}x{frame.height}")
        if self.crops is None:
            self.out[slots] = rgb24(frame)
        else:
            height, width = self.convert_size
            cut_into(self.out, slots.tolist(), rgb24(frame, width, height), self.source_size, self.boxes,
                     self.crops.size)


def cut_into(out: np.ndarray, slots: list[int], rgb: np.ndarray, source_size: tuple[int, int],
             boxes: Sequence[Box], size: int) -> None:
    """out[slot] = ``boxes[slot]`` of ``rgb`` [h, w, 3] resized to [size, size, 3] (bilinear, antialiased); ``rgb``
    is the source of ``source_size`` (H, W), maybe shrunk. Slots with the same box share one resize.

    At full size this is ``transforms.crop_resize`` (torch), as it always was. A shrunk frame goes through Pillow,
    whose resize takes the box in fractional pixels: a box rounded to whole pixels of the shrunk frame moves by up
    to half of one, which measured more than the shrinking itself changes (mean difference from the full-size
    result 3.4 against 1.2 grey levels on 8-pixel random blocks, 0.9 against 0.7 on smooth content, 4K).
    """
    shrunk = tuple(rgb.shape[:2]) != tuple(source_size)
    frame = Image.fromarray(rgb) if shrunk else torch.from_numpy(rgb)[None]
    done: dict[Box, int] = {}  # box -> the slot that holds its resize
    for slot in slots:
        box = tuple(boxes[slot])
        if box in done:
            out[slot] = out[done[box]]
            continue
        if shrunk:
            region = _scaled_region(box, source_size, rgb.shape[:2])
            out[slot] = np.asarray(frame.resize((size, size), Image.Resampling.BILINEAR, box=region))
        else:
            out[slot] = crop_resize(frame, box, size)[0].permute(1, 2, 0).numpy()
        done[box] = slot


def _scaled_region(box: Box, source_size: tuple[int, int], to_size: tuple[int, int]) -> tuple[float, ...]:
    """``box`` (top, left, height, width) in source pixels -> Pillow's (left, upper, right, lower) of the same
    region of the source shrunk to ``to_size``, in fractional pixels."""
    top, left, h, w = box
    sy, sx = to_size[0] / source_size[0], to_size[1] / source_size[1]
    return left * sx, top * sy, (left + w) * sx, (top + h) * sy


class _Overshot(Exception):
    """After a seek, the first frame came after the first wanted time (or no frame came): decode from the start."""


def _on_screen(container, start: float, wanted: np.ndarray):
    """Yields (frame, n): the frame on screen at the next n of the sorted ``wanted`` times, in order, holding no
    more than two decoded frames. Decoding starts from a seek to the key frame before the first time; if that
    lands too late, from the start of the stream."""
    stream = container.streams.video[0]
    if wanted[0] > start:
        # Seeking is advisory: if the demuxer lands after the target we rewind and decode from the start.
        container.seek(int(wanted[0] / stream.time_base), stream=stream, backward=True, any_frame=False)
        try:
            yield from _select(_shown_frames(container, stream, wanted), wanted, rewind_ok=True)
            return
        except _Overshot:
            container.seek(0, stream=stream, backward=True, any_frame=False)
    yield from _select(_shown_frames(container, stream, wanted), wanted, rewind_ok=False)


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


def rgb24(frame, width: int | None = None, height: int | None = None) -> np.ndarray:
    """[H, W, 3] uint8; at the frame's size the interpolation only affects chroma upsampling. With a smaller
    ``width`` x ``height``, the frame is shrunk by area averaging in the same pass, never held in RGB at full
    size."""
    if (width or frame.width, height or frame.height) == (frame.width, frame.height):
        return _REFORMATTER.reformat(frame, format="rgb24", interpolation="FAST_BILINEAR", threads=1).to_ndarray()
    return _REFORMATTER.reformat(frame, width=width, height=height, format="rgb24", interpolation="AREA",
                                 threads=1).to_ndarray()


def _select(frames, wanted: np.ndarray, rewind_ok: bool):
    """For sorted ``wanted`` times, yields (frame, n): the frame on screen at the next n times. With
    ``rewind_ok`` (after a seek), raises _Overshot before yielding anything if the first frame came after the
    first time or no frame came (leading B-frames of an open GOP are dropped after a seek); otherwise times before
    the first frame get the first frame, and without any frame nothing is yielded.

    After the last frame every remaining time gets the last frame (short-video policy).
    """
    eps = 1e-6
    previous, i = None, 0
    for frame in frames:
        if frame.time is None:
            continue
        if previous is None and rewind_ok and frame.time > wanted[0] + eps:
            raise _Overshot
        first = i
        while i < len(wanted) and frame.time > wanted[i] + eps:
            i += 1
        if i > first:
            yield (previous if previous is not None else frame), i - first
        if i == len(wanted):
            return
        previous = frame
    if previous is None:
        if rewind_ok:
            raise _Overshot
        return
    yield previous, len(wanted) - i


def decode_image(data: bytes, crops: Crops | None = None, max_pixels: float | None = None) -> np.ndarray:
    """An image [H, W, 3] uint8 RGB, or with ``crops`` its views [len(boxes), S, S, 3], each box cut and resized.
    An image of more than ``max_pixels`` pixels is refused from its header, before it is decoded. Raises
    ``DecodeError``."""
    if not data:
        raise DecodeError("zero-byte input")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            check_pixels(width, height, max_pixels, "image")
            if crops is None:
                return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy needs one
            boxes = crops.boxes(height, width)
            rgb = _reduced_rgb(image, reduction(boxes, crops.size))
            out = np.empty((len(boxes), crops.size, crops.size, 3), dtype=np.uint8)
            cut_into(out, list(range(len(boxes))), rgb, (height, width), boxes, crops.size)
            return out
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise DecodeError(f"unreadable image: {e}") from e


def decode_image_at_least(data: bytes, short_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(image [h, w, 3] uint8 RGB, the source's (height, width)): the image shrunk by the largest whole factor that
    keeps its short side at least ``short_side``, as it decodes (see ``_reduced_rgb``), so that memory follows the
    size asked for, not the source's. Raises ``DecodeError``."""
    if not data:
        raise DecodeError("zero-byte input")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return _reduced_rgb(image, max(1, min(width, height) // short_side)), (height, width)
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise DecodeError(f"unreadable image: {e}") from e


# Modes that Image.reduce averages as they are; any other (a palette's indices, 1-bit, 16-bit) goes to RGB first.
_REDUCIBLE_MODES = ("RGB", "L", "RGBA", "LA")


def _reduced_rgb(image: Image.Image, k: int) -> np.ndarray:
    """[h, w, 3] uint8: the image shrunk about k times (k = 1: full size). A JPEG decodes straight at 1/2, 1/4 or
    1/8 of its size (``draft``, from its DCT coefficients); what is left of k, and any other format, is an area
    average of the decoded image (``reduce``) before the conversion to RGB, so no full-size RGB copy is made."""
    if k == 1:
        return np.array(image.convert("RGB"))
    width = image.width
    image.draft("RGB", (image.width // k, image.height // k))  # JPEG only; the others ignore it
    k //= round(width / image.width)  # what the draft has not done yet
    if k > 1:
        if image.mode not in _REDUCIBLE_MODES:
            image = image.convert("RGB")
        image = image.reduce(k)
    return np.array(image.convert("RGB"))
