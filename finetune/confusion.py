"""The confusion matrix as a picture people can read: class names on both axes, the count in every cell,
cells shaded by the share of the true class's videos. With many classes (Kinetics' 400) only the `top`
classes with the most videos are drawn, in class order, and an "other" column counts their videos predicted
as any class not drawn, so that every row still adds up to the class's videos.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from engine.tblog import font

CELL, MARGIN = 30, 8
INK, GRID = (30, 30, 30), (210, 210, 210)


def confusion_table(confusion: torch.Tensor, classes: list[str], top: int) -> tuple[list[str], torch.Tensor, bool]:
    """[K, K] counts (rows: true class, columns: prediction) -> (names of the k drawn classes, [k, k] counts
    among them, or [k, k + 1] with the "other" column when k < K, whether that column is there)."""
    num_classes = confusion.shape[0]
    names = classes if len(classes) == num_classes else [str(i) for i in range(num_classes)]
    if num_classes <= top:
        return list(names), confusion, False
    support = confusion.sum(1)
    chosen = support.argsort(descending=True, stable=True)[:top].sort().values  # the largest, in class order
    table = confusion[chosen][:, chosen]
    other = confusion[chosen].sum(1) - table.sum(1)
    return [names[i] for i in chosen.tolist()], torch.cat([table, other[:, None]], 1), True


def confusion_picture(confusion: torch.Tensor, classes: list[str], top: int = 30) -> Image.Image:
    """An RGB picture of `confusion` [K, K] with the names in `classes` (see `confusion_table`)."""
    names, table, has_other = confusion_table(confusion, classes, top)
    rows, columns = table.shape
    column_names = [*names, "other"] if has_other else names
    label_font, count_font = font(12), font(10 if table.max() >= 100 else 11)
    left = MARGIN + int(max(label_font.getlength(n) for n in names)) + 6
    above = 2 * MARGIN + 40 + int(max(label_font.getlength(n) for n in column_names)) + 6
    shown = f"top {rows} of {confusion.shape[0]} classes by videos, " if has_other else ""
    title = f"rows: true class, columns: predicted ({shown}{int(confusion.sum())} videos)"
    width = max(left + columns * CELL, int(label_font.getlength(title))) + MARGIN
    image = Image.new("RGB", (width, above + rows * CELL + MARGIN), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=label_font)
    rates = (table.float() / table.sum(1, keepdim=True).clamp(min=1)).numpy()
    for r in range(rows):
        y = above + r * CELL
        draw.text((left - 6, y + CELL // 2), names[r], fill=INK, font=label_font, anchor="rm")
        for c in range(columns):
            x, rate = left + c * CELL, float(rates[r, c])
            fill = tuple(int(255 * (1 - k * rate)) for k in (1.0, 0.7, 0.3))  # white to dark blue
            draw.rectangle((x, y, x + CELL, y + CELL), fill=fill, outline=GRID)
            count = int(table[r, c])
            if count:
                draw.text((x + CELL // 2, y + CELL // 2), str(count), font=count_font, anchor="mm",
                          fill="white" if rate > 0.5 else INK)
    for c, name in enumerate(column_names):  # column names written upwards, ending just above their column
        width = int(label_font.getlength(name)) + 2
        label = Image.new("RGB", (width, CELL), "white")
        ImageDraw.Draw(label).text((0, CELL // 2), name, fill=INK, font=label_font, anchor="lm")
        image.paste(label.rotate(90, expand=True), (left + c * CELL, above - 6 - width))
    return image


def picture_tensor(picture: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [0, 1] (TrainLogger.image)."""
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255  # a copy: PIL's buffer is read-only
