"""Trainer: an ArcFace identity model (iresnet + additive angular margin) on a MeMa-layout folder.

The offline benchmark's second evaluator, trained here and scored like any user's weights: the
identities of ``config.train_split`` are the classes; each face is cut out of its image with the
JAX crop (``mema_jax.models.face_align``) from the folder's faces.csv onto insightface's 112 x 112
template, inside the jitted step; a random horizontal flip of the crop (arcface_torch's one
augmentation) comes from the step's RNG.  Evaluation: verification on the identities of
``config.eval_split`` (never seen in training): every same-identity pair and as many different-
identity pairs drawn with ``config.eval_pairs_seed``, 10-fold threshold accuracy and the mean
same / different distances of L2-normalised features.  At the end the backbone is written to
``<workdir>/backbone.pth`` in arcface_torch's format, which
``eval.identity.load_identity_model("arcface_r18", weights=...)`` reads.

Loss (``config.loss``): ArcFace, s * cos(theta_y + m) for the true class (Deng et al.; where
theta_y + m > pi, insightface's monotone continuation cos(theta) - m sin(m)), s * cos(theta)
for the others, softmax cross-entropy over normalised class centres; or CosFace, s * (cos - m).
BatchNorm running statistics are the state group ``batch_stats`` of the parameters (trained by
no optimizer, updated by the forward pass; see ``core.train_state``), so a resumed run restores
them with the weights.  arcface_torch's fixed ``features`` BatchNorm scale (1.0) is kept out of
the optimizer.  Run it through ``launch.main``.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from mema_jax.core import loop
from mema_jax.core import train_state as ts
from mema_jax.core.compile import jit
from mema_jax.core.optim import make_optimizer
from mema_jax.data import layout
from mema_jax.models import face_align
from mema_jax.trainers import common
from mema_jax.models.convert_iresnet import save_iresnet_pth
from mema_jax.models.iresnet import FIXED_PARAMS, IResNet, IResNetConfig, INPUT_SIZE

BACKBONE_FILE = "backbone.pth"
LOSSES = ("arcface", "cosface")


# ---------------------------------------------------------------------------------------------- data

class FaceSource(grain.RandomAccessDataSource):
    """Records of one split with a recorded face: image (uint8, as stored), its five points
    (float32 (5, 2), pixels), the identity's class index among ``classes``, and the row index."""

    def __init__(self, dataset: layout.MeMaDataset, split: str, classes: dict[str, int] | None = None):
        self.dataset = dataset
        self.records = [r for r in dataset.split(split) if dataset.face(r) is not None and r.identity]
        if not self.records:
            raise ValueError(f"{dataset.root}: split {split!r} has no images with an identity and a recorded face")
        self.classes = classes if classes is not None else {
            name: i for i, name in enumerate(sorted({r.identity for r in self.records}))}
        self.image_shape = self.dataset.load_image(self.records[0]).shape

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = self.dataset.load_image(rec)
        if image.shape != self.image_shape:
            raise layout.MeMaFormatError(f"{self.dataset.image_path(rec)}: image is {image.shape}, the split's "
                                         f"first is {self.image_shape}; identity batches need one size")
        return {"image": image, "landmarks": self.dataset.face(rec).landmarks_array().astype(np.float32),
                "label": np.int32(self.classes.get(rec.identity, -1)), "index": np.int32(index)}

    def __repr__(self) -> str:  # grain puts this in checkpoints / logs
        return f"FaceSource(root={self.dataset.root}, n={len(self.records)})"


