"""The benchmark's files (tools/real_bench.py): results.json, table.md and, with fine-tuning on label fractions,
plot.png (top-1 against the labelled fraction, pretrained vs random, with the raw-pixel baselines as lines)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from engine.tblog import font

INITS = ("pretrained", "random")  # the encoders; "pixels" is the baseline without one
FRACTIONS = (1, 10, 100)  # percent of the train labels that fine-tuning sees
EVALS = ("knn", "linear", *(f"finetune_{f}" for f in FRACTIONS), "finetune_direction", "finetune_direction_shuffled")
EVAL_NAMES = {"knn": "k-NN", "linear": "linear probe", "finetune_1": "fine-tune, 1% labels",
              "finetune_10": "fine-tune, 10% labels", "finetune_100": "fine-tune, 100% labels",
              "finetune_direction": "direction: fine-tune, 100% labels",
              "finetune_direction_shuffled": "direction: the same, frames shuffled"}
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 560, 360, 56, 150, 40, 44
INK, GRID = (30, 30, 30), (225, 225, 225)
COLORS = {"pretrained": (31, 119, 180), "random": (214, 39, 40), "pixels knn": (120, 120, 120),
          "pixels linear": (44, 160, 44)}


def cell(entry: dict) -> str:
    spread = f" ± {entry['std']:.1f}" if len(entry["runs"]) > 1 else ""
    return f"{entry['mean']:.1f}{spread}"


def write_table(results: dict) -> str:
    """Markdown: one row per evaluation, one column per initialisation (test top-1, mean ± std over seeds),
    then the validation top-1 the settings were chosen on."""
    top1, val = results["top1"], results["val_top1"]
    seeds = results["seeds"]
    labels = "class labels, except the direction rows" if "finetune_direction" in top1["pretrained"] else "classes"
    lines = [f"Test top-1 (%) on {results['dataset']} ({labels}), mean ± std over {seeds} seed{'s' * (seeds > 1)} "
             f"({results['counts']['train']} train / {results['counts']['val']} val / "
             f"{results['counts']['test']} test samples); validation top-1 in brackets.", "",
             "| evaluation | pretrained (MAE) | random init | raw pixels | pretrained − random |",
             "|---|---:|---:|---:|---:|"]
    for e in (e for e in EVALS if e in top1["pretrained"]):
        row = [f"{cell(top1[i][e])} ({cell(val[i][e])})" if e in top1[i] else "–" for i in (*INITS, "pixels")]
        gain = top1["pretrained"][e]["mean"] - top1["random"][e]["mean"]
        lines.append(f"| {EVAL_NAMES[e]} | " + " | ".join(row) + f" | {gain:+.1f} |")
    if "order_blind_top1" in results:
        lines += ["", f"With frames shuffled, a model blind to their order can reach at most "
                      f"{results['order_blind_top1']:.1f}% on the direction: a clip played backwards is as likely a "
                      "clip, with the same frames and another direction (data.moving_fashion_mnist.order_blind_top1)."]
    return "\n".join(lines) + "\n"


def draw_plot(results: dict) -> Image.Image:
    """Fine-tuning top-1 against the labelled fraction (log scale) for both initialisations, error bars of
    one std; the raw-pixel k-NN and linear probe (all labels) as dashed lines."""
    top1 = results["top1"]
    points = {init: [top1[init][f"finetune_{f}"] for f in FRACTIONS] for init in INITS}
    flat = [v for p in points.values() for e in p for v in (e["mean"] - e["std"], e["mean"] + e["std"])]
    flat += [top1["pixels"][e]["mean"] for e in ("knn", "linear")]
    low = max(0.0, math.floor(min(flat) / 10) * 10)
    high = min(100.0, math.ceil(max(flat) / 10) * 10)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    small = font(11)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(fraction: float, percent: float) -> tuple[float, float]:
        return (LEFT + plot_w * math.log10(fraction) / 2,
                TOP + plot_h * (1 - (percent - low) / max(high - low, 1e-9)))

    for percent in range(int(low), int(high) + 1, 5 if high - low <= 40 else 10):
        y = xy(1, percent)[1]
        draw.line((LEFT, y, LEFT + plot_w, y), fill=GRID)
        draw.text((LEFT - 6, y), f"{percent}%", fill=INK, font=small, anchor="rm")
    for fraction in FRACTIONS:
        draw.text((xy(fraction, low)[0], TOP + plot_h + 6), f"{fraction}%", fill=INK, font=small, anchor="mt")
    draw.text((LEFT + plot_w / 2, HEIGHT - 8), "train labels used for fine-tuning", fill=INK, font=small,
              anchor="mb")
    for name, e in (("pixels knn", "knn"), ("pixels linear", "linear")):
        y = xy(1, top1["pixels"][e]["mean"])[1]
        for x in range(LEFT, LEFT + plot_w, 8):
            draw.line((x, y, x + 4, y), fill=COLORS[name], width=2)
    for init, entries in points.items():
        line = [xy(f, e["mean"]) for f, e in zip(FRACTIONS, entries)]
        draw.line(line, fill=COLORS[init], width=2)
        for (x, y), f, e in zip(line, FRACTIONS, entries):
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=COLORS[init])
            if e["std"]:
                draw.line((x, xy(f, e["mean"] - e["std"])[1], x, xy(f, e["mean"] + e["std"])[1]),
                          fill=COLORS[init], width=1)
    legend = (("pretrained", "MAE-pretrained"), ("random", "random init"),
              ("pixels knn", "pixels, k-NN"), ("pixels linear", "pixels, linear"))
    for i, (key, label) in enumerate(legend):
        y = TOP + 8 + 18 * i
        draw.line((WIDTH - RIGHT + 12, y, WIDTH - RIGHT + 30, y), fill=COLORS[key], width=2)
        draw.text((WIDTH - RIGHT + 36, y), label, fill=INK, font=small, anchor="lm")
    draw.text((LEFT, 10), f"{results['dataset']}: fine-tuned test top-1, {results['seeds']} seed(s)",
              fill=INK, font=font(13))
    return image


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(write_table(results))
    if all(f"finetune_{f}" in results["top1"]["pretrained"] for f in FRACTIONS):
        draw_plot(results).save(out / "plot.png")
