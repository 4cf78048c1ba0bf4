"""Tab. 1: identity leakage: the percentage of generated images whose nearest real patient is within
each identity model's decision threshold (config.leakage; inputs listed by context.load)."""
from __future__ import annotations

from eval.identity import face_found
from eval.identity.metrics import identity_leakage_rate
from eval.report import tools
from eval.report.context import Context
from eval.report.scoring import embed_folder, nanmean
from eval.report.table import Table, percent_value, text
from eval.report.thresholds import decision_thresholds

KEY = "tab1_leakage"
TITLE = ("Tab. 1: identity leakage of generated images (% whose nearest real patient is within the threshold; "
         "lower = better)")


def build(ctx: Context) -> Table:
    table = Table(KEY, TITLE, ["Row"], [text], notes=ctx.notes.on(*tools.IDENTITY))
    config, leakage = ctx.config, ctx.leakage
    if not leakage.rows:
        table.notes.append("left out: no rows configured (config.leakage.rows.<row> = {generated or method}, "
                           "config.leakage.gallery).")
        return table
    if not ctx.tools.identity:
        return table   # the identity note says why
    thresholds = decision_thresholds(ctx, table.notes)
    models = sorted(thresholds)
    if not models:
        table.notes.append("no identity model has a decision threshold: nothing to score.")
        return table
    table.add_columns([*models, "Average"], percent_value)
    # The real-photo config's gallery is its originals' folder: those photos are embedded already.
    known = {o.path.resolve(): i for i, o in enumerate(ctx.originals)}
    gallery_features = embed_folder(leakage.gallery, ctx.tools, models, config.batch_size, known, ctx.base.features)
    gallery_ids = [g.identity for g in leakage.gallery]
    sizes = []
    for name, generated, method_name in leakage.rows:
        if method_name:
            features = ctx.deid(ctx.method(method_name)).features
            sizes.append(f"{name} = method {method_name} ({len(ctx.originals)} de-identified images)")
        else:
            features = embed_folder(generated, ctx.tools, models, config.batch_size)
            sizes.append(f"{name} = {generated.root} ({len(generated)} images)")
        values = []
        for model in models:
            match = identity_leakage_rate(features[model], gallery_features[model], gallery_ids, thresholds[model])
            values.append(100 * match.rate)
            if match.n_skipped:
                table.notes.append(f"{name}, {model}: {match.n_skipped} of {match.n_skipped + match.n_queries} "
                                   "generated images without a face, left out of the percentage.")
        table.rows.append([name, *values, nanmean(values)[0]])
    for model in models:
        faceless = int((~face_found(gallery_features[model])).sum())
        if faceless:
            table.notes.append(f"gallery, {model}: {faceless} of {len(gallery_ids)} photos without a face left out.")
    how = ("embedded at the face found on its original" if config.identity.faces_from_originals
           else "with its own face detection")
    table.notes.append(f"gallery {config.leakage.gallery} ({len(gallery_ids)} photos of {len(set(gallery_ids))} "
                       f"people); rows: {'; '.join(sizes)}. Generated folders use each model's own face detection; "
                       f"a method's de-identified image is {how} (as in Tab. 5). Thresholds (distance of "
                       f"L2-normalised features): {', '.join(f'{m} {t:.4f}' for m, t in thresholds.items())}. "
                       "Average = mean over the models present.")
    return table
