"""The interface every identity model shares, and the PyTorch path the CNN models share.

Faces: each model finds faces with its own detector and, where an image holds several, uses the
largest; or the caller gives them (``embed(images, faces=...)``: a MeMa folder's recorded faces,
see :func:`eval.identity.faces.recorded_faces`), and each model aligns with its own protocol
from the given box and five points (dlib's ResNet runs its own 5-point predictor inside the box).
Failure policy: ``embed`` returns one row per input image; where no face is found (or
the caller passes ``None`` as that image's face) the row is all NaN. :func:`face_found` turns a
feature array into the mask of rows that hold a face. The metrics in
:mod:`eval.identity.metrics` skip NaN rows and report how many they skipped, as the paper
computes distances on detected faces only.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch

from eval.identity.faces import Face, check_rgb_image

BATCH_SIZE = 32


def face_found(features: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``features`` (N, dim) that hold an embedding (not NaN)."""
    return ~np.isnan(np.asarray(features, dtype=np.float64)).any(axis=1)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


class IdentityModel(abc.ABC):
    """An identity feature extractor with its own face detection and alignment.

    ``name``: registry name; ``dim``: feature size; ``input_size``: (width, height) of the aligned
    crop; ``detector``: the face finder used by :meth:`locate`.
    """

    name: str
    dim: int
    input_size: tuple[int, int]

    def __init__(self, face_finder):
        self._face_finder = face_finder
        self.detector = face_finder.name
        self.landmark_scheme = face_finder.scheme

    def locate(self, image: np.ndarray) -> Face | None:
        """The largest face of ``image`` with this model's landmarks, or None."""
        return self._face_finder(image)

    def face_at(self, image: np.ndarray, face: Face) -> Face:
        """``face`` in this model's landmark scheme: as given when the schemes agree (a model that
        needs another scheme overrides this to find its points inside the given box)."""
        if face.scheme != self.landmark_scheme:
            raise ValueError(f"{self.name} needs {self.landmark_scheme!r} landmarks, got {face.scheme!r}")
        return face

    @abc.abstractmethod
    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The uint8 RGB crop (height, width, 3) of ``face`` that the network is fed."""

    @abc.abstractmethod
    def _raw_features(self, crops: np.ndarray) -> np.ndarray:
        """Unnormalised features (N, dim) of a stack of aligned crops (N, height, width, 3)."""

    def embed_aligned(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised float32 features (N, dim) of crops already aligned by :meth:`align`."""
        width, height = self.input_size
        checked = []
        for index, crop in enumerate(crops):
            crop = check_rgb_image(crop, f"aligned crop {index}")
            if crop.shape[:2] != (height, width):
                raise ValueError(f"aligned crop {index}: {self.name} expects {height}x{width}, got {crop.shape[:2]}")
            checked.append(crop)
        if not checked:
            return np.zeros((0, self.dim), dtype=np.float32)
        stack = np.stack(checked)
        parts = [self._raw_features(stack[i:i + BATCH_SIZE]) for i in range(0, len(stack), BATCH_SIZE)]
        return l2_normalise(np.concatenate(parts).astype(np.float64))

    def embed(self, images: Sequence[np.ndarray], faces: Sequence[Face | None] | None = None) -> np.ndarray:
        """L2-normalised float32 features (N, dim), one row per image; NaN rows where no face.

        ``faces`` (optional, one per image) replaces detection: faces from this model's
        :meth:`locate` (e.g. to embed a de-identified image at the face found on its original) or
        given ``"eyes_nose_mouth5"`` faces (a MeMa folder's faces.csv), which each model aligns
        by its own protocol (:meth:`face_at`); None = no face.
        """
        if faces is not None and len(faces) != len(images):
            raise ValueError(f"{len(faces)} faces given for {len(images)} images")
        features = np.full((len(images), self.dim), np.nan, dtype=np.float32)
        crops, rows = [], []
        for index, image in enumerate(images):
            image = check_rgb_image(image, f"image {index}")
            face = self.locate(image) if faces is None else faces[index]
            if face is None:
                continue
            try:
                face = self.face_at(image, face)
            except ValueError as error:
                raise ValueError(f"face {index}: {error}") from None
            crops.append(self.align(image, face))
            rows.append(index)
        if rows:
            features[rows] = self.embed_aligned(crops)
        return features


class TorchIdentityModel(IdentityModel):
    """A PyTorch CNN fed (x - mean) / std of the crop in ``colour_order`` ("RGB" or "BGR")."""

    mean: float
    std: float
    colour_order: str

    def __init__(self, network: torch.nn.Module, face_finder, device: str = "cpu"):
        super().__init__(face_finder)
        self.device = torch.device(device)
        self.network = network.eval().to(self.device)

    def preprocess(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB crops -> float (N, 3, H, W) network input."""
        if self.colour_order == "BGR":
            crops = crops[..., ::-1]
        pixels = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device, torch.float32)
        return ((pixels - self.mean) / self.std).permute(0, 3, 1, 2).contiguous()

    def _raw_features(self, crops: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.network(self.preprocess(crops)).float().cpu().numpy()
