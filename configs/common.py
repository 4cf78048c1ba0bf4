"""Pieces shared by every config: mesh, sharding rules, precision, checkpoint cadence."""
import ml_collections

from mema_jax.core.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Mesh axes (data, fsdp, tensor); -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Logical axis name -> mesh axes: sharding is data, changed here, not in model code.
    c.sharding_rules = [list(rule) for rule in DEFAULT_RULES]
    # A parameter at least this large that the rules leave whole on every device of an fsdp > 1
    # mesh is logged once by name (how FSDP runs go out of memory at scale).
    c.replicated_warning_mib = 4.0
    c.precision = ml_collections.ConfigDict({"param_dtype": "float32", "compute_dtype": "bfloat16"})
    c.grad_accum_steps = 1
    c.ema_decay = 0.0  # 0 = no EMA
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.log_every = 50
    c.eval_at_start = False  # True: evaluate the starting state too (logged as step 0)
    c.profile_steps = 0  # > 0: capture a profile of that many steps (clu periodic action)
    return c
