"""dlib face box and 68-point landmarks, and the landmark error of paper Tab. 7.

Protocol (written down here because the paper only says "Dlib"):
- face box: dlib's HOG frontal face detector on the ORIGINAL image (upsampled once, as in
  face_recognition; images larger than DETECT_MAX_SIDE are searched at that size); with several
  faces the largest box is used;
- landmarks: ``shape_predictor_68_face_landmarks.dat`` (shipped in the face_recognition_models
  package) run with that same box on the original and on the de-identified image, so the error
  measures how the face content moved, not how the detector's box moved;
- error: mean Euclidean pixel distance between corresponding points, over a point group
  (iBUG 300-W numbering): all 0-67, eye 36-47, nose 27-35, mouth 48-67; images where the
  original has no detectable face are counted and left out of the mean.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

LANDMARK_GROUPS = {
    "all": tuple(range(0, 68)),
    "eye": tuple(range(36, 48)),
    "mouth": tuple(range(48, 68)),
    "nose": tuple(range(27, 36)),
}
DETECT_MAX_SIDE = 800
SHAPE_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
_WHERE_TO_GET = ("pip install face_recognition_models (it ships the file), or download "
                 "http://dlib.net/files/shape_predictor_68_face_landmarks.dat.bz2 and unpack it")


@dataclasses.dataclass(frozen=True)
class FaceBox:
    """Pixel box, right/bottom exclusive."""
    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def scaled(self, factor: float, image_shape) -> "FaceBox":
        """The box grown (or shrunk) about its centre by ``factor``, clipped to the image."""
        cx, cy = (self.left + self.right) / 2, (self.top + self.bottom) / 2
        hw, hh = self.width * factor / 2, self.height * factor / 2
        h, w = image_shape[:2]
        return FaceBox(max(0, int(round(cx - hw))), max(0, int(round(cy - hh))),
                       min(w, int(round(cx + hw))), min(h, int(round(cy + hh))))

    def clipped(self, image_shape) -> "FaceBox":
        h, w = image_shape[:2]
        return FaceBox(max(0, self.left), max(0, self.top), min(w, self.right), min(h, self.bottom))


def face_recognition_models_file(filename: str) -> Path:
    """A model file shipped in face_recognition_models, found without importing it (its
    ``__init__`` needs pkg_resources, which recent setuptools no longer provides)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{filename}: the face_recognition_models package is not installed; {_WHERE_TO_GET}")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / filename


@functools.lru_cache(maxsize=1)
def _face_detector():
    import dlib
    return dlib.get_frontal_face_detector()


@functools.lru_cache(maxsize=2)
def _shape_predictor(path: str):
    import dlib
    return dlib.shape_predictor(path)


def detect_face(image: np.ndarray, upsample: int = 1) -> FaceBox | None:
    """The largest dlib HOG face box in an RGB uint8 image, or None.

    Images whose longer side exceeds DETECT_MAX_SIDE are searched on a copy shrunk to that size
    (HOG cost grows with pixels; faces in such photos are large) and the box is mapped back.
    """
    h, w = image.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    small = image if scale == 1.0 else np.asarray(
        Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
    rects = _face_detector()(np.ascontiguousarray(small), upsample)
    if len(rects) == 0:
        return None
    r = max(rects, key=lambda r: r.width() * r.height())
    # dlib rectangles are inclusive and may reach outside the image.
    box = FaceBox(round(r.left() / scale), round(r.top() / scale),
                  round((r.right() + 1) / scale), round((r.bottom() + 1) / scale))
    return box.clipped(image.shape)


class Landmarker:
    """dlib's 68-point shape predictor; ``predictor_path`` defaults to face_recognition_models' copy."""

    def __init__(self, predictor_path=None):
        path = Path(predictor_path) if predictor_path else face_recognition_models_file(SHAPE_PREDICTOR_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: dlib landmark model {SHAPE_PREDICTOR_FILE} not found; {_WHERE_TO_GET}")
        self.predictor_path = path
        self._predictor = _shape_predictor(str(path))

    def landmarks(self, image: np.ndarray, box: FaceBox) -> np.ndarray:
        """(68, 2) float x, y pixel coordinates of the points inside ``box``."""
        import dlib
        rect = dlib.rectangle(box.left, box.top, box.right - 1, box.bottom - 1)
        shape = self._predictor(np.ascontiguousarray(image), rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def point_errors(original_points: np.ndarray, other_points: np.ndarray) -> dict[str, float]:
    """Mean Euclidean distance per landmark group."""
    dist = np.linalg.norm(np.asarray(original_points) - np.asarray(other_points), axis=1)
    return {group: float(dist[list(idx)].mean()) for group, idx in LANDMARK_GROUPS.items()}
