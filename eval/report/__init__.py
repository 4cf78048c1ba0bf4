r"""The one command: score de-identification methods' output folders and write the paper's tables.

  python -m eval.report --config=configs/eval_real_photos.py[:VARIANT] --out=DIR [--config.x.y=V ...]

The config (``get_config(arg)``; see configs/eval_base.py for the schema, configs/eval_real_photos.py
and configs/eval_mema.py) names the originals, the methods' folders (layout in eval/inputs.py),
reference methods to generate, and the models and weight files of each metric. Paths are relative
to the current directory.

Writes into DIR:
  tables.md                    every table, each with note lines saying what was left out and why
  tab1_leakage.csv             Tab. 1: identity-leakage percentage of generated images per identity model, Average
  tab2_wasserstein.csv         Tab. 2: W1 between two label sets (disease, age, gender)
  tab3_medical.csv             Tab. 3: disease accuracy (per class, All, Top1), segmentation Dice/Jaccard
  tab4_kappa.csv               Tab. 4: Cohen's kappa of diagnoses on original vs de-identified images
  tab5_id_dis.csv              Tab. 5: ID-Dis per identity model
  tab6_matching.csv            Tab. 6: face-matching rate per identity model
  tab7_landmark_gaze.csv       Tab. 7: dlib landmark error (all/eye/mouth/nose), L2CS gaze error
  tab8_reversibility.csv       Tab. 8: recovered images: ID-Dis, PSNR, LPIPS, Med-Class
  verification.csv             identity models on a labelled pairs file (LFW protocol)
  per_image/<method>.csv       every per-image value behind the tables
  grids/<method>.png           examples: original | de-identified | recovered
  reference/<name>/            reference method folders generated for this report

Per-method files found by convention in a method folder: ``diagnoses.csv`` (columns image,diagnosis;
image = the original's name) for Tab. 4, ``segmentation/<image_id>.png`` (nnU-Net predictions on
the de-identified validation images) for Tab. 3's Dice and Jaccard.

A metric whose model or weights are not configured is left out with a note; a configured weight
file that does not exist stops the run with an error naming it.

The package: ``context`` loads and checks the inputs and models once (``context.load``) and
computes scores on first use; ``scoring`` holds the scoring steps; ``tools`` the models and the
notes on what is not configured; ``table`` the Table and its formats; one module per table
(``tab1_leakage`` ... ``tab8_recovery``, ``verification``), each with ``build(ctx) -> Table``, listed
in ``TABLES`` in the order of tables.md; ``per_method`` the per-image CSVs and grids. A new table is
a new module added to ``TABLES``.
"""
from __future__ import annotations

import time
from pathlib import Path

from eval.report import (context, per_method, tab1_leakage, tab2_label_distance, tab3_medical, tab4_agreement,
                         tab5_id_dis, tab6_matching, tab7_utilities, tab8_recovery, verification)
from eval.report.context import Context, ReportConfigError
from eval.report.table import Table, write_text

TABLES = (tab1_leakage, tab2_label_distance, tab3_medical, tab4_agreement, tab5_id_dis, tab6_matching,
          tab7_utilities, tab8_recovery, verification)

__all__ = ["TABLES", "Context", "ReportConfigError", "Table", "run"]


def run(config, out_dir) -> dict[str, Table]:
    """Scores every configured method and writes the report; returns the tables by key."""
    out_dir = Path(out_dir)
    t_start = time.time()
    ctx = context.load(config, out_dir)
    tables = [module.build(ctx) for module in TABLES]
    for method in ctx.methods:
        per_method.write(ctx, method)
    for table in tables:
        write_text(out_dir / f"{table.key}.csv", table.csv_text())
    split = f", split {config.originals.split}" if config.originals.split else ""
    header = (f"# De-identification report\n\nOriginals: {ctx.originals.root} ({len(ctx.originals)} images{split}). "
              f"Methods: {', '.join(m.name for m in ctx.methods)}. Time: {time.time() - t_start:.0f} s.\n\n")
    write_text(out_dir / "tables.md", header + "\n".join(t.markdown() for t in tables))
    return {t.key: t for t in tables}
