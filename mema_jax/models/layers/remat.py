"""Rematerialisation (activation checkpointing) per block, one policy vocabulary for every model."""
from __future__ import annotations

import jax
from flax import linen as nn

# "none": keep activations; "full": recompute each block in the backward pass; "dots": keep only
# matmul/conv outputs without batch dims (recompute the cheap element-wise work).
REMAT_POLICIES = ("none", "full", "dots")


def remat_block(cls, policy: str, static_argnums: tuple[int, ...] = ()):
    """``cls`` itself, or wrapped in ``nn.remat`` with ``policy``.  ``static_argnums`` counts
    ``self`` as 0 (e.g. a Python-bool ``deterministic`` argument must be static)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {REMAT_POLICIES}")
    if policy == "none":
        return cls
    saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None
    return nn.remat(cls, policy=saveable, static_argnums=static_argnums)
