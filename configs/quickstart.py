r"""Quickstart: a disease + severity classifier on MeMa-Synth, trained on the CPU in a few minutes.

The README's first command runs this (``make quickstart``).  It renders MeMa-Synth (3000 images at
64 px, 750 identities) into ``data/mema_synth_64_3k`` on first use, trains a small ResNet through
the shared training core (sharded state, orbax checkpoints with the grain iterator, clu metrics),
and evaluates top-1 disease accuracy (overall and per class) on the validation split, whose
patients the model has never seen.

Run:
  python -m launch.main --config=configs/quickstart.py --workdir=runs/quickstart
Variants:
  :tiny   a few-second run for tests (32 px, 24 steps, checkpoint every 4).
  :gpu    bigger images and batch, bf16 compute, for one GPU.
Measured (2-core CPU, default variant): ``make quickstart`` from a fresh clone took 4 min 25 s in
all (venv set-up ~1 min, rendering ~15 s, 400 steps at ~2.1 steps/s); validation accuracy
0.15 / 0.43 / 0.55 / 0.60 at steps 100 / 200 / 300 / 400 (8 classes: chance 0.125), in
runs/quickstart/metrics.csv.  Re-running it resumes at step 400 and exits (5 s).
"""
import ml_collections

from configs.common import base_config, data_config, make_tiny, parse_arg


def get_config(arg=None):
    variant, _ = parse_arg(arg, "configs/quickstart.py", ("local", "tiny", "gpu"))
    c = base_config()
    c.trainer = "mema_jax.trainers.classifier"
    c.variant = variant

    c.data = data_config(augment=True)

    # Four stages down to 8x8: the eye-region signs need the receptive field more than the width.
    c.model = ml_collections.ConfigDict({"widths": (16, 32, 64, 128), "blocks_per_stage": 1, "groups": 8,
                                         "remat": "none"})
    c.optim = ml_collections.ConfigDict(
        {"lr": 3e-3, "b1": 0.9, "b2": 0.99, "weight_decay": 1e-4, "warmup_steps": 50, "grad_clip": 1.0})
    # fp32 compute on CPU: XLA:CPU has no fast bf16 matmul, and exact reruns make resume checks bitwise.
    c.precision.compute_dtype = "float32"
    c.batch_size = 64
    c.total_steps = 400
    c.eval_every = 100
    c.eval_split = "val"
    c.checkpoint_every = 100
    c.log_every = 25

    if variant == "tiny":
        make_tiny(c)
        c.model.widths = (8, 16)
    elif variant == "gpu":
        c.data.root = "data/mema_synth_128"
        c.data.image_size = 128
        c.data.synth.update(num_images=20000, images_per_identity=5, resolution=128)
        c.data.workers = 8
        c.model.widths = (64, 128, 256, 512)
        c.model.blocks_per_stage = 2
        c.precision.compute_dtype = "bfloat16"
        c.batch_size = 256
        c.total_steps = 5000
        c.eval_every = 1000
        c.checkpoint_every = 1000
    return c
