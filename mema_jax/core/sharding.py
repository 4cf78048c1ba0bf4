"""Device mesh and logical-axis sharding: the one place rules become shardings.

Parameters and large activations carry *logical* axis names ("embed", "mlp",
"heads", "batch", ...).  A config holds the rules that map each logical name to
zero or more *mesh* axes ("data", "fsdp", "tensor").  Everything that needs a
sharding (parameter creation, optimizer state, checkpoints, weight loading,
batches) asks this module, so changing the rules in a config is all it takes
to change how a model is laid out.

A dimension that a mesh axis does not divide evenly is replicated along that
axis rather than failing: small layers (biases of 3 channels, a 77-token
position table) then simply stay whole, which is what one wants.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import logging

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes.  A name missing from the rules is replicated.
# Parameter axes: embed (model width, sharded FSDP-style), mlp/heads/vocab
# (tensor-parallel dims), conv_in/conv_out (input/output channels of conv
# kernels).  Activation axes start with "act_".
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("act_batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("norm", None),
    ("act_length", None),
    ("act_embed", None),
    ("act_height", None),
    ("act_width", None),
    ("act_channels", None),
)


def make_mesh(axis_sizes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ("data", "fsdp", "tensor") mesh; one size may be -1 (take the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {name: 1 for name in MESH_AXES}
    sizes.update(dict(axis_sizes or {"data": -1}))
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {dict(sizes)}")
        sizes[free[0]] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh {dict(sizes)} needs {total} devices, but {len(devices)} are available")
    shape = tuple(sizes[name] for name in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # pragma: no cover - odd topologies fall back to plain order
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def normalize_rules(rules: Iterable[Any] | None) -> tuple[tuple[str, Any], ...]:
    """Accepts rules as pairs (from a ConfigDict they arrive as lists) -> tuple of (name, axes)."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"a sharding rule is (logical_name, mesh_axes), got {rule!r}")
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"rule {name!r} names mesh axis {axis!r}; the mesh axes are {MESH_AXES}")
        out.append((str(name), axes))
    return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
    """Logical names of one array -> PartitionSpec, dropping mesh axes that don't divide the dim
    or that an earlier dimension already used."""
    table = dict(normalize_rules(rules))
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = table.get(name) if name is not None else None
        if axes is None:
            spec.append(None)
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        kept = []
        size = 1
        for axis in axes:
            n = mesh.shape[axis]
            if axis in used or n == 1 or dim % (size * n):
                continue
            kept.append(axis)
            size *= n
        used.update(kept)
        spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*spec)


def is_box(x) -> bool:
    """A flax ``Partitioned`` box: a parameter leaf carrying its logical axis names."""
    return isinstance(x, nn.Partitioned)


def tree_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree whose leaves may be flax ``Partitioned`` boxes (from eval_shape).

    Boxed leaves follow their logical names; plain leaves are replicated.  The result has the
    structure of the *unboxed* tree, ready for ``jit(out_shardings=...)``.
    """

    def leaf(x):
        if is_box(x):
            value = x.value
            names = x.names
            if len(names) != len(value.shape):
                raise ValueError(f"logical names {names} do not match shape {value.shape}")
            return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(leaf, abstract_tree, is_leaf=is_box)


# Parameters larger than this that the rules leave whole on every device are logged (see below).
DEFAULT_REPLICATED_WARNING_BYTES = 4 << 20
_warned_replicated: set[tuple[str, tuple[int, ...]]] = set()


def warn_replicated(abstract_tree, mesh: Mesh, rules, min_bytes: int = DEFAULT_REPLICATED_WARNING_BYTES) -> list[str]:
    """Logs, once per parameter, each leaf of at least ``min_bytes`` that the rules leave fully
    replicated on a mesh with fsdp > 1 -- how FSDP runs go out of memory at scale (a 1280x1280
    kernel without logical names, or a dimension no mesh axis divides).  Returns their names."""
    if mesh.shape.get("fsdp", 1) <= 1:
        return []
    flagged = []

    def check(path, x):
        value = x.value if is_box(x) else x
        shape = tuple(getattr(value, "shape", ()))
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(getattr(value, "dtype", np.float32)).itemsize
        if nbytes < min_bytes:
            return
        spec = logical_to_spec(x.names, shape, mesh, rules) if is_box(x) else PartitionSpec()
        if any(axis is not None for axis in spec):
            return
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        flagged.append(name)
        if (name, shape) not in _warned_replicated:
            _warned_replicated.add((name, shape))
            why = f"logical axes {tuple(x.names)}" if is_box(x) else "no logical axis names"
            logging.warning("sharding: parameter %s %s (%.1f MiB) is replicated on every device of mesh %s (%s; "
                            "no rule splits a dimension the mesh divides)", name, shape, nbytes / 2**20,
                            dict(mesh.shape), why)

    jax.tree_util.tree_map_with_path(check, abstract_tree, is_leaf=is_box)
    return flagged


def box_like(tree, boxed_template):
    """``tree``'s leaves in the boxes (logical names) of ``boxed_template`` (same structure unboxed)."""
    leaves, treedef = jax.tree.flatten(boxed_template, is_leaf=is_box)
    values = treedef.flatten_up_to(tree)
    return treedef.unflatten([nn.Partitioned(v, b.names) if is_box(b) else v for v, b in zip(values, leaves)])


def unbox(tree):
    return nn.meta.unbox(tree)


def batch_sharding(mesh: Mesh, rules, ndim: int, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding for an input batch: leading dim on the logical 'batch' axis, the rest replicated."""
    names = ("batch",) + (None,) * (ndim - 1)
    if shape is None:
        table = dict(normalize_rules(rules))
        axes = table.get("batch")
        return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x, logical_axes: Sequence[str | None]):
    """Activation sharding hint by logical names (no-op outside a mesh/rules context).

    Model code calls this on large activations; the trainer activates the rules with
    ``nn.logical_axis_rules`` and a mesh context, as flax's own helper expects.
    """
    return nn.with_logical_constraint(x, tuple(logical_axes))
