"""Tab. 6: face-matching rate: how often a de-identified image's nearest gallery image is its own
person, per identity model. The gallery is config.identity.gallery, else leave-one-out over the
originals when they carry identities."""
from __future__ import annotations

import dataclasses

import numpy as np

from eval.identity.metrics import face_matching_rate
from eval.inputs import load_rgb
from eval.report import tools
from eval.report.context import Context
from eval.report.table import Table, percent, text

KEY = "tab6_matching"
TITLE = "Tab. 6: face-matching rate of de-identified images (lower = better)"


@dataclasses.dataclass
class Gallery:
    """Where a de-identified image is searched for its person."""
    description: str
    features: dict          # model -> (G, D)
    ids: list
    exclude_self: bool      # leave-one-out over the originals themselves


def build(ctx: Context) -> Table:
    models = ctx.models
    table = Table(KEY, TITLE, ["Method", *models], [text, *[percent] * len(models)],
                  notes=ctx.notes.on(*tools.IDENTITY))
    if not models:
        return table
    gallery = _gallery(ctx)
    if gallery is None:
        table.notes.append("matching rate left out: no gallery configured (config.identity.gallery) and the "
                           "originals carry no identities to search among.")
        return table
    for method in ctx.methods:
        rates = _matching_rates(ctx, gallery, ctx.deid(method).features)
        table.rows.append([method.name, *[rates[m] for m in models]])
    thresholds = {m: ctx.config.identity.models[m].match_threshold for m in models}
    table.notes.append(f"{gallery.description}; matched = nearest gallery image is the same person"
                       f" (distance thresholds: {thresholds}, None = rank-1).")
    return table


def _gallery(ctx: Context) -> Gallery | None:
    """The configured gallery (listed by context.load), else the originals (None when they carry fewer than two
    identities)."""
    if ctx.gallery is not None:
        ids = [g.identity for g in ctx.gallery]
        images = [load_rgb(g.path) for g in ctx.gallery]
        features = {name: model.embed(images) for name, model in ctx.tools.identity.items()}
        return Gallery(f"gallery {ctx.config.identity.gallery} ({len(ids)} images)", features, ids, False)
    ids = [o.identity for o in ctx.originals]
    if sum(1 for i in ids if i) < 2:
        return None
    # A nearest neighbour drawn at random would be right this often (a few people with many photos raise it).
    eligible = [i for i in ids if i and ids.count(i) > 1]
    known = sum(1 for i in ids if i)
    chance = float(np.mean([(ids.count(i) - 1) / (known - 1) for i in eligible])) if eligible else 0.0
    return Gallery(f"leave-one-out over the originals: each de-identified image is searched among the OTHER "
                   f"originals ({len(eligible)} images whose person has another photo; "
                   f"chance level {100 * chance:.1f}%)",
                   ctx.base.features, ids, True)


def _matching_rates(ctx: Context, gallery: Gallery, features: dict) -> dict:
    query_ids = [o.identity for o in ctx.originals]
    rates = {}
    for model, feats in features.items():
        threshold = ctx.config.identity.models[model].match_threshold
        if not gallery.exclude_self:
            known = [i for i, q in enumerate(query_ids) if q]
            match = face_matching_rate(feats[known], gallery.features[model], gallery.ids,
                                       [query_ids[i] for i in known], threshold=threshold)
            rates[model] = match.rate
            continue
        matched, scored = 0, 0
        for i, identity in enumerate(query_ids):
            others = [j for j in range(len(query_ids)) if j != i and query_ids[j]]
            if not identity or identity not in {query_ids[j] for j in others}:
                continue   # no other photo of this person to find
            match = face_matching_rate(feats[i:i + 1], gallery.features[model][others],
                                       [query_ids[j] for j in others], [identity], threshold=threshold)
            matched += match.n_matched
            scored += match.n_queries
        rates[model] = matched / scored if scored else float("nan")
    return rates
