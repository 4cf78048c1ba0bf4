"""Scoring steps of the report, each its own function over one chunk of loaded images: face boxes,
landmarks, gaze, identity features and ID-Dis, reconstruction (PSNR, LPIPS), disease predictions.

``score_originals`` and ``score_outputs`` decode each image once and run the configured steps on
it, chunk by chunk; the tables only read what they return.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from eval import landmarks
from eval.gaze import angle_difference
from eval.identity.metrics import id_distance
from eval.inputs import ImagePair, Originals, load_rgb
from eval.reconstruction import psnr
from eval.report.tools import Tools


def chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def nanmean(values) -> tuple[float, int]:
    """Mean over the values that are not NaN (NaN if none) and how many there are."""
    values = np.asarray([v for v in values], dtype=np.float64)
    ok = ~np.isnan(values)
    return (float(values[ok].mean()) if ok.any() else float("nan")), int(ok.sum())


def column_mean(per_image: dict, column: str) -> float:
    """Mean of one per-image column over the images that have it."""
    return nanmean(row.get(column, np.nan) for row in per_image.values())[0]


# ------------------------------------------------------------------------------------------- steps

def face_boxes(images: Sequence[np.ndarray]) -> list:
    """dlib HOG face box of each image (None without a face); landmarks and gaze share them."""
    return [landmarks.detect_face(image) for image in images]


def landmark_points(landmarker, images: Sequence[np.ndarray], boxes: Sequence) -> list:
    """(68, 2) landmarks of each image in its box (None without a box)."""
    return [None if box is None else landmarker.landmarks(image, box) for image, box in zip(images, boxes)]


def landmark_errors(landmarker, images: Sequence[np.ndarray], boxes: Sequence, original_points: Sequence) -> list:
    """Per image: ``landmark_<group>`` errors against its original's points, found in the original's box."""
    return [{} if box is None else
            {f"landmark_{g}": e for g, e in landmarks.point_errors(points, landmarker.landmarks(image, box)).items()}
            for image, box, points in zip(images, boxes, original_points)]


def gaze_angles(gaze, images: Sequence[np.ndarray], boxes: Sequence) -> list:
    """L2CS (pitch, yaw) in degrees of each image at its box, one batch for the chunk (None without a box)."""
    found = [i for i, box in enumerate(boxes) if box]
    angles = [None] * len(images)
    if found:
        pitch, yaw = gaze.predict([images[i] for i in found], [boxes[i] for i in found])
        for i, p, y in zip(found, pitch, yaw):
            angles[i] = (p, y)
    return angles


def gaze_errors(gaze, images: Sequence[np.ndarray], boxes: Sequence, original_angles: Sequence) -> list:
    """Per image: ``gaze_pitch`` and ``gaze_yaw`` errors (degrees) against its original, at the original's box."""
    return [{} if angles is None else
            {"gaze_pitch": float(angle_difference(original[0], angles[0])),
             "gaze_yaw": float(angle_difference(original[1], angles[1]))}
            for angles, original in zip(gaze_angles(gaze, images, boxes), original_angles)]


def reconstruction_errors(lpips, originals: Sequence[np.ndarray], images: Sequence[np.ndarray]) -> list:
    """Per image: ``psnr`` against its original, and ``lpips`` when a backbone is loaded."""
    rows = []
    for original, image in zip(originals, images):
        row = {"psnr": psnr(original, image)}
        if lpips:
            row["lpips"] = lpips(original, image)
        rows.append(row)
    return rows