def make_loader(source: FaceSource, batch_size: int, *, seed: int, shuffle: bool, num_epochs=None,
                drop_remainder: bool = True, worker_count: int = 0) -> grain.DataLoader:
    sampler = grain.IndexSampler(num_records=len(source), shard_options=grain.ShardByJaxProcess(drop_remainder=True),
                                 shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    return grain.DataLoader(data_source=source, sampler=sampler, worker_count=worker_count,
                            operations=[grain.Batch(batch_size // jax.process_count(), drop_remainder=drop_remainder)])


def open_dataset(config) -> layout.MeMaDataset:
    """The folder (rendered first when asked); an older MeMa-Synth folder gets its faces.csv."""
    synth_cfg = config.data.synth if config.data.generate_if_missing else None
    dataset = common.open_dataset(config)
    if dataset.faces is None and synth_cfg is not None:
        from mema_jax.data import synth

        spec = synth.SynthSpec(num_images=synth_cfg.num_images, images_per_identity=synth_cfg.images_per_identity,
                               resolution=synth_cfg.resolution, seed=synth_cfg.seed)
        # Every process may write it: the same bytes, each write atomic.
        dataset = synth.add_faces(dataset.root, spec)
    if dataset.faces is None:
        raise layout.MeMaFormatError(f"{dataset.root / layout.FACES_FILE}: missing; the identity trainer aligns each "
                                     "face from its recorded box and five points")
    return dataset


# ---------------------------------------------------------------------------------------------- model and loss

def make_backbone(config, precision: ts.Precision) -> IResNet:
    m = config.model
    return IResNet(IResNetConfig(depth=m.depth, width=m.width, num_features=m.num_features, dropout=m.dropout),
                   remat=m.remat, dtype=precision.compute_dtype, param_dtype=precision.param_dtype)


class MarginHead(nn.Module):
    """Class centres (num_classes, features); returns cos(theta) of normalised features and centres."""

    num_classes: int
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, features):
        centres = self.param("centres", nn.with_logical_partitioning(nn.initializers.normal(0.01), ("vocab", "embed")),
                             (self.num_classes, features.shape[-1]), self.param_dtype)
        f = features / jnp.linalg.norm(features, axis=-1, keepdims=True).clip(1e-12)
        w = centres / jnp.linalg.norm(centres, axis=-1, keepdims=True).clip(1e-12)
        return jnp.clip(f @ w.T.astype(jnp.float32), -1.0, 1.0)


def margin_logits(cos, labels, kind: str, s: float, m: float):
    """s * margin-adjusted cosines: ArcFace cos(theta + m) or CosFace cos - m on the true class."""
    onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=cos.dtype)
    target = jnp.sum(cos * onehot, -1)
    if kind == "arcface":
        sine = jnp.sqrt(jnp.clip(1.0 - target**2, 1e-12, 1.0))
        shifted = target * math.cos(m) - sine * math.sin(m)
        # Past theta = pi - m, cos(theta + m) would rise again: continue linearly (insightface's "mm").
        shifted = jnp.where(target > math.cos(math.pi - m), shifted, target - math.sin(math.pi - m) * m)
    elif kind == "cosface":
        shifted = target - m
    else:
        raise ValueError(f"loss.kind is {kind!r}; choose one of {LOSSES}")
    return s * (cos + onehot * (shifted - target)[:, None])


def aligned_inputs(images, landmarks):
    """uint8 images + five points -> (B, 112, 112, 3) ArcFace crops in [-1, 1] (black border = -1)."""
    crops = face_align.align_faces(images.astype(jnp.float32), landmarks)
    return (crops - 127.5) / 127.5


def identity_loss(backbone, head, loss_cfg, flip: bool, params, frozen, batch, rng):
    """(loss, (metrics, new batch_stats)) on one batch, BatchNorm in training mode."""
    del frozen
    x = aligned_inputs(batch["image"], batch["landmarks"])
    if flip:  # the template is (nearly) mirror-symmetric, so a flipped crop is still aligned
        mirror = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1, 1, 1))
        x = jnp.where(mirror, x[:, :, ::-1], x)
    variables = {"params": params["backbone"], "batch_stats": params["batch_stats"]}
    features, updated = backbone.apply(variables, x, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.fold_in(rng, 1)})
    cos = head.apply({"params": params["head"]}, features)
    logits = margin_logits(cos, batch["label"], loss_cfg.kind, loss_cfg.s, loss_cfg.m)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    metrics = {"accuracy": jnp.mean(jnp.argmax(cos, -1) == batch["label"]),
               "target_cos": jnp.mean(jnp.take_along_axis(cos, batch["label"][:, None], 1))}
    return loss, (metrics, updated["batch_stats"])


