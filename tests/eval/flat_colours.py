"""MeMa folders whose diseases are flat colours with pixel noise: a classifier separates them in a
few epochs, so tests of what reads a classifier's output know the answer."""
from __future__ import annotations

import numpy as np

from mema_jax.data.layout import DISEASES, Record, write_labels, write_png

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]  # one per disease, in layout.DISEASES' order


def flat_colour_rows(rng, split_sizes: dict[str, int], size: int = 32) -> list[tuple]:
    """(image_id, image, disease, split): ``split_sizes[split]`` images per disease and split, each
    its disease's colour plus uniform noise in [-12, 12]."""
    return [(f"{d}_{s}{k}", np.clip(np.array(c) + rng.integers(-12, 13, (size, size, 3)), 0, 255).astype(np.uint8), d, s)
            for d, c in zip(DISEASES, COLOURS, strict=True) for s, n in split_sizes.items() for k in range(n)]


def write_mema(root, rows):
    """A MeMa folder (images/, labels.csv) of (image_id, image, disease, split) rows; every person 40, female."""
    records = []
    for image_id, image, disease, split in rows:
        write_png(root / "images" / f"{image_id}.png", image)
        records.append(Record(image_id, f"images/{image_id}.png", disease, "", 40, "female", split, "", ""))
    write_labels(root, records)
    return root
