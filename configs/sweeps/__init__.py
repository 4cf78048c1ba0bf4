"""Sweep files (``python -m launch.sweep run --sweep=configs/sweeps/NAME.py[:ARG]``) and the plain
helpers they build their runs with.  A sweep file defines ``get_sweep(arg=None)`` returning plain
data: ``{"config": "configs/NAME.py[:ARG]", "runs": [overrides, ...], "fixed": {...}}`` (``fixed``
optional: overrides applied to every run), each overrides dict mapping a config key path to a value."""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def product(axes: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any] | None = None) -> list[dict]:
    """Every combination of the axes' values (the last axis varies fastest), plus ``fixed``."""
    keys = list(axes)
    return [{**dict(zip(keys, values)), **dict(fixed or {})} for values in itertools.product(*(axes[k] for k in keys))]


def zipped(axes: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any] | None = None) -> list[dict]:
    """The i-th value of every axis together (all axes the same length), plus ``fixed``."""
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zipped axes need equal lengths, got {lengths}")
    keys = list(axes)
    return [{**dict(zip(keys, values)), **dict(fixed or {})} for values in zip(*(axes[k] for k in keys))]


def chain(*groups: Iterable[Mapping[str, Any]]) -> list[dict]:
    """The runs of each group in turn (a run that repeats an earlier one is dropped)."""
    seen, out = set(), []
    for run in (dict(r) for g in groups for r in g):
        key = json.dumps(run, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(run)
    return out
