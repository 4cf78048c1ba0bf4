"""Optimizers from a config block, shared by every trainer.

``optim`` entries: ``name`` (adam | adamw), ``lr``, ``b1``, ``b2``, ``eps``, ``weight_decay``
(adamw), ``grad_clip`` (global norm, 0 = off), ``warmup_steps``, and ``schedule``:
  * ``cosine``: linear warm-up, then cosine decay to 0 at the last step;
  * ``constant``: linear warm-up, then ``lr``;
  * ``step``: linear warm-up, then ``lr`` times ``decay_factor`` at each of ``decay_steps``
    (MedSem-DeID: 2e-4 halved at 150k of 300k).
"""
from __future__ import annotations

import optax

SCHEDULES = ("cosine", "constant", "step")
OPTIMIZERS = ("adam", "adamw")


def learning_rate_schedule(o, total_steps: int) -> optax.Schedule:
    schedule = o.get("schedule", "cosine")
    warmup = int(o.get("warmup_steps", 0))
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total_steps, warmup + 1))
    if schedule == "constant":
        main = optax.constant_schedule(o.lr)
    elif schedule == "step":
        boundaries = {int(s) - warmup: float(o.get("decay_factor", 0.5)) for s in o.get("decay_steps", ())}
        main = optax.piecewise_constant_schedule(o.lr, boundaries)
    else:
        raise ValueError(f"optim.schedule is {schedule!r}; choose one of {SCHEDULES}")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), main], [warmup])


def make_optimizer(o, total_steps: int) -> optax.GradientTransformation:
    name = o.get("name", "adamw")
    lr = learning_rate_schedule(o, total_steps)
    kw = dict(b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps", 1e-8))
    if name == "adamw":
        opt = optax.adamw(lr, weight_decay=o.get("weight_decay", 0.0), **kw)
    elif name == "adam":
        opt = optax.adam(lr, **kw)
    else:
        raise ValueError(f"optim.name is {name!r}; choose one of {OPTIMIZERS}")
    clip = o.get("grad_clip", 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt
