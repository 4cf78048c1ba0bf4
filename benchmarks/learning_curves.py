r"""A training run's learning curves as a markdown table: every eval/ metric at each evaluation, and each
train/ term (the mean of its logged values since the previous evaluation), from the run's metrics.csv.

    python benchmarks/learning_curves.py --workdir runs/pipeline/deid --out benchmarks/results/deid_curves.md
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def curves(metrics_csv: Path) -> tuple[list[int], dict[str, dict[int, float]]]:
    """(evaluation steps, {column: {evaluation step: value}})."""
    rows = [(int(r["step"]), r["name"], float(r["value"])) for r in csv.DictReader(open(metrics_csv, newline=""))]
    eval_steps = sorted({s for s, n, _ in rows if n.startswith("eval/")})
    table: dict[str, dict[int, float]] = defaultdict(dict)
    for s, n, v in rows:
        if n.startswith("eval/"):
            table[n][s] = v
    for name in sorted({n for _, n, _ in rows if n.startswith("train/")}):
        previous = 0
        for s in eval_steps:
            values = [v for step, n, v in rows if n == name and previous < step <= s]
            if values:
                table[name][s] = sum(values) / len(values)
            previous = s
    return eval_steps, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    steps, table = curves(Path(args.workdir) / "metrics.csv")
    lines = [f"# {args.title or 'Learning curves of ' + args.workdir}", "",
             "| metric | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name in sorted(table, key=lambda n: (not n.startswith("eval/"), n)):
        lines.append(f"| {name} | " + " | ".join(f"{table[name][s]:.3f}" if s in table[name] else "" for s in steps) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
