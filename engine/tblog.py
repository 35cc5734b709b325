"""Logging on the main process: TensorBoard (scalars, image grids, animated clips, text and hparams) and the
other trackers of `log.trackers` (engine/tracking.py: scalars and images).

Animated clips are written as GIF image summaries, which TensorBoard shows as moving images without the
moviepy dependency that `add_video` silently needs.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image, ImageFont
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from .config import RunConfig
from .tracking import log_image, start


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans for pictures with text (it has the x and superscripts that labels use); Pillow's built-in
    font, which draws those as boxes, where DejaVu is not installed."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] float in [0, 1] -> [..., H, W, 3] uint8."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(array, -3, -1)


def gif_bytes(frames: np.ndarray, fps: float = 8.0) -> bytes:
    """[T, H, W, 3] uint8 -> an endlessly looping animated GIF."""
    pictures = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:],
                     duration=int(1000 / fps), loop=0)
    return buffer.getvalue()


class TrainLogger:
    """A SummaryWriter in `log_dir` when `enabled` and `tensorboard`, and accelerate's started `trackers`;
    every call is a no-op on the other ranks (enabled False)."""

    def __init__(self, log_dir: str | Path, enabled: bool, purge_step: int | None = None, tensorboard: bool = True,
                 trackers: list | None = None):
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step) if enabled and tensorboard else None
        self.trackers = list(trackers or []) if enabled else []

    @classmethod
    def for_run(cls, accelerator: Accelerator, cfg: RunConfig, purge_step: int | None = None) -> TrainLogger:
        """The run's logger: TensorBoard in output_dir/tb (when in `log.trackers`) and the other trackers, started
        with the config (accelerate made with log_with=tracking.log_with(cfg)); a resumed run (`purge_step` set)
        continues the trackers' runs."""
        start(accelerator, cfg, resumed=purge_step is not None)
        return cls(Path(cfg.output_dir) / "tb", enabled=accelerator.is_main_process, purge_step=purge_step,
                   tensorboard="tensorboard" in cfg.log.trackers, trackers=accelerator.trackers)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """[3, H, W] float in [0, 1]."""
        if self.writer:
            self.writer.add_image(tag, image.detach().float().clamp(0, 1).cpu(), step)
        if self.trackers:
            log_image(self.trackers, tag, to_uint8(image), step)

    def animation(self, tag: str, frames: torch.Tensor, step: int, fps: float = 8.0) -> None:
        """[T, 3, H, W] float in [0, 1] -> an animated GIF image summary."""
        if self.writer:
            array = to_uint8(frames)
            encoded = Summary.Image(height=array.shape[1], width=array.shape[2], colorspace=3,
                                    encoded_image_string=gif_bytes(array, fps))
            self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=encoded)]), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def hparams(self, params: dict, metrics: dict[str, float]) -> None:
        if self.writer:
            self.writer.add_hparams(params, metrics, run_name=".")

    def close(self) -> None:
        if self.writer:
            self.writer.close()
