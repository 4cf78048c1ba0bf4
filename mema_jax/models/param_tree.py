"""Parameter trees addressed by '/'-joined paths ("down_blocks_0/resnets_0/conv1/kernel").

Adapters (LoRA, IP-Adapter) are separate trees that name their place in the base tree by path:
these helpers flatten, rebuild and combine such trees without copying what they do not change.
Flax ``Partitioned`` boxes count as leaves.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from mema_jax.core import sharding


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten(tree) -> dict[str, Any]:
    """{"a/b/c": leaf} for a nested dict."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=sharding.is_box)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def replace(tree: Mapping, new_leaves: Mapping[str, Any]) -> dict:
    """A copy of ``tree`` with the leaves at ``new_leaves``' paths replaced; untouched subtrees are
    shared, not copied.  Every path must exist."""
    grouped: dict[str, dict[str, Any]] = {}
    for path, value in new_leaves.items():
        head, _, rest = path.partition("/")
        grouped.setdefault(head, {})[rest] = value
    out = dict(tree)
    for head, rests in grouped.items():
        if head not in tree:
            raise KeyError(f"no parameter at {head!r} (under {sorted(tree)[:5]}...)")
        if "" in rests:
            out[head] = rests[""]
        else:
            out[head] = replace(tree[head], rests)
    return out


def merge(base: Mapping, extra: Mapping) -> dict:
    """The union of two trees whose leaves do not overlap (a base model and an adapter's own layers)."""
    out = dict(base)
    for key, value in extra.items():
        if key in base:
            if not (isinstance(base[key], Mapping) and isinstance(value, Mapping)):
                raise ValueError(f"both trees have a leaf at {key!r}")
            out[key] = merge(base[key], value)
        else:
            out[key] = value
    return out


def split(tree: Mapping, belongs) -> tuple[dict, dict]:
    """(leaves whose path ``belongs(path)``, the rest), as two trees."""
    flat = flatten(tree)
    return (unflatten({p: v for p, v in flat.items() if belongs(p)}),
            unflatten({p: v for p, v in flat.items() if not belongs(p)}))
