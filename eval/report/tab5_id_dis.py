"""Tab. 5: ID-Dis between each original and its de-identified image, per identity model."""
from __future__ import annotations

from eval.report import tools
from eval.report.context import Context
from eval.report.table import Table, number, text

KEY = "tab5_id_dis"
TITLE = "Tab. 5: ID-Dis (original vs de-identified; higher = better de-identified)"


def build(ctx: Context) -> Table:
    models = ctx.models
    table = Table(KEY, TITLE, ["Method", "Rev", *models], [text, text, *[number(4)] * len(models)],
                  notes=ctx.notes.on(*tools.IDENTITY))
    for method in ctx.methods:
        id_dis = ctx.deid(method).id_dis
        for model, dist in id_dis.items():
            if dist.n_skipped:
                table.notes.append(f"{method.name}, {model}: {dist.n_skipped} of {len(ctx.originals)} pairs without "
                                   "a face left out of the mean.")
        table.rows.append([method.name, method.rev, *[id_dis[m].mean for m in models]])
    if models:
        how = ("each output embedded at the face found on its original"
               if ctx.config.identity.faces_from_originals else "each image with its own face detection")
        table.notes.append(f"ID-Dis = Euclidean distance of L2-normalised features; {how}.")
    return table
