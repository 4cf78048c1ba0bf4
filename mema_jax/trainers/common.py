"""Plain helpers the trainers share (big_vision's way: functions, no class hierarchy).

A single-model trainer (``classifier``, ``vit_supervised``, ``mae``) supplies its model, its loss
and its evaluation; these functions do the rest: open the configured dataset, the batch
shardings, the sharded state and jitted step of one optimizer (``build``), the training loader,
the run itself (``run``), and the ViT encoder export of the two Tab. 10 encoder trainers.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from mema_jax.core import loop
from mema_jax.core import train_state as ts
from mema_jax.core.optim import make_optimizer
from mema_jax.data import layout, pipeline, tfds_mema
from mema_jax.models import vit

ENCODER_DIR = "encoder"


def open_dataset(config) -> layout.MeMaDataset:
    """``config.data``'s folder (or ArrayRecord shards); MeMa-Synth rendered into it first when
    ``data.generate_if_missing`` and it is missing."""
    d = config.data
    return tfds_mema.open_configured_dataset(d, d.synth if d.generate_if_missing else None, d.verify_images)


def batch_shapes(config, **extra: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Global shapes of a training batch of MeMa images (plus ``extra`` entries, e.g. landmarks)."""
    b, size = config.batch_size, config.data.image_size
    return {"image": (b, size, size, 3), "label": (b,), "severity": (b,), "index": (b,), **extra}


def train_loader(config, dataset, **options):
    """The training split's endless, shuffled loader at the config's batch size, size and seed."""
    return pipeline.make_loader(dataset, "train", global_batch_size=config.batch_size,
                                image_size=config.data.image_size, seed=config.seed, augment=config.data.augment,
                                worker_count=config.data.workers, **options)


def eval_params(state: ts.TrainState):
    """The weights an evaluation or an export uses: the EMA's when the run keeps one."""
    return state.ema_params if state.ema_params is not None else state.params


@dataclasses.dataclass(frozen=True)
class Built:
    """What a single-optimizer run needs on its mesh."""

    model: nn.Module
    state_spec: ts.ShardedState
    train_step: Callable
    shardings: dict

    def __getitem__(self, key: str):  # parts["state_spec"] as well as parts.state_spec
        return getattr(self, key)


def build(config, mesh, rules, model: nn.Module, loss: Callable, init_inputs: Sequence[jax.Array]) -> Built:
    """One optimizer (``config.optim``) over ``model``'s parameters, initialised on ``init_inputs``;
    ``loss(model, params, frozen, batch, rng) -> (loss, metrics)``; EMA when ``config.ema_decay`` > 0."""
    tx = make_optimizer(config.optim, config.total_steps)
    state_spec = ts.sharded_state(lambda rng: model.init(rng, *init_inputs)["params"], tx, mesh, rules,
                                  seed=config.seed, use_ema=config.ema_decay > 0,
                                  warn_replicated_bytes=loop.replicated_warning_bytes(config))
    shardings = loop.batch_shardings(mesh, rules, batch_shapes(config))
    train_step = ts.make_train_step(functools.partial(loss, model), tx, mesh=mesh, rules=rules,
                                    state_shardings=state_spec.shardings, batch_shardings=shardings, seed=config.seed,
                                    accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay or None)
    return Built(model, state_spec, train_step, shardings)


def zero_images(config) -> jax.Array:
    size = config.data.image_size
    return jnp.zeros((1, size, size, 3), jnp.float32)


def run(config, workdir, built: Built, dataset, make_evaluator: Callable | None, *,
        console_keys: Sequence[str], on_finish: Callable | None = None) -> dict:
    """``core.loop.run`` of ``built`` on the training loader; ``make_evaluator(model, dataset, config,
    mesh, rules, params_shardings, batch_shardings)`` is called only when ``config.eval_every``."""
    mesh, rules = loop.mesh_and_rules(config)
    evaluate = None
    if config.eval_every and make_evaluator is not None:
        evaluate = make_evaluator(built.model, dataset, config, mesh, rules, built.state_spec.shardings.params,
                                  built.shardings)
    return loop.run(config, workdir, state_spec=built.state_spec, train_step=built.train_step,
                    data_iter=iter(train_loader(config, dataset)), batch_shardings=built.shardings, evaluate=evaluate,
                    on_finish=on_finish, console_keys=tuple(console_keys))


def export_vit_encoder(folder: Path, encoder_config, state: ts.TrainState, metadata: dict) -> None:
    """The state's ``encoder`` (EMA weights if kept) as a ``models.vit.load_vit_encoder`` folder; an
    existing complete folder is left as it is (a finished run started again).  Every process calls
    it (gathering the shards is a collective)."""
    if (folder / vit.CONFIG_FILE).exists():
        return
    params = eval_params(state)["encoder"]
    if jax.process_count() > 1:  # each process holds only its shards
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        vit.save_vit_encoder(folder, encoder_config, params, {**metadata, "step": int(jax.device_get(state.step))})
        print(f"wrote the encoder to {folder}", flush=True)
