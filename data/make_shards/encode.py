"""The bytes stored for one input: its original file, or, with ``--short-side`` or a time window, a re-encoded
copy (videos as H.264 with audio dropped, only the window's frames where the input has one; images re-saved as
JPEG, decoded already shrunk towards the new size)."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..decode import IMAGE_EXTENSIONS, DecodeError, decode_image, decode_image_at_least, probe_video
from .inputs import Input


class Skip(Exception):
    """An input that cannot go into a shard; the message is the reason."""


def encode_input(item: Input, short_side: int | None) -> tuple[str, bytes]:
    """(extension, bytes) to store for one input; raises ``Skip`` with the reason."""
    path = Path(item.path)
    if item.problem:
        raise Skip(item.problem)
    if not path.is_file():
        raise Skip("missing")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Skip(f"unreadable: {e}") from e
    ext = path.suffix.lstrip(".").lower()
    try:
        if ext in IMAGE_EXTENSIONS:
            if not short_side:
                decode_image(data)  # only to refuse what does not decode
                return ext, data
            image, (height, width) = decode_image_at_least(data, short_side)
            if min(height, width) > short_side:
                return "jpg", _resize_image(image, _scaled(width, height, short_side))
            return ext, data
        info = probe_video(data)
        smaller = short_side if short_side and min(info.width, info.height) > short_side else None
        if smaller or item.window:
            return "mp4", _reencode(data, smaller, item.window)
        return ext, data
    except DecodeError as e:
        raise Skip(str(e)) from e
    except av.FFmpegError as e:
        raise Skip(f"unreadable: {e}") from e


def encode_job(args: tuple[Input, int | None]) -> tuple[str, bytes] | str:
    """Worker entry: (ext, bytes) or the skip reason."""
    try:
        return encode_input(*args)
    except Skip as e:
        return str(e)


def _scaled(width: int, height: int, short_side: int) -> tuple[int, int]:
    """New (width, height) with the short side at ``short_side``, both even (4:2:0 chroma)."""
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> bytes:
    """JPEG bytes of `image` [H, W, 3] resized to `size` (width, height)."""
    out = io.BytesIO()
    Image.fromarray(image).resize(size, Image.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _reencode(data: bytes, short_side: int | None, window: tuple[float, float] | None = None) -> bytes:
    """H.264 with the short side at `short_side` (None: the size stays), of the frames shown in `window` (start,
    end seconds from the stream's start; None: all); keeps every frame's timestamp (variable frame rates
    survive), drops audio. Raises Skip for a window that holds no frame."""
    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as source, av.open(out, "w", format="mp4") as target:
        src = source.streams.video[0]
        width, height = src.codec_context.width, src.codec_context.height
        if short_side:
            width, height = _scaled(width, height, short_side)
        first = (src.start_time or 0) * src.time_base
        lower, upper = (first + Fraction(window[0]), first + Fraction(window[1])) if window else (None, None)
        dst = target.add_stream("libx264", rate=src.average_rate or 30)
        dst.width, dst.height, dst.pix_fmt = width, height, "yuv420p"
        dst.time_base = src.time_base
        dst.options = {"crf": "23", "preset": "veryfast"}
        last_pts = None
        for frame in source.decode(src):
            if frame.pts is None or (last_pts is not None and frame.pts <= last_pts):
                continue  # the muxer rejects non-increasing timestamps
            if window and not lower <= frame.pts * src.time_base < upper:
                continue
            last_pts = frame.pts
            scaled = frame.reformat(width=width, height=height, format="yuv420p")
            scaled.pts, scaled.time_base = frame.pts, src.time_base
            target.mux(dst.encode(scaled))
        target.mux(dst.encode())
    if last_pts is None:
        raise Skip(f"no frame in the window {window[0]}-{window[1]} s")
    return out.getvalue()
