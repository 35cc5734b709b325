"""The sweep's results (tools/sweep.py, `results.json`) as a Markdown table laid out like the Hiera paper's
Table 1, as a bar chart of relative speed, ours against the paper's, and (after `--train`) as a chart of
accuracy against relative speed; drawn with PIL."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from engine.tblog import font as font_of


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _mean_std(row: dict, name: str, seeds: int = 1) -> str:
    """'mean ± std' of a measured quantity over seeds (just the mean for one run, "–" for none), and how many of
    the `seeds` runs it has while a sweep is still running them."""
    std, done = row.get(f"{name}_std"), len(row.get(f"{name}_runs") or [])
    return (_fmt(row[name], ".1f") + ("" if std is None else f" ± {std:.1f}")
            + (f" ({done} of {seeds} seeds)" if 0 < done < seeds else ""))


def describe_settings(s: dict) -> str:
    if not s["iters"]:
        return f"params and FLOPs only, no timing (`--iters 0`); torch {s['torch']}"
    return (f"{s['device_name']} ({s['device']}, {s['threads']} threads), torch {s['torch']}, {s['dtype']}, "
            f"batch {s['batch']}, median of {s['iters']} interleaved timed rounds after {s['warmup']} warm-up "
            f"runs; 1-minute load average {s['load_avg_before'][0]:.2f} before, {s['load_avg_after'][0]:.2f} after")


def write_table(results: dict, path: Path) -> None:
    """Setting | params | GMACs | accuracy | speed (absolute and relative to the first row), ours and paper's."""
    unit = results["unit"]
    settings = results["settings"]
    trained = "train" in settings
    seeds = settings["train"].get("seeds", 1) if trained else 1
    lines = [
        f"### {results['title']}", "",
        f"| setting | params (M) | GMACs | acc, paper | acc, ours |{' k-NN, ours |' * trained} {unit}, paper "
        f"| {unit}, ours | spread | rel. speed, paper | rel. speed, ours |",
        "|---|---:|---:|---:|---:|" + "---:|" * trained + "---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        paper_speed = _fmt(r["paper_speed"], ".1f") + (f" {r['paper_note']}" if r["paper_note"] else "")
        knn = f" {_mean_std(r, 'knn', seeds)} |" if trained else ""
        lines.append(
            f"| {r['label']} | {r['params']:.1f} | {r['gmacs']:.2f} | {_fmt(r['paper_acc'], '.1f')} "
            f"| {_mean_std(r, 'accuracy', seeds)} |{knn} {paper_speed} | {_fmt(r['throughput'], '.1f')} "
            f"| {_fmt(None if r['spread'] is None else 100 * r['spread'], '.0f', '%')} "
            f"| {_fmt(r['paper_speedup'], '.2f', '×')} | **{_fmt(r['speedup'], '.2f', '×')}** |")
    lines += [
        "",
        f"Ours: {describe_settings(settings)}. Each row's encoder in eval (classification inference, as the "
        "paper's speed column) on random inputs; spread: interquartile range of its timed runs over their "
        "median. GMACs per sample (torch.utils.flop_counter; the papers' \"FLOPs\" are multiply-adds: "
        "GFLOPs = 2 × GMACs). Paper: Hiera-L size, A100, fp16 (REFERENCE.md §3). "
        + (f"Our accuracy: fine-tuned top-1 (mean ± std over {seeds} seed(s)), and "
           f"the k-NN top-1 of the MAE-pretrained encoder, after `--train` with {settings['train']}." if trained
           else "Our accuracy is not measured (`--train` runs a pretrain + fine-tune per row)."),
    ]
    for note in results["notes"]:
        lines += ["", note]
    path.write_text("\n".join(lines) + "\n")


# Chart geometry, in pixels.
_LABEL_W, _BAR_W, _MARGIN, _BAR_H, _GAP, _TOP = 350, 470, 20, 16, 14, 76
_OURS, _PAPER, _INK, _GRID = (31, 119, 180), (170, 170, 170), (30, 30, 30), (225, 225, 225)


def write_chart(results: dict, path: Path) -> None:
    """Horizontal bars of speed relative to the first row: ours (blue) above the paper's (grey), per row."""
    rows = results["rows"]
    values = [v for r in rows for v in (r["speedup"], r["paper_speedup"]) if v is not None]
    scale_max = max([1.0, *values]) * 1.15
    height = _TOP + len(rows) * (2 * _BAR_H + _GAP) + 2 * _MARGIN
    image = Image.new("RGB", (_LABEL_W + _BAR_W + 2 * _MARGIN, height), "white")
    draw = ImageDraw.Draw(image)
    font, small, bold = font_of(13), font_of(11), font_of(15)
    step = 1 if scale_max <= 6 else 2 if scale_max <= 12 else 5
    x0 = _MARGIN + _LABEL_W

    def x_of(value: float) -> float:
        return x0 + _BAR_W * value / scale_max

    draw.text((_MARGIN, _MARGIN), f"{results['title']}: {results['unit']} relative to the first row",
              fill=_INK, font=bold)
    draw.rectangle((_MARGIN, 44, _MARGIN + 12, 56), fill=_OURS)
    draw.text((_MARGIN + 18, 42), f"ours ({results['settings']['device_name']}, {results['settings']['dtype']})",
              fill=_INK, font=small)
    draw.rectangle((_MARGIN + 400, 44, _MARGIN + 412, 56), fill=_PAPER)
    draw.text((_MARGIN + 418, 42), "paper (A100, fp16)", fill=_INK, font=small)
    bottom = height - _MARGIN
    for tick in range(0, int(scale_max) + 1, step):
        draw.line((x_of(tick), _TOP - 6, x_of(tick), bottom), fill=_GRID)
        draw.text((x_of(tick) + 2, _TOP - 18), f"{tick}×", fill=_INK, font=small)
    draw.line((x_of(1), _TOP - 6, x_of(1), bottom), fill=_INK)  # the baseline's speed
    for i, r in enumerate(rows):
        y = _TOP + i * (2 * _BAR_H + _GAP)
        draw.text((_MARGIN, y + _BAR_H - 8), r["label"], fill=_INK, font=font)
        for j, (value, color) in enumerate(((r["speedup"], _OURS), (r["paper_speedup"], _PAPER))):
            top = y + j * _BAR_H
            if value is None:
                draw.text((x0 + 4, top + 1), "not measured", fill=_INK, font=small)
                continue
            draw.rectangle((x0, top + 1, x_of(value), top + _BAR_H - 1), fill=color)
            draw.text((x_of(value) + 4, top + 1), f"{value:.2f}×", fill=_INK, font=small)
    image.save(path)


def write_accuracy_chart(results: dict, path: Path) -> None:
    """Our fine-tuned top-1 (mean, with a bar of one std) against our speed relative to the first row, one point
    per row, named by the row's letter: the trade-off the paper's Table 1 reads."""
    rows = [r for r in results["rows"] if r["accuracy"] is not None and r["speedup"] is not None]
    width, height, left, right, top, bottom = 560, 380, 60, 30, 50, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small = font_of(11)
    draw.text((left, 14), f"{results['title']}: top-1 against speed", fill=_INK, font=font_of(13))
    if not rows:
        draw.text((left, top), "no row has both an accuracy and a speed", fill=_INK, font=small)
        image.save(path)
        return
    spans = [(r["accuracy"] - (r["accuracy_std"] or 0), r["accuracy"] + (r["accuracy_std"] or 0)) for r in rows]
    low, high = min(a for a, _ in spans) - 0.5, max(b for _, b in spans) + 0.5
    slowest, fastest = min(r["speedup"] for r in rows) * 0.9, max(r["speedup"] for r in rows) * 1.1

    def xy(speed: float, accuracy: float) -> tuple[float, float]:
        return (left + (width - left - right) * (speed - slowest) / (fastest - slowest),
                top + (height - top - bottom) * (high - accuracy) / (high - low))

    step = max(0.5, round((high - low) / 6 * 2) / 2)
    tick = step * int(low / step + 1)
    while tick <= high:
        y = xy(slowest, tick)[1]
        draw.line((left, y, width - right, y), fill=_GRID)
        draw.text((left - 6, y), f"{tick:.1f}%", fill=_INK, font=small, anchor="rm")
        tick += step
    x_step = 0.5 if fastest - slowest <= 4 else 1.0
    for i in range(int(slowest / x_step) + 1, int(fastest / x_step) + 1):
        x = xy(i * x_step, low)[0]
        draw.line((x, top, x, height - bottom), fill=_GRID)
        draw.text((x, height - bottom + 6), f"{i * x_step:g}×", fill=_INK, font=small, anchor="mt")
    draw.text((width / 2, height - 14), "speed relative to the first row (ours)", fill=_INK, font=small, anchor="mm")
    for r, (a, b) in zip(rows, spans):
        x, y = xy(r["speedup"], r["accuracy"])
        draw.line((x, xy(0, a)[1], x, xy(0, b)[1]), fill=_OURS)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=_OURS)
        draw.text((x + 7, y), f"{r['row']} ({r['speedup']:.2f}×)", fill=_INK, font=small, anchor="lm")
    image.save(path)