def zero_fixed() -> optax.GradientTransformation:
    """Zeroes the updates of the backbone's ``FIXED_PARAMS`` (stateless)."""
    def fixed(path) -> bool:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return any(name == f"backbone/{p}" for p in FIXED_PARAMS)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda path, u: jnp.zeros_like(u) if fixed(path) else u, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_tx(config):
    """The configured optimizer on every parameter except arcface_torch's fixed features scale
    (requires_grad=False there): its gradient is zeroed before (clipping and moments never see
    it) and its update after (weight decay never moves it)."""
    return optax.chain(zero_fixed(), make_optimizer(config.optim, config.total_steps), zero_fixed())


# ---------------------------------------------------------------------------------------------- evaluation

def verification_pairs(identities, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every same-identity pair (i < j) and as many different-identity pairs drawn with ``seed``:
    (pairs (P, 2), same (P,) bool)."""
    identities = np.asarray(identities)
    i, j = np.triu_indices(len(identities), 1)
    same = identities[i] == identities[j]
    n_same = int(same.sum())
    rng = np.random.default_rng(seed)
    different = rng.choice(np.flatnonzero(~same), min(n_same, int((~same).sum())), replace=False)
    chosen = np.concatenate([np.flatnonzero(same), np.sort(different)])
    return np.stack([i[chosen], j[chosen]], 1), same[chosen]


def best_threshold(distances: np.ndarray, same: np.ndarray) -> float:
    """The cut, midway between consecutive sorted distances, that maximises the accuracy of
    "same iff distance <= t" (as the eval bridge's ``best_threshold``)."""
    order = np.argsort(distances, kind="stable")
    d, s = distances[order], same[order]
    correct = np.concatenate([[0], np.cumsum(s)]) + (~s).sum() - np.concatenate([[0], np.cumsum(~s)])
    cuts = np.concatenate([[d[0] - 1.0], (d[1:] + d[:-1]) / 2, [d[-1] + 1.0]])
    return float(cuts[int(np.argmax(correct))])


def verification_accuracy(distances: np.ndarray, same: np.ndarray, n_folds: int = 10, seed: int = 0) -> float:
    """LFW protocol: the threshold best on 9 folds is scored on the 10th; mean over folds."""
    folds = np.array_split(np.random.default_rng(seed).permutation(len(distances)), n_folds)
    scores = []
    for k, test in enumerate(folds):
        train = np.concatenate([f for i, f in enumerate(folds) if i != k])
        threshold = best_threshold(distances[train], same[train])
        scores.append(np.mean((distances[test] <= threshold) == same[test]))
    return float(np.mean(scores))


def make_evaluator(backbone, source: FaceSource, config, mesh, rules, params_shardings, batch_shardings):
    """``evaluate(state)``: verification accuracy and mean distances on ``config.eval_split``."""
    keys = ("image", "landmarks")
    shardings = {k: batch_shardings[k] for k in keys}
    embed = loop.in_mesh(jit(
        lambda p, images, points: backbone.apply({"params": p["backbone"], "batch_stats": p["batch_stats"]},
                                                 aligned_inputs(images, points), train=False),
        in_shardings=(params_shardings, shardings["image"], shardings["landmarks"])), mesh, rules)
    identities = [r.identity for r in source.records]
    pairs, same = verification_pairs(identities, config.eval_pairs_seed)

    def evaluate(state: ts.TrainState) -> dict:
        params = state.ema_params if state.ema_params is not None else state.params
        loader = make_loader(source, config.batch_size, seed=0, shuffle=False, num_epochs=1, drop_remainder=False)
        features = []
        for batch, rows, _ in loop.padded_batches(loader, shardings, config.batch_size):
            features.append(loop.fetch(embed(params, batch["image"], batch["landmarks"]))[rows])
        f = np.concatenate(features).astype(np.float64)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        distances = np.linalg.norm(f[pairs[:, 0]] - f[pairs[:, 1]], axis=1)
        return {"eval/verification_accuracy": verification_accuracy(distances, same),
                "eval/distance_same": float(distances[same].mean()),
                "eval/distance_different": float(distances[~same].mean())}

    return evaluate


# ---------------------------------------------------------------------------------------------- wiring

def build(config, dataset: layout.MeMaDataset, mesh, rules):
    """Everything a run needs on ``mesh``: dict(backbone, source, state_spec, train_step, shardings)."""
    precision = ts.Precision.from_config(config.precision)
    source = FaceSource(dataset, config.train_split)
    backbone = make_backbone(config, precision)
    head = MarginHead(len(source.classes), param_dtype=precision.param_dtype)

    def init(rng):
        r1, r2 = jax.random.split(rng)
        variables = backbone.init(r1, jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32), train=False)
        head_params = head.init(r2, jnp.zeros((1, config.model.num_features), jnp.float32))["params"]
        return {"backbone": variables["params"], "head": head_params, "batch_stats": variables["batch_stats"]}

    tx = make_tx(config)
    state_spec = ts.sharded_state(init, tx, mesh, rules, seed=config.seed, use_ema=config.ema_decay > 0,
                                  state_group="batch_stats", warn_replicated_bytes=loop.replicated_warning_bytes(config))
    b = config.batch_size
    h, w = source.image_shape[:2]
    shardings = loop.batch_shardings(mesh, rules, {"image": (b, h, w, 3), "landmarks": (b, 5, 2), "label": (b,),
                                                   "index": (b,)})
    loss_fn = functools.partial(identity_loss, backbone, head, config.loss, config.data.flip)
    train_step = ts.make_train_step(loss_fn, tx, mesh=mesh, rules=rules, state_shardings=state_spec.shardings,
                                    batch_shardings=shardings, seed=config.seed, accum_steps=config.grad_accum_steps,
                                    ema_decay=config.ema_decay or None, state_group="batch_stats")
    return dict(backbone=backbone, head=head, source=source, state_spec=state_spec, train_step=train_step,
                shardings=shardings)


def export_backbone(path: Path, backbone: IResNet, state: ts.TrainState) -> None:
    """``state``'s backbone and BatchNorm statistics as arcface_torch's ``backbone.pth``."""
    params = loop.fetch(state.ema_params if state.ema_params is not None else state.params)
    if jax.process_index() == 0:
        save_iresnet_pth(path, {"params": params["backbone"], "batch_stats": params["batch_stats"]}, backbone.config,
                         num_batches_tracked=int(jax.device_get(state.step)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    mesh, rules = loop.mesh_and_rules(config)
    dataset = open_dataset(config)
    parts = build(config, dataset, mesh, rules)
    loader = make_loader(parts["source"], config.batch_size, seed=config.seed, shuffle=True,
                         worker_count=config.data.workers)
    evaluate = None
    if config.eval_every:
        val = FaceSource(dataset, config.eval_split, classes={})
        evaluate = make_evaluator(parts["backbone"], val, config, mesh, rules, parts["state_spec"].shardings.params,
                                  parts["shardings"])

    def export(step, state, writer):
        del writer
        export_backbone(Path(workdir) / BACKBONE_FILE, parts["backbone"], state)  # every process: a gather
        if jax.process_index() == 0:
            print(f"wrote {Path(workdir) / BACKBONE_FILE} (step {step})", flush=True)

    return loop.run(config, workdir, state_spec=parts["state_spec"], train_step=parts["train_step"],
                    data_iter=iter(loader), batch_shardings=parts["shardings"], evaluate=evaluate,
                    periodic=[loop.Periodic(config.total_steps, export)], console_keys=("loss", "accuracy"))


def restore_state(config, workdir, dataset=None, mesh=None, rules=None) -> tuple[dict, ts.TrainState]:
    """(build() parts, the newest checkpoint's state) of a run, e.g. to compare its model with
    the exported file."""
    from mema_jax.core import checkpoint as ckpt_lib

    if mesh is None:
        mesh, rules = loop.mesh_and_rules(config)
    parts = build(config, dataset or open_dataset(config), mesh, rules)
    checkpointer = ckpt_lib.Checkpointer(Path(workdir) / "checkpoints", save_every=config.checkpoint_every,
                                         keep=config.keep_checkpoints, async_save=False)
    state = checkpointer.restore(parts["state_spec"].abstract, None)
    checkpointer.close()
    return parts, state

