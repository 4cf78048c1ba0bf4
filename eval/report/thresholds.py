"""Each identity model's same-person decision threshold, shared by Tab. 1 (leakage) and Tab. 8 (recovered
faces verified as their person)."""
from __future__ import annotations

import numpy as np

from eval.identity.metrics import best_threshold
from eval.report.context import Context


def decision_thresholds(ctx: Context, notes: list[str]) -> dict:
    """Each model's decision threshold: the configured one, else the best one on the pairs file, else none."""
    thresholds = {}
    for model in ctx.models:
        configured = ctx.config.identity.models[model].match_threshold
        result = ctx.pair_results.get(model)
        if configured is not None:
            thresholds[model] = float(configured)
        elif result is not None and (~np.isnan(result.distances)).any():
            ok = ~np.isnan(result.distances)
            thresholds[model] = best_threshold(result.distances[ok], ctx.pairs_same[ok])
            notes.append(f"{model}: no match_threshold configured; using {thresholds[model]:.4f}, the threshold "
                         f"that best separates the {int(ok.sum())} pairs of {ctx.config.identity.pairs} with faces "
                         "(same person iff distance <= threshold, chosen on all pairs).")
        else:
            why = "its pairs have no face" if result is not None else "config.identity.pairs is empty"
            notes.append(f"{model} left out: no decision threshold (config.identity.models.{model}.match_threshold "
                         f"unset and {why}).")
    return thresholds
