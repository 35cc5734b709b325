"""Draw a pretraining run's online k-NN curve (eval.knn.*) from its metrics.json.

    python -m pretrain.knn_curve runs/demo/pretrain [--out knn_curve.png]

The picture shows k-NN top-1 and top-5 (percent; and mAP for multi-label sets) against the optimizer step, from
the initial weights at step 0, with the chance level dotted (single-label sets). pretrain/main.py writes it to
output_dir/knn_curve.png at the end of a run with the monitor on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from engine.tblog import font

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 520, 320, 56, 20, 40, 44
INK, GRID, TOP1, TOP5, MAP = (30, 30, 30), (225, 225, 225), (31, 119, 180), (160, 160, 160), (214, 39, 40)


def draw_curve(metrics: dict, title: str) -> Image.Image:
    """The k-NN history of a metrics.json (list of {"step", "top1", "top5"(, "mAP")}) as an RGB picture."""
    history = metrics["knn_history"]
    lines = (("k-NN top-1", "top1", TOP1), ("top-5", "top5", TOP5)) + (
        (("mAP", "mAP", MAP),) if "mAP" in history[0] else ())  # (legend, key, colour)
    last_step = max(max(h["step"] for h in history), 1)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    small = font(11)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def point(step: float, percent: float) -> tuple[float, float]:
        return LEFT + plot_w * step / last_step, TOP + plot_h * (1 - percent / 100)

    for percent in range(0, 101, 20):
        y = point(0, percent)[1]
        draw.line((LEFT, y, LEFT + plot_w, y), fill=GRID)
        draw.text((LEFT - 6, y), f"{percent}%", fill=INK, font=small, anchor="rm")
    for step in (0, last_step // 2, last_step):
        draw.text((point(step, 0)[0], TOP + plot_h + 6), str(step), fill=INK, font=small, anchor="mt")
    draw.text((LEFT + plot_w / 2, HEIGHT - 8), "optimizer step", fill=INK, font=small, anchor="mb")
    for i, (name, _, color) in enumerate(lines):
        x = 8 + 90 * i
        draw.ellipse((x, HEIGHT - 17, x + 6, HEIGHT - 11), fill=color)
        draw.text((x + 10, HEIGHT - 8), name, fill=color, font=small, anchor="lb")
    chance = metrics.get("knn_chance")
    if chance:
        for x in range(LEFT, LEFT + plot_w, 8):
            draw.line((x, point(0, chance)[1], x + 3, point(0, chance)[1]), fill=INK)
        draw.text((LEFT + plot_w, point(0, chance)[1] - 2), "chance", fill=INK, font=small, anchor="rb")
    for _, key, color in reversed(lines):  # top-1 drawn last, over the others
        points = [point(h["step"], h[key]) for h in history]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    draw.text((LEFT, 10), title, fill=INK, font=font(13))
    return image


def write_curve(run: Path, out: Path | None = None) -> Path:
    """output_dir/metrics.json -> the picture at `out` (default output_dir/knn_curve.png)."""
    metrics = json.loads((run / "metrics.json").read_text())
    out = out or run / "knn_curve.png"
    title = f"{run.name}: k-NN (k={metrics['knn_k']}, T={metrics['knn_temperature']}) of the encoder's features"
    draw_curve(metrics, title).save(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a pretraining output_dir whose metrics.json has a k-NN history")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN/knn_curve.png)")
    args = parser.parse_args(argv)
    path = write_curve(args.run, args.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
