"""One paper table (raw values, their formats, notes) and the text it is written as: a markdown
section of tables.md and a CSV."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Callable, Sequence

from mema_jax.fileio import atomic_write_bytes


def number(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def percent(v: float) -> str:
    return f"{100 * v:.2f}%"


def percent_value(v: float) -> str:
    return f"{v:.2f}%"   # values already in percent (Tab. 1, as the paper prints it)


def text(v) -> str:
    return str(v)


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclasses.dataclass
class Table:
    """One paper table: ``rows`` hold raw values (NaN or None = not available)."""
    key: str          # file name of its CSV, without .csv
    title: str
    columns: list[str]
    formats: list[Callable]
    rows: list[list] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add_columns(self, names: Sequence[str], fmt: Callable) -> None:
        self.columns += names
        self.formats += [fmt] * len(names)

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.rows:
            lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
            for row in self.rows:
                cells = ["n/a" if missing(v) else fmt(v) for v, fmt in zip(row, self.formats)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        lines += [f"- Note: {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def csv_text(self) -> str:
        return csv_text(self.columns, self.rows)


def csv_text(columns: Sequence[str], rows) -> str:
    """A header and rows of raw values; a missing value is an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if missing(v) else v for v in row])
    return buf.getvalue()


def write_text(path: Path, content: str) -> None:
    atomic_write_bytes(path, content.encode())
