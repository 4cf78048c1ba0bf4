"""Tab. 4: Cohen's kappa between the diagnoses made on the original images
(config.agreement.diagnoses_original) and on each method's de-identified ones
(``<method_dir>/diagnoses.csv``, columns image,diagnosis; image = the original's name)."""
from __future__ import annotations

from eval.agreement import cohen_kappa
from eval.report.context import Context, read_diagnoses
from eval.report.table import Table, number, text

KEY = "tab4_kappa"
TITLE = "Tab. 4: Cohen's kappa of diagnoses, original vs de-identified"
DIAGNOSES_FILE = "diagnoses.csv"


def build(ctx: Context) -> Table:
    table = Table(KEY, TITLE, ["Method"], [text])
    if ctx.diagnoses_original is None:
        table.notes.append("left out: no diagnoses of the original images configured (config.agreement."
                           "diagnoses_original, columns image,diagnosis; each method's in <method_dir>/diagnoses.csv).")
        return table
    kappas = []
    for method in ctx.methods:
        diagnoses_file = method.dir / DIAGNOSES_FILE
        if diagnoses_file.is_file():
            kappas.append((method.name, cohen_kappa(ctx.diagnoses_original, read_diagnoses(diagnoses_file, ctx.names))))
        else:
            table.notes.append(f"{method.name}: no {DIAGNOSES_FILE} in {method.dir}; left out.")
    classes = sorted({c for _, k in kappas for c in k if c != "All"})
    table.add_columns(["All", *classes], number(4))
    table.rows = [[name, k["All"], *[k.get(c) for c in classes]] for name, k in kappas]
    return table
