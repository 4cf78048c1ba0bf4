"""Tab. 3: medical utility of the de-identified images: disease accuracy of the fine-tuned
classifier (per class, All, Top1) and the Dice / Jaccard of each method's nnU-Net predictions
(``<method_dir>/segmentation/<image_id>.png``) against config.medical.segmentation_truth."""
from __future__ import annotations

import math
from pathlib import Path

from eval.medical.segmentation import score_mask_folders
from eval.report import tools
from eval.report.context import Context
from eval.report.scoring import disease_accuracy
from eval.report.table import Table, number, percent, text

KEY = "tab3_medical"
TITLE = "Tab. 3: medical utility (disease accuracy on de-identified images, segmentation)"
SEGMENTATION_DIR = "segmentation"
ORIGINAL_ROW = "original (not de-identified)"  # the classifier on the originals: the yardstick's accuracy


def build(ctx: Context) -> Table:
    classifier = ctx.tools.classifier
    classes = list(classifier.classes) if classifier else []
    table = Table(KEY, TITLE, ["Method", "Rev", "All", "Top1", *classes, "Dice", "Jaccard"],
                  [text, text, percent, percent, *[percent] * len(classes), number(4), number(4)],
                  notes=ctx.notes.on(tools.DISEASE_LABELS, tools.CLASSIFIER))
    accuracy_left_out = bool(table.notes)
    truth = ctx.config.medical.segmentation_truth
    original = disease_accuracy(classifier, ctx.originals, ctx.original_predictions)
    if original is not None:
        table.rows.append([ORIGINAL_ROW, "-", original.get("All"), original.get("Top1"),
                           *[original.get(c) for c in classes], float("nan"), float("nan")])
    for method in ctx.methods:
        accuracy = disease_accuracy(classifier, ctx.originals, ctx.deid(method).predictions)
        dice = jaccard = float("nan")
        seg_dir = method.dir / SEGMENTATION_DIR
        if truth and seg_dir.is_dir():
            seg = score_mask_folders(seg_dir, Path(truth))
            dice, jaccard = seg.dice, seg.jaccard
        elif truth:
            table.notes.append(f"{method.name}: no nnU-Net predictions at {seg_dir}; Dice/Jaccard left out.")
        if accuracy is not None or not math.isnan(dice):
            acc = accuracy or {}
            table.rows.append([method.name, method.rev, acc.get("All"), acc.get("Top1"),
                               *[acc.get(c) for c in classes], dice, jaccard])
    if not table.rows and not accuracy_left_out:
        table.notes.append("no method has disease predictions or segmentation predictions.")
    if not truth:
        table.notes.append("segmentation left out: config.medical.segmentation_truth (nnU-Net labelsTs folder) "
                           "not set.")
    return table
