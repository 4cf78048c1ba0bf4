"""Tab. 2: Wasserstein distance between two label sets (disease, age, gender), per configured row
(config.label_distances)."""
from __future__ import annotations

from eval.agreement import label_distribution_distances
from eval.report.context import Context
from eval.report.table import Table, number, text
from mema_jax.data import layout

KEY = "tab2_wasserstein"
TITLE = "Tab. 2: Wasserstein distance between label distributions (lower = closer)"


def build(ctx: Context) -> Table:
    table = Table(KEY, TITLE, ["Rows", "Disease", "Age", "Gender"], [text, number(3), number(3), number(3)])
    if not ctx.config.label_distances:
        table.notes.append("left out: no label sets configured (config.label_distances.<row> = {a, b, age_scale}).")
        return table
    for name, entry in sorted(ctx.config.label_distances.items()):
        a, b = layout.read_dataset(entry.a, verify_images=False), layout.read_dataset(entry.b, verify_images=False)
        d = label_distribution_distances(a.records, b.records, age_scale=entry.age_scale)
        table.rows.append([name, d["Disease"], d["Age"], d["Gender"]])
    table.notes.append("disease and gender: total variation (W1 under the 0/1 ground distance); age: W1 of "
                       "ages / age_scale.")
    return table
