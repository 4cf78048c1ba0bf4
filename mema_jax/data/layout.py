"""The MeMa folder layout: one reader and writer shared by MeMa, MeMa-Synth and the eval bridge.

Pure Python + numpy + PIL (no jax), so the PyTorch eval bridge can import it too.

    <root>/
      labels.csv      image_id,image,disease,severity,age,gender,split,identity,mask
      images/<image_id>.png   (any PIL-readable RGB image)
      masks/<image_id>.png    tumour masks (single channel, non-zero = tumour), segmentation subset only
      faces.csv       optional: image_id, face box x0,y0,x1,y1 and five landmarks (see FACE_COLUMNS)

Columns: ``disease`` one of DISEASES; ``severity`` one of SEVERITIES or empty (real MeMa has no
severity annotation); ``age`` an integer in years or empty; ``gender`` one of GENDERS or empty;
``split`` one of SPLITS (the paper's training / hyper-parameter-selection / validation sets);
``identity`` an identity id or empty when unknown; ``mask`` a relative path or empty.
"""
from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mema_jax.errors import InputError
from mema_jax.fileio import atomic_write_bytes, write_png  # noqa: F401  (re-exported for writers of the layout)

DISEASES = ("Normal", "BCC", "Conj", "Uveitis", "Ptosis", "SCC", "Strab", "TAO")
SEVERITIES = ("slight", "mid", "heavy")
SPLITS = ("train", "select", "val")
GENDERS = ("female", "male")
LABELS_FILE = "labels.csv"
COLUMNS = ("image_id", "image", "disease", "severity", "age", "gender", "split", "identity", "mask")
# The paper's split sizes: 34000 train / 3729 hyper-parameter selection / 4578 validation.
PAPER_SPLIT_SIZES = {"train": 34000, "select": 3729, "val": 4578}
# Optional per-image face: box (left, top, right, bottom) and five points in insightface / MTCNN
# order (image-left eye centre, image-right eye centre, nose tip, image-left and image-right mouth
# corner), all in image pixels with pixel centres at integers.  Absent file = faces unknown;
# an image without a row has no recorded face.
FACES_FILE = "faces.csv"
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
FACE_COLUMNS = ("image_id", "x0", "y0", "x1", "y1", *(f"{n}_{xy}" for n in LANDMARK_NAMES for xy in "xy"))


