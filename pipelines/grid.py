"""Labelled image grids (AUTOMATIC1111's X/Y plot): one prompt across adapter weights or checkpoints."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128  # small images (the toy model's 64 px) are enlarged so the grid stays readable


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def image_grid(
    images: Sequence[Sequence[Image.Image]],
    col_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: str = "",
    min_cell: int = MIN_CELL,
) -> Image.Image:
    """Rows of images -> one RGB image with column labels on top and row labels on the left.

    Every cell is resized to the first image's size (enlarged with nearest-neighbour to at least
    `min_cell` px a side, so tiny images stay crisp).
    """
    rows = [list(r) for r in images if len(r)]
    if not rows:
        raise ValueError("image_grid: no images")
    ncols = max(len(r) for r in rows)
    w0, h0 = rows[0][0].size
    scale = max(1, -(-min_cell // max(1, min(w0, h0))))  # ceil
    cw, ch = w0 * scale, h0 * scale
    font = _font(max(12, min(cw, ch) // 9))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 6
    top = (max((_text_size(probe, t, font)[1] for t in col_labels), default=0) + 2 * pad) if col_labels else 0
    title_h = (_text_size(probe, title, font)[1] + 2 * pad) if title else 0
    left = (max((_text_size(probe, t, font)[0] for t in row_labels), default=0) + 2 * pad) if row_labels else 0
    grid = Image.new("RGB", (left + ncols * cw, title_h + top + len(rows) * ch), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        tw, _ = _text_size(draw, title, font)
        draw.text(((grid.width - tw) // 2, pad), title, fill="black", font=font)
    for c, label in enumerate(col_labels[:ncols]):
        tw, _ = _text_size(draw, label, font)
        draw.text((left + c * cw + (cw - tw) // 2, title_h + pad), label, fill="black", font=font)
    for r, row in enumerate(rows):
        y = title_h + top + r * ch
        if r < len(row_labels):
            _, th = _text_size(draw, row_labels[r], font)
            draw.text((pad, y + (ch - th) // 2), row_labels[r], fill="black", font=font)
        for c, img in enumerate(row):
            cell = img.convert("RGB").resize((cw, ch), Image.NEAREST if scale > 1 else Image.LANCZOS)
            grid.paste(cell, (left + c * cw, y))
    return grid


__all__ = ["image_grid"]
