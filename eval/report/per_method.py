"""Each method's files beside the tables: every per-image value (``per_image/<method>.csv``) and a
grid of examples (``grids/<method>.png``: original | de-identified | recovered)."""
from __future__ import annotations

from pathlib import Path

from eval import grid
from eval.inputs import load_rgb
from eval.report.context import Context, Method
from eval.report.table import csv_text, write_text


def write(ctx: Context, method: Method) -> None:
    per_image = {name: dict(row) for name, row in ctx.deid(method).per_image.items()}
    if method.reversible:
        for name, values in ctx.recovered(method).per_image.items():
            per_image[name].update({f"recovered_{k}": v for k, v in values.items()})
    write_per_image(ctx.out_dir / "per_image" / f"{method.name}.csv", per_image)
    write_grid(ctx.out_dir / "grids" / f"{method.name}.png", method, ctx.config.grid)


def write_per_image(path: Path, per_image: dict) -> None:
    columns = sorted({c for row in per_image.values() for c in row})
    write_text(path, csv_text(["image", *columns], ([name, *[row.get(c) for c in columns]]
                                                     for name, row in per_image.items())))


def write_grid(path: Path, method: Method, settings) -> None:
    """``settings``: config.grid (num_examples, cell_height)."""
    count = min(settings.num_examples, len(method.deid))
    if count <= 0:
        return
    recovered = {p.name: p.output for p in method.recovered}
    rows = []
    for pair in method.deid[:count]:
        row = [load_rgb(pair.original.path), load_rgb(pair.output)]
        if method.reversible:
            row.append(load_rgb(recovered[pair.name]))
        rows.append(row)
    titles = ["original", f"{method.name}", "recovered"][:len(rows[0])]
    grid.write_grid(path, rows, titles, settings.cell_height)
