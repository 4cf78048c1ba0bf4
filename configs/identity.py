r"""Identity model: ArcFace (a small iresnet18) on the identities of MeMa-Synth, for the offline tables.

The offline benchmark's second identity evaluator where dlib cannot be used, trained here and
never by a de-identifier: faces are aligned from MeMa-Synth's faces.csv onto the 112 x 112
ArcFace template (the JAX crop, inside the step), the train split's identities are the classes
(ArcFace margin loss, s = 64, m = 0.5 as arcface_torch), and verification is measured on the
validation split's identities, which the model never sees.  The backbone is written to
``<workdir>/backbone.pth`` (arcface_torch format); score it with the eval bridge like any user's
weights: ``load_identity_model("arcface_r18", weights="<workdir>/backbone.pth")``.

Run:
  python -m launch.main --config=configs/identity.py --workdir=runs/identity
Variants:
  :synth  (default) MeMa-Synth 64 px, 3000 images (the quickstart's folder), iresnet18 at width 0.25.
  :tiny   a few-second run for tests (32 px, width 0.125, 24 steps, checkpoint every 4).
  :gpu    MeMa-Synth 128 px, 20000 images, iresnet50 at full width, bf16 compute.
Measured (2-core CPU, :synth, from an empty data folder): 10 min 54 s in all (rendering ~20 s,
300 steps at 0.48 steps/s while another training job shared the two cores; ~0.7 steps/s alone);
validation verification accuracy 0.980 / 0.993 / 0.996 at steps 100 / 200 / 300 (80 unseen
identities, 480 same + 480 different pairs; mean distance same 0.649, different 1.411).  The
exported backbone.pth scored by the eval bridge at the recorded faces of the same pairs: 0.995
(dlib there: 0.925).
"""
import ml_collections

from configs.common import base_config, data_config, make_tiny, parse_arg


def get_config(arg=None):
    variant, _ = parse_arg(arg, "configs/identity.py", ("synth", "tiny", "gpu"))
    c = base_config()
    c.trainer = "mema_jax.trainers.identity"
    c.variant = variant

    c.data = data_config(augment=None, image_size=None, flip=True)  # flip: of the aligned crop (arcface_torch's augmentation)
    c.train_split = "train"
    c.eval_split = "val"
    c.eval_pairs_seed = 0

    c.model = ml_collections.ConfigDict(
        {"depth": "r18", "width": 0.25, "num_features": 512, "dropout": 0.0, "remat": "none"})
    c.loss = ml_collections.ConfigDict({"kind": "arcface", "s": 64.0, "m": 0.5})
    c.optim = ml_collections.ConfigDict(
        {"lr": 2e-3, "b1": 0.9, "b2": 0.99, "weight_decay": 5e-4, "warmup_steps": 50, "grad_clip": 5.0})
    # fp32 compute on CPU: XLA:CPU has no fast bf16 matmul, and exact reruns make resume checks bitwise.
    c.precision.compute_dtype = "float32"
    c.batch_size = 64
    c.total_steps = 300
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 25

    if variant == "tiny":
        make_tiny(c)
        c.model.update(width=0.125, num_features=64)
    elif variant == "gpu":
        c.data.root = "data/mema_synth_128"
        c.data.synth.update(num_images=20000, images_per_identity=5, resolution=128)
        c.data.workers = 8
        c.model.update(depth="r50", width=1.0)
        c.precision.compute_dtype = "bfloat16"
        c.batch_size = 256
        c.total_steps = 10000
        c.eval_every = 1000
        c.checkpoint_every = 1000
    return c
