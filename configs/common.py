"""Pieces shared by every config: mesh, sharding rules, precision, checkpoint cadence."""
from collections.abc import Sequence

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
    # TensorBoard event files (clu's writer; it imports TensorFlow, 6-7 s of CPU per start).  Off:
    # metrics.csv and the console line only (mema_jax/core/metrics.py).
    c.tensorboard = True
    return c


def parse_arg(arg: str | None, config_file: str, bases: Sequence[str], modifiers: Sequence[str] = (),
              default: str | None = None) -> tuple[str, list[str]]:
    """``"BASE[,MODIFIER...]"`` (``--config=FILE:ARG``) -> (base, modifiers); the default base when
    ``arg`` is empty.  An unknown base or modifier is one error naming the file and what exists."""
    parts = [p for p in (arg or default or bases[0]).split(",") if p]
    base, chosen = parts[0], parts[1:]
    if base not in bases:
        raise ValueError(f"unknown variant {base!r} of {config_file}; use one of {', '.join(bases)}")
    unknown = [m for m in chosen if m not in modifiers]
    if unknown:
        allowed = f"some of {', '.join(modifiers)}" if modifiers else "none (it takes no modifiers)"
        raise ValueError(f"unknown modifiers {unknown} of {config_file}; use {allowed}")
    return base, chosen


SYNTH_DATA_ROOT = "data/mema_synth_64_3k"   # MeMa-Synth 64 px, 3000 faces: the offline default of every trainer


def data_config(*, augment: bool | None, image_size: int | None = 64, root: str = SYNTH_DATA_ROOT,
                **extra) -> ml_collections.ConfigDict:
    """The ``c.data`` block of a trainer on a MeMa-layout folder (MeMa-Synth rendered into ``root``
    when it is missing); ``augment=None`` / ``image_size=None`` leave those fields out."""
    d = ml_collections.ConfigDict()
    d.root = root
    d.format = "folder"  # or "arrayrecord": TFDS ArrayRecord shards (python -m mema_jax.data.tfds_mema build)
    d.arrayrecord_dir = ""  # format="arrayrecord": the shards' tfds data dir; "" = <data.root>_arrayrecord
    if image_size is not None:
        d.image_size = image_size
    d.generate_if_missing = True  # render MeMa-Synth at data.root when it is absent
    d.verify_images = True
    if augment is not None:
        d.augment = augment
    d.workers = 0  # grain worker processes; 0 = in the main process
    for key, value in extra.items():
        d[key] = value
    d.synth = ml_collections.ConfigDict({"num_images": 3000, "images_per_identity": 4, "resolution": 64, "seed": 0})
    return d


TINY_DATA_ROOT = "data/mema_synth_32_tiny"


def make_tiny(c: ml_collections.ConfigDict, *, total_steps: int = 24, eval_every: int = 0,
              checkpoint_every: int = 4, log_every: int = 4, warmup_steps: int | None = 4) -> None:
    """The ``:tiny`` variant's shared part, for tests (seconds): MeMa-Synth at 32 px (160 faces),
    batch 8, a short schedule with frequent checkpoints, and no TensorBoard: the suite starts ~100 such
    runs, and TensorFlow's import would be a tenth of its CPU time (tests that check the TensorBoard
    files turn it back on)."""
    c.data.root = TINY_DATA_ROOT
    if "image_size" in c.data:
        c.data.image_size = 32
    c.data.synth.update(num_images=160, images_per_identity=4, resolution=32)
    c.batch_size = 8
    c.total_steps = total_steps
    c.eval_every = eval_every
    c.checkpoint_every = checkpoint_every
    c.log_every = log_every
    c.tensorboard = False
    if warmup_steps is not None:
        c.optim.warmup_steps = warmup_steps


def use_real_data(c: ml_collections.ConfigDict, image_size: int = 512) -> None:
    """The ``:paper`` / ``:gpu`` variants' data: the user's real MeMa-layout folder
    (``--config.data.root=``), never rendered, at the paper's size, read by 8 grain workers."""
    c.data.root = ""
    c.data.generate_if_missing = False
    c.data.image_size = image_size
    c.data.verify_images = False
    c.data.workers = 8
