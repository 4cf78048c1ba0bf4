r"""Tab. 2: Wasserstein distance between label sets (disease, age, gender): per configured row of
eval.report (config.label_distances), or on its own for sampled sets against the real one:

  python -m eval.report.tab2_label_distance --real data/mema_synth_64_patients --real-split train \
      --row "Random sampling=runs/mema/random" --row "Real-guided sampling=runs/mema/injected" --out runs/mema/tables

writes ``<out>/tab2_wasserstein.md`` and ``.csv``.  Age distances are W1 of ages / ``--age-scale``
(default 100: ages in centuries, on the scale of the paper's values); disease and gender are total
variation (W1 under the 0/1 ground distance).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from eval.agreement import label_distribution_distances
from eval.report.table import Table, number, text, write_text
from mema_jax.data import layout
from mema_jax.errors import InputError

KEY = "tab2_wasserstein"
TITLE = "Tab. 2: Wasserstein distance between label distributions (lower = closer)"
NOTE = "disease and gender: total variation (W1 under the 0/1 ground distance); age: W1 of ages / age_scale."


def new_table() -> Table:
    return Table(KEY, TITLE, ["Rows", "Disease", "Age", "Gender"], [text, number(3), number(3), number(3)])


def distance_row(name: str, records_a: Sequence[layout.Record], records_b: Sequence[layout.Record],
                 age_scale: float, where: str) -> list:
    try:
        d = label_distribution_distances(records_a, records_b, age_scale=age_scale)
    except ValueError as e:  # a set without any age or gender
        raise InputError(f"{where}: {e}") from None
    return [name, d["Disease"], d["Age"], d["Gender"]]


def build(ctx) -> Table:
    table = new_table()
    if not ctx.config.label_distances:
        table.notes.append("left out: no label sets configured (config.label_distances.<row> = {a, b, age_scale}).")
        return table
    for name, entry in sorted(ctx.config.label_distances.items()):
        a, b = layout.read_dataset(entry.a, verify_images=False), layout.read_dataset(entry.b, verify_images=False)
        table.rows.append(distance_row(name, a.records, b.records, entry.age_scale, f"{entry.a} vs {entry.b}"))
    table.notes.append(NOTE)
    return table


def generated_vs_real(real_root, rows: Sequence[tuple[str, str]], *, real_split: str = "",
                      age_scale: float = 100.0) -> Table:
    """One row per generated MeMa folder: its labels against the real set's (one split or all)."""
    real = [r for r in layout.read_dataset(real_root, verify_images=False).records if not real_split or r.split == real_split]
    if not real:
        raise InputError(f"{Path(real_root) / layout.LABELS_FILE}: no rows in split {real_split!r}")
    table = new_table()
    sizes = []
    for name, folder in rows:
        generated = layout.read_dataset(folder, verify_images=False).records
        table.rows.append(distance_row(name, generated, real, age_scale, str(Path(folder) / layout.LABELS_FILE)))
        sizes.append(f"{name} = {folder} ({len(generated)} images)")
    table.notes.append(NOTE.replace("age_scale", f"{age_scale:g}"))
    table.notes.append(f"real set {real_root} (split {real_split or 'all'}, {len(real)} images); {'; '.join(sizes)}.")
    return table


def write(table: Table, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / f"{KEY}.md", out / f"{KEY}.csv"
    write_text(md, table.markdown())
    write_text(csv_path, table.csv_text())
    return md, csv_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.report.tab2_label_distance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", required=True, help="the real MeMa folder")
    parser.add_argument("--real-split", default="", help="compare with one split only (default: all)")
    parser.add_argument("--row", action="append", required=True, help='"NAME=GENERATED_FOLDER", repeatable')
    parser.add_argument("--age-scale", type=float, default=100.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = []
    for item in args.row:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--row {item!r}: expected NAME=FOLDER")
        rows.append((name, folder))
    try:
        table = generated_vs_real(args.real, rows, real_split=args.real_split, age_scale=args.age_scale)
    except InputError as e:
        print(f"eval.report.tab2_label_distance: {e}", file=sys.stderr)
        return 1
    md, _ = write(table, Path(args.out))
    print(md.read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
