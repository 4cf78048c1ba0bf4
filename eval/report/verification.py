"""The identity models on a labelled pairs file (config.identity.pairs, LFW protocol): a check that
each model tells people apart before its numbers enter the other tables."""
from __future__ import annotations

from eval.report import tools
from eval.report.context import ORIGINAL_PAIRS, Context
from eval.report.scoring import nanmean
from eval.report.table import Table, number, percent, text

KEY = "verification"
TITLE = "Identity models on labelled pairs (LFW protocol, 10-fold threshold)"


def build(ctx: Context) -> Table:
    table = Table(KEY, TITLE, ["Model", "Accuracy", "Std", "Pairs", "Skipped", "Mean dist same", "Mean dist different"],
                  [text, percent, percent, text, text, number(4), number(4)],
                  notes=ctx.notes.on(tools.IDENTITY_WEIGHTS))
    if not ctx.config.identity.pairs:
        table.notes.append("left out: no pairs file configured "
                           "(config.identity.pairs, columns file_x,file_y,Decision).")
        return table
    same = ctx.pairs_same
    for name, result in sorted(ctx.pair_results.items()):
        v = result.verification
        table.rows.append([name, v.accuracy, v.accuracy_std, v.n_pairs, v.n_skipped,
                           nanmean(result.distances[same])[0], nanmean(result.distances[~same])[0]])
    if ctx.config.identity.pairs == ORIGINAL_PAIRS:
        pairs, _ = ctx.original_pairs
        people = len({ctx.originals.items[i].identity for i in pairs.ravel()})
        table.notes.append(f"pairs: {int(same.sum())} same-person and {int((~same).sum())} different-person pairs of "
                           f"the originals' own people ({people} people; drawn with seed 0; 10 shuffled folds).")
    else:
        table.notes.append(f"pairs: {ctx.config.identity.pairs}.")
    return table
