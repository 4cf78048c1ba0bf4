"""Tab. 8: the recovered images of reversible methods (``<method_dir>/recovered/``) against the
originals: ID-Dis per identity model, the share verified as the original's person (distance at most the
model's decision threshold, as in Tab. 1), PSNR, LPIPS and the disease accuracy on them (Med-Class)."""
from __future__ import annotations

import numpy as np

from eval.report import tools
from eval.report.context import Context
from eval.report.scoring import column_mean, disease_accuracy
from eval.report.table import Table, number, percent, text
from eval.report.thresholds import decision_thresholds

KEY = "tab8_reversibility"
TITLE = "Tab. 8: recovered images of reversible methods (ID-Dis and LPIPS: lower = better)"


def build(ctx: Context) -> Table:
    models = ctx.models
    notes = ctx.notes.on(*tools.IDENTITY, tools.LPIPS_BACKBONE, tools.CLASSIFIER)
    reversible = [method for method in ctx.methods if method.reversible]
    thresholds = decision_thresholds(ctx, notes) if reversible else {}
    verified = [m for m in models if m in thresholds]
    table = Table(KEY, TITLE, ["Method", *[f"ID-Dis {m}" for m in models], *[f"Same person {m}" for m in verified],
                               "PSNR (dB)", "LPIPS", "Med-Class"],
                  [text, *[number(4)] * len(models), *[percent] * len(verified), number(2), number(4), percent],
                  notes=notes)
    for method in reversible:
        recovered = ctx.recovered(method)
        accuracy = disease_accuracy(ctx.tools.classifier, ctx.originals, recovered.predictions)
        table.rows.append([method.name, *[recovered.id_dis[m].mean for m in models],
                           *[_verified(recovered.id_dis[m].per_pair, thresholds[m]) for m in verified],
                           column_mean(recovered.per_image, "psnr"), column_mean(recovered.per_image, "lpips"),
                           accuracy["All"] if accuracy else None])
    if verified:
        table.notes.append("Same person: the share of recovered images (with a face) whose distance to their original "
                           "is within the model's decision threshold.")
    if not table.rows:
        table.notes.append("no reversible method configured "
                           "(config.methods.<name>.reversible with a recovered/ folder).")
    return table


def _verified(distances: np.ndarray, threshold: float) -> float | None:
    found = distances[~np.isnan(distances)]
    return float((found <= threshold).mean()) if len(found) else None
