"""Reconstruct one video or image with a pretraining checkpoint and write the pictures.

    python -m pretrain.visualize --checkpoint runs/demo/pretrain/checkpoint-00000600 --input clip.mp4 --out viz/

Writes `<stem>.png` (images: original | masked | reconstruction | pasted; video: the same as frame strips,
one frame per temporal token) and, for video, `<stem>.gif` with the four panels side by side. The input is
center-cropped as in evaluation; the mask is random with the checkpoint's mask ratio (`--seed` picks it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from data import SampleConfig, SampleProcessor, normalize
from engine.config import load_config
from engine.exported import encoder_file
from engine.loaders import resolve_normalization
from engine.tblog import gif_bytes, to_uint8
from models import create_model, load_pretrained

from . import render


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint-* directory of a pretraining run")
    parser.add_argument("--input", required=True, help="a video or image file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="chooses the random mask")
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint)
    cfg = load_config([str(checkpoint / "config.yaml")], [])
    model = create_model(cfg.model.name, **cfg.model.overrides()).eval()
    load_pretrained(model, checkpoint / "model.safetensors")

    d = cfg.data
    # The statistics the run trained with, which its checkpoint's exported encoder records.
    channel_stats = resolve_normalization(d, cfg.model.name, encoder_file(checkpoint))
    sample = SampleConfig(train=False, num_frames=d.num_frames, sampling_rate=d.sampling_rate, target_fps=d.target_fps,
                          sampling=d.sampling, crop_size=d.crop_size, mask_grid=model.mask_unit_grid,
                          mask_ratio=model.mask_ratio, mean=channel_stats.mean, std=channel_stats.std,
                          max_pixels=d.max_pixels)
    source = Path(args.input)
    view = SampleProcessor(sample)(source.read_bytes(), source.suffix.lstrip("."), args.seed, 0, 0)[0]
    x, mask = normalize(view["pixels"][None], sample.mean, sample.std), view["mask"][None]
    with torch.no_grad():
        views = model.reconstruct(x, model(x, mask=mask))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{source.stem}.png"]
    if x.dim() == 4:
        picture = render.image_grid(views, sample.mean, sample.std)
    else:
        picture = render.frame_strips(views, sample.mean, sample.std, 0)
        written.append(out / f"{source.stem}.gif")
        written[-1].write_bytes(gif_bytes(to_uint8(render.animation(views, sample.mean, sample.std, 0))))
    Image.fromarray(to_uint8(picture)).save(written[0])
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
