"""Tab. 8: the recovered images of reversible methods (``<method_dir>/recovered/``) against the
originals: ID-Dis per identity model, PSNR, LPIPS and the disease accuracy on them (Med-Class)."""
from __future__ import annotations

from eval.report import tools
from eval.report.context import Context
from eval.report.scoring import column_mean, disease_accuracy
from eval.report.table import Table, number, percent, text

KEY = "tab8_reversibility"
TITLE = "Tab. 8: recovered images of reversible methods (ID-Dis and LPIPS: lower = better)"


def build(ctx: Context) -> Table:
    models = ctx.models
    table = Table(KEY, TITLE, ["Method", *[f"ID-Dis {m}" for m in models], "PSNR (dB)", "LPIPS", "Med-Class"],
                  [text, *[number(4)] * len(models), number(2), number(4), percent],
                  notes=ctx.notes.on(*tools.IDENTITY, tools.LPIPS_BACKBONE, tools.CLASSIFIER))
    for method in ctx.methods:
        if not method.reversible:
            continue
        recovered = ctx.recovered(method)
        accuracy = disease_accuracy(ctx.tools.classifier, ctx.originals, recovered.predictions)
        table.rows.append([method.name, *[recovered.id_dis[m].mean for m in models],
                           column_mean(recovered.per_image, "psnr"), column_mean(recovered.per_image, "lpips"),
                           accuracy["All"] if accuracy else None])
    if not table.rows:
        table.notes.append("no reversible method configured "
                           "(config.methods.<name>.reversible with a recovered/ folder).")
    return table