class MeMaFormatError(InputError, ValueError):
    """A MeMa folder is malformed; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Record:
    image_id: str
    image: str
    disease: str
    severity: str
    age: int | None
    gender: str
    split: str
    identity: str
    mask: str

    @property
    def label(self) -> int:
        return DISEASES.index(self.disease)


def _parse_row(row: dict, where: str) -> Record:
    def choice(name, allowed, allow_empty):
        value = (row.get(name) or "").strip()
        if value == "" and allow_empty:
            return ""
        if value not in allowed:
            raise MeMaFormatError(f"{where}: unknown {name} {value!r}; expected one of {list(allowed)}")
        return value

    image_id = (row.get("image_id") or "").strip()
    image = (row.get("image") or "").strip()
    if not image_id or not image:
        raise MeMaFormatError(f"{where}: image_id and image must not be empty")
    age_text = (row.get("age") or "").strip()
    try:
        age = int(age_text) if age_text else None
    except ValueError:
        raise MeMaFormatError(f"{where}: age {age_text!r} is not a whole number of years") from None
    if age is not None and not 0 <= age <= 130:
        raise MeMaFormatError(f"{where}: age {age} is out of range 0..130")
    return Record(
        image_id=image_id,
        image=image,
        disease=choice("disease", DISEASES, False),
        severity=choice("severity", SEVERITIES, True),
        age=age,
        gender=choice("gender", GENDERS, True),
        split=choice("split", SPLITS, False),
        identity=(row.get("identity") or "").strip(),
        mask=(row.get("mask") or "").strip(),
    )


def _check_image(path: Path, what: str, where: str) -> None:
    if not path.is_file():
        raise MeMaFormatError(f"{path}: {what} file is missing (listed at {where})")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        raise MeMaFormatError(f"{path}: {what} is not a readable image ({type(e).__name__}: {e})") from None


@dataclasses.dataclass(frozen=True)
class FaceRecord:
    """One row of faces.csv: ``box`` (x0, y0, x1, y1) and ``landmarks`` (5 x (x, y)), in pixels."""

    image_id: str
    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]

    def landmarks_array(self) -> np.ndarray:
        return np.asarray(self.landmarks, dtype=np.float64)


class MeMaDataset:
    """A validated MeMa-layout folder (``faces``: image_id -> FaceRecord, None without faces.csv)."""

    def __init__(self, root: Path, records: Sequence[Record], faces: dict[str, FaceRecord] | None = None):
        self.root = Path(root)
        self.records = tuple(records)
        self.faces = faces

    def face(self, rec: Record) -> FaceRecord | None:
        """The recorded face of ``rec`` (None: no faces.csv, or no row for this image)."""
        return None if self.faces is None else self.faces.get(rec.image_id)

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, records: Sequence[Record]) -> "MeMaDataset":
        """The same dataset (same storage: a folder, or ArrayRecord shards) with only ``records``."""
        import copy

        out = copy.copy(self)
        out.records = tuple(records)
        return out

    def split(self, name: str) -> list[Record]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return [r for r in self.records if r.split == name]

    def image_path(self, rec: Record) -> Path:
        return self.root / rec.image

    def mask_path(self, rec: Record) -> Path | None:
        return self.root / rec.mask if rec.mask else None

    def load_image(self, rec: Record) -> np.ndarray:
        path = self.image_path(rec)
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as e:
            raise MeMaFormatError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None

    def load_mask(self, rec: Record) -> np.ndarray:
        path = self.mask_path(rec)
        if path is None:
            raise ValueError(f"record {rec.image_id} has no mask")
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L")) > 0
        except Exception as e:
            raise MeMaFormatError(f"{path}: cannot decode mask ({type(e).__name__}: {e})") from None


def read_dataset(root, *, verify_images: bool = True) -> MeMaDataset:
    """Reads and validates ``root``; raises MeMaFormatError naming the first bad file."""
    root = Path(root)
    labels = root / LABELS_FILE
    if not labels.is_file():
        raise MeMaFormatError(f"{labels}: labels table is missing (is {root} a MeMa folder?)")
    with open(labels, newline="") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise MeMaFormatError(f"{labels}: missing columns {missing}; the header must hold {list(COLUMNS)}")
        records = [_parse_row(row, f"{labels} line {i + 2}") for i, row in enumerate(reader)]
    if not records:
        raise MeMaFormatError(f"{labels}: no rows")
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        where = f"{labels} line {i + 2}"
        if rec.image_id in seen:
            raise MeMaFormatError(f"{where}: image_id {rec.image_id!r} repeats line {seen[rec.image_id] + 2}")
        seen[rec.image_id] = i
        for rel in (rec.image, rec.mask):
            if rel and (Path(rel).is_absolute() or ".." in Path(rel).parts):
                raise MeMaFormatError(f"{where}: path {rel!r} must be relative and inside {root}")
        if verify_images:
            _check_image(root / rec.image, "image", where)
            if rec.mask:
                _check_image(root / rec.mask, "mask", where)
        elif not (root / rec.image).is_file():
            raise MeMaFormatError(f"{root / rec.image}: image file is missing (listed at {where})")
    return MeMaDataset(root, records, read_faces(root, seen))


def _face_row(row: dict, where: str) -> FaceRecord:
    values = []
    for name in FACE_COLUMNS[1:]:
        text = (row.get(name) or "").strip()
        try:
            value = float(text)
        except ValueError:
            raise MeMaFormatError(f"{where}: {name} {text!r} is not a number") from None
        if not np.isfinite(value):
            raise MeMaFormatError(f"{where}: {name} {text!r} is not finite")
        values.append(value)
    x0, y0, x1, y1 = values[:4]
    if not (x0 < x1 and y0 < y1):
        raise MeMaFormatError(f"{where}: box ({x0}, {y0}, {x1}, {y1}) is empty (needs x0 < x1 and y0 < y1)")
    points = tuple((values[i], values[i + 1]) for i in range(4, 14, 2))
    return FaceRecord((row.get("image_id") or "").strip(), (x0, y0, x1, y1), points)


def read_faces(root, image_ids: Iterable[str] | None = None) -> dict[str, FaceRecord] | None:
    """``<root>/faces.csv`` as image_id -> FaceRecord, or None when the file is absent.  A missing
    column, a non-numeric or empty box, an image_id twice or one that labels.csv does not list
    (``image_ids``) is a MeMaFormatError naming the file and line."""
    path = Path(root) / FACES_FILE
    if not path.is_file():
        return None
    known = None if image_ids is None else set(image_ids)
    faces: dict[str, FaceRecord] = {}
    lines: dict[str, int] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in FACE_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise MeMaFormatError(f"{path}: missing columns {missing}; the header must hold {list(FACE_COLUMNS)}")
        for i, row in enumerate(reader):
            where = f"{path} line {i + 2}"
            face = _face_row(row, where)
            if not face.image_id:
                raise MeMaFormatError(f"{where}: image_id must not be empty")
            if face.image_id in faces:
                raise MeMaFormatError(f"{where}: image_id {face.image_id!r} repeats line {lines[face.image_id]}")
            if known is not None and face.image_id not in known:
                raise MeMaFormatError(f"{where}: image_id {face.image_id!r} is not in {LABELS_FILE}")
            faces[face.image_id] = face
            lines[face.image_id] = i + 2
    return faces


def write_faces(root, faces: Iterable[FaceRecord]) -> Path:
    """Writes ``<root>/faces.csv`` atomically (coordinates to 1/1000 pixel)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FACE_COLUMNS)
    for face in faces:
        numbers = [*face.box, *(v for point in face.landmarks for v in point)]
        writer.writerow([face.image_id, *(f"{v:.3f}" for v in numbers)])
    path = Path(root) / FACES_FILE
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def write_labels(root, records: Iterable[Record]) -> Path:
    """Writes ``<root>/labels.csv`` atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        row = dataclasses.asdict(rec)
        row["age"] = "" if rec.age is None else str(rec.age)
        writer.writerow(row)
    path = Path(root) / LABELS_FILE
    atomic_write_bytes(path, buf.getvalue().encode())
    return path