def disease_predictions(classifier, images: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    from eval.medical.classification import predict   # imports transformers: only with a classifier
    return predict(classifier, images, batch_size=batch_size)


def disease_accuracy(classifier, originals: Originals, predictions) -> dict | None:
    """Per-class accuracy, All and Top1 of predictions against the originals' disease labels."""
    if predictions is None:
        return None
    from eval.medical.classification import per_class_accuracy
    true = np.array([classifier.classes.index(o.record.disease) for o in originals])
    return per_class_accuracy(predictions, true, classifier.classes)


def identity_distances(original_features: dict, features: dict) -> dict:
    """ID-Dis (eval.identity.metrics.IDDistance) of each identity model, pair i = original i vs output i."""
    return {model: id_distance(original_features[model], feats) for model, feats in features.items()}


def embed_folder(images: Originals, tools: Tools, models: list[str], batch: int, known: dict | None = None,
                 original_features: dict | None = None) -> dict:
    """Features of a folder's images, each with its own face detection; images found in ``known``
    (path -> originals row) take the originals' features instead of being embedded again."""
    known = known or {}
    rows = [known.get(item.path.resolve()) for item in images]
    features = {m: np.full((len(images), tools.identity[m].dim), np.nan, np.float32) for m in models}
    reused = [i for i, r in enumerate(rows) if r is not None]
    for m in models:
        if reused:
            features[m][reused] = original_features[m][[rows[i] for i in reused]]
    for chunk in chunks([i for i, r in enumerate(rows) if r is None], batch):
        loaded = [load_rgb(images.items[i].path) for i in chunk]
        for m in models:
            features[m][chunk] = tools.identity[m].embed(loaded)
    return features


# ------------------------------------------------------------------------------- originals, outputs

@dataclasses.dataclass
class OriginalScores:
    boxes: dict           # name -> FaceBox | None (only when landmarks or gaze are scored)
    points: dict          # name -> (68, 2) landmarks
    gaze: dict            # name -> (pitch, yaw) degrees
    faces: dict           # identity model -> [Face | None] in originals order
    features: dict        # identity model -> (N, D)


def score_originals(originals: Originals, tools: Tools, batch: int, recorded: list | None = None) -> OriginalScores:
    """``recorded`` (one Face or None per original): the faces each identity model embeds at instead of
    its own detector's (a MeMa folder's faces.csv: every small synthetic face, not only those found)."""
    scores = OriginalScores({}, {}, {}, {m: [] for m in tools.identity}, {m: [] for m in tools.identity})
    for start, chunk in zip(range(0, len(originals.items), batch), chunks(originals.items, batch)):
        names = [o.name for o in chunk]
        images = [load_rgb(o.path) for o in chunk]
        if tools.landmarker or tools.gaze:
            boxes = face_boxes(images)
            scores.boxes.update(zip(names, boxes))
            if tools.landmarker:
                scores.points.update((n, p) for n, p in zip(names, landmark_points(tools.landmarker, images, boxes))
                                     if p is not None)
            if tools.gaze:
                scores.gaze.update((n, a) for n, a in zip(names, gaze_angles(tools.gaze, images, boxes))
                                   if a is not None)
        for name, model in tools.identity.items():
            faces = (recorded[start:start + len(chunk)] if recorded is not None
                     else [model.locate(image) for image in images])
            scores.faces[name] += faces
            scores.features[name].append(model.embed(images, faces))
    scores.features = {m: np.concatenate(f) for m, f in scores.features.items()}
    return scores


@dataclasses.dataclass
class OutputScores:
    per_image: dict       # name -> {column: value}, originals order
    features: dict        # identity model -> (N, D), originals order
    id_dis: dict          # identity model -> IDDistance against the originals
    predictions: np.ndarray | None


def score_outputs(pairs: list[ImagePair], base: OriginalScores, tools: Tools, *, batch: int,
                  faces_from_originals: bool, reconstruction: bool) -> OutputScores:
    """Scores a method's output images against their originals; ``reconstruction`` adds PSNR and LPIPS."""
    per_image = {p.name: {} for p in pairs}
    features = {m: [] for m in tools.identity}
    predictions = []
    offset = 0
    for chunk in chunks(pairs, batch):
        names = [p.name for p in chunk]
        images = [load_rgb(p.output) for p in chunk]
        boxes = [base.boxes.get(n) for n in names]
        rows = [per_image[n] for n in names]
        if tools.landmarker:
            for row, errors in zip(rows, landmark_errors(tools.landmarker, images, boxes,
                                                         [base.points.get(n) for n in names])):
                row.update(errors)
        if reconstruction:
            originals = [load_rgb(p.original.path) for p in chunk]
            for row, errors in zip(rows, reconstruction_errors(tools.lpips, originals, images)):
                row.update(errors)
        if tools.gaze:
            for row, errors in zip(rows, gaze_errors(tools.gaze, images, boxes, [base.gaze.get(n) for n in names])):
                row.update(errors)
        for name, model in tools.identity.items():
            faces = base.faces[name][offset:offset + len(chunk)] if faces_from_originals else None
            features[name].append(model.embed(images, faces))
        if tools.classifier is not None:
            predictions.append(disease_predictions(tools.classifier, images, batch))
        offset += len(chunk)
    features = {m: np.concatenate(f) for m, f in features.items()}
    id_dis = identity_distances(base.features, features)
    for model, dist in id_dis.items():
        for name, d in zip(per_image, dist.per_pair):
            per_image[name][f"id_dis_{model}"] = float(d)
    return OutputScores(per_image, features, id_dis, np.concatenate(predictions) if predictions else None)
