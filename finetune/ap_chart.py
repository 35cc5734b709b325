"""Per-class average precision as a picture people can read, in place of the confusion matrix for multi-label
evaluation: one horizontal bar per class that has a positive video, worst first, with its name and value."""

from __future__ import annotations

from PIL import Image, ImageDraw

from engine.tblog import font

from .confusion import INK, MARGIN

ROW, BAR_WIDTH = 16, 300
BAR, TRACK = (40, 90, 170), (235, 235, 235)


def ap_picture(per_class_ap: list[float | None], names: list[str]) -> Image.Image:
    """An RGB bar chart of `per_class_ap` (percent, None for classes without positives, which are left out and
    counted in the title), one row per class named by `names`, lowest AP at the top."""
    rows = sorted((ap, name) for ap, name in zip(per_class_ap, names) if ap is not None)
    label_font = font(12)
    left = MARGIN + max((int(label_font.getlength(n)) for _, n in rows), default=0) + 6
    left_out = len(per_class_ap) - len(rows)
    title = f"average precision per class (%), worst first; {left_out} classes without positives left out"
    width = max(left + BAR_WIDTH + 50, int(label_font.getlength(title)) + 2 * MARGIN)
    above = 2 * MARGIN + 14
    image = Image.new("RGB", (width, above + ROW * len(rows) + MARGIN), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=label_font)
    for r, (ap, name) in enumerate(rows):
        y = above + r * ROW
        draw.text((left - 6, y + ROW // 2), name, fill=INK, font=label_font, anchor="rm")
        draw.rectangle((left, y + 2, left + BAR_WIDTH, y + ROW - 2), fill=TRACK)
        draw.rectangle((left, y + 2, left + round(BAR_WIDTH * ap / 100), y + ROW - 2), fill=BAR)
        draw.text((left + BAR_WIDTH + 6, y + ROW // 2), f"{ap:.1f}", fill=INK, font=label_font, anchor="lm")
    return image
