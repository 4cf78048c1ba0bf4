"""PNG grid of examples for one method: a row per example, columns original | de-identified | recovered."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from mema_jax.data import layout

LABEL_HEIGHT = 14
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def _cell(image: np.ndarray, height: int) -> Image.Image:
    im = Image.fromarray(image)
    width = max(1, round(im.width * height / im.height))
    return im.resize((width, height), Image.BILINEAR)


def example_grid(rows: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str],
                 cell_height: int = 160, row_titles: Sequence[str] = ()) -> Image.Image:
    """Images of each row side by side, rows stacked, with column titles on top (and row titles on the left)."""
    if not rows:
        raise ValueError("no examples to draw")
    cells = [[_cell(image, cell_height) for image in row] for row in rows]
    widths = [max(row[c].width for row in cells) for c in range(len(column_titles))]
    margin = 8 + 7 * max((len(t) for t in row_titles), default=0) if row_titles else 0
    grid = Image.new("RGB", (margin + sum(widths), LABEL_HEIGHT + cell_height * len(cells)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for r, title in enumerate(row_titles):
        draw.text((2, LABEL_HEIGHT + r * cell_height + cell_height // 2 - 6), title, fill=TEXT)
    x = margin
    for c, title in enumerate(column_titles):
        draw.text((x + 2, 1), title, fill=TEXT)
        for r, row in enumerate(cells):
            grid.paste(row[c], (x, LABEL_HEIGHT + r * cell_height))
        x += widths[c]
    return grid


def write_grid(path, rows: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str],
               cell_height: int = 160) -> None:
    buf = io.BytesIO()
    example_grid(rows, column_titles, cell_height).save(buf, format="PNG")
    layout.atomic_write_bytes(path, buf.getvalue())
