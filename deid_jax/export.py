"""The MedSem-DeID model folder: what the trainer writes and ``deid_jax.deidentify`` reads.

    <workdir>/model/
        deid_config.json          {"model": DeidConfig, "identity_crop": ..., "medical_encoder": "medical_encoder" or null}
        generator.safetensors     the generator's parameters, under their flattened Flax names
        medical_encoder/          the frozen Enc_med the generator was trained with (when it takes f_med)

The generator's parameter shapes follow from its ``DeidConfig`` and the medical encoder's f_med
shape alone: :func:`example_inputs` are the inputs that initialise it, for the trainer (real
values) and the loader (shapes only, so the strict loader checks every name and shape).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from deid_jax import medical_encoder as med_lib
from deid_jax.model import DeidConfig, MedSemDeID
from mema_jax.errors import InputError
from mema_jax.fileio import atomic_folder, atomic_write_bytes
from mema_jax.models import param_tree, weights

MODEL_DIR = "model"
CONFIG_FILE = "deid_config.json"
GENERATOR_FILE = "generator.safetensors"
MEDICAL_DIR = "medical_encoder"


class DeidModelError(InputError):
    """A model folder that is not a MedSem-DeID export; the message names it."""


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """A loaded model folder."""

    config: DeidConfig
    params: dict                                  # the generator's (unboxed) parameters
    medical: med_lib.MedicalEncoder | None        # Enc_med, when the generator takes f_med
    identity_crop: str
    face_template: list | None = None  # the five points of the training crop, fractions of its side (photos.align)


def example_inputs(config: DeidConfig, medical) -> tuple:
    """Zero (x, f_med or None, password) of batch 1: what ``MedSemDeID.init`` is called with."""
    x = jnp.zeros((1, config.image_size, config.image_size, 3))
    password = jnp.zeros((1, config.password_dim))
    f_med = None
    if config.med_channels:
        f_med = jax.eval_shape(medical.apply, medical.params, x)
        f_med = jnp.zeros(f_med.shape, f_med.dtype)
    return x, f_med, password


def init_generator(config: DeidConfig, medical, rng) -> dict:
    """The generator's initial (boxed, logically named) parameters."""
    x, f_med, password = example_inputs(config, medical)
    return MedSemDeID(config).init(rng, x, f_med, password, password)["params"]


def abstract_params(config: DeidConfig, medical) -> dict:
    """Shapes and dtypes of the generator's (boxed) parameters, nothing computed."""
    return jax.eval_shape(lambda: init_generator(config, medical, jax.random.key(0)))


def save(out, config: DeidConfig, params, medical, identity_crop: str, face_template=None) -> Path:
    """Writes the model folder ``out`` atomically (it must not exist); ``params``: the generator's, on host.
    ``face_template``: the mean five points of the training faces as fractions of the image side (5, 2),
    which whole photos are aligned to (photos.align); None when the training data recorded no faces."""
    out = Path(out)
    uses_med = medical is not None and bool(config.med_channels)
    with atomic_folder(out) as tmp:
        weights.write_safetensors(tmp / GENERATOR_FILE, {k: np.asarray(v) for k, v in param_tree.flatten(params).items()})
        settings = {"model": config.to_dict(), "identity_crop": identity_crop,
                    "medical_encoder": MEDICAL_DIR if uses_med else None,
                    "face_template": None if face_template is None else np.asarray(face_template, float).round(4).tolist()}
        atomic_write_bytes(tmp / CONFIG_FILE, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
        if uses_med:
            med_lib.save(medical, tmp / MEDICAL_DIR)
    return out


def load(folder) -> SavedModel:
    """The model folder ``folder``; every generator weight checked by name and shape."""
    folder = Path(folder)
    try:
        settings = json.loads((folder / CONFIG_FILE).read_text())
        config = DeidConfig.from_dict(settings["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DeidModelError(f"{folder}: not a MedSem-DeID model folder ({CONFIG_FILE}: {e}); the trainer "
                             f"writes one to <workdir>/{MODEL_DIR}") from None
    medical = med_lib.load(folder / settings["medical_encoder"]) if settings.get("medical_encoder") else None
    abstract = abstract_params(config, medical)
    source = os.fspath(folder / GENERATOR_FILE)
    flat = weights.read_state_dict(source)
    key_map = [weights.KeyMapping(p, p) for p in param_tree.flatten(abstract)]
    params = weights.load_into(abstract, flat, key_map, source=source)
    return SavedModel(config, params, medical, settings.get("identity_crop", "landmarks"),
                      settings.get("face_template"))
