r"""MeMa Step 3, the identity filter, and Tab. 1: which generated images leak a real patient.

The paper (Step 3) removes the generated images whose identity features are close to the real
patient set; Tab. 1 reports the leakage percentage: the share of generated images whose nearest
real patient lies within an identity model's decision threshold, per model and averaged over them.

    python -m eval.leakage_filter filter --generated GEN_MEMA_DIR --real REAL_MEMA_DIR [--real-split train] \
        --out KEPT_DIR --model NAME[=WEIGHTS] [--model ...] [--threshold NAME=T ...] [--pairs PAIRS_CSV] \
        [--pairs-max-side N] [--faces detect|real-mean] [--detector auto|dlib|dlib_cnn|mtcnn] \
        [--keep-faceless] [--overwrite]

    python -m eval.leakage_filter tab1 --row "Direct sample=GEN_DIR1" --row "Face injection=GEN_DIR2" \
        --real REAL_MEMA_DIR --model NAME[=WEIGHTS] ... [--threshold/--pairs/--faces as above] --out TAB_DIR

Both folders are MeMa-layout folders (``mema_jax.data.layout``). The gallery is the real folder's
images (one split with ``--real-split``); an image's identity is its labels.csv ``identity``; an
empty identity makes the image its own identity. Every generated and gallery image is embedded
with each ``--model`` (``eval.identity``: L2-normalised features, distances in [0, 2]).

Decisions, in the order they are applied:

- threshold, per model: ``--threshold NAME=T`` (a distance of L2-normalised features), else the
  threshold that best separates the ``--pairs`` file's pairs (``best_threshold`` on
  ``verify_pairs`` distances, chosen on all pairs), else an error naming the model. For dlib,
  the documented 0.6 applies to its raw descriptors, whose norms are about 1.46 (1.33..1.62 on
  the shared real photos), so the same decision on the bridge's normalised features is about
  0.41 (on those photos the two decisions agree for 99.5% of pairs; master.csv's best is 0.39).
- flagged: an image is flagged when ANY model's nearest gallery image is within that model's
  threshold. The union is the conservative choice the filter exists for: a leak that one model
  sees is a leak, and models fail on different images (pose, blur, their detectors), so an
  image passes only when no model links it to a real patient.
- faceless: an image in which some model finds no face has not been checked by that model. It is
  counted, listed in ``no_face.csv`` and, privacy first, NOT kept, unless ``--keep-faceless``
  (an image flagged by another model stays flagged). The summary says which policy ran.
  In Tab. 1 a faceless image is left out of that model's percentage (as the paper scores
  detected faces), and the notes give the counts.
- faces: ``--faces detect`` (default) uses each model's own detector. ``--faces real-mean``
  embeds every generated image at the mean face (box and five points) of the real folder's
  faces.csv, scaled to the image's size: for a generator trained on an aligned set (e.g. the
  offline MeMa-Synth, whose 64 px faces dlib finds only sometimes). Real images then use their
  own faces.csv rows (an image without a row has no face). With real-mean no generated image is
  faceless: each is scored where the face of an aligned image would be.
- a model that finds no face in any gallery image cannot check anything: an error.

``filter`` writes KEPT_DIR, a new MeMa folder: the kept images (and their masks) copied byte for
byte, labels.csv, faces.csv and generation.csv (when the input has one with an ``image_id``
column) restricted to the kept rows, all other columns as they were; plus ``leakage.csv`` (one
row per generated image: per model the nearest real image, its identity, the distance and
whether it is within the threshold; overall flagged / no_face / kept), ``no_face.csv`` and
``summary.json`` (counts, thresholds and how they were chosen, per-model leakage %). KEPT_DIR
must not exist or be empty (``--overwrite`` replaces it); it is written into a temp folder
beside it and renamed into place. The input folders are only read.

``tab1`` writes TAB_DIR/tab1_leakage.md and tab1_leakage.csv (rows = the named sets, columns =
leakage % per model and Average = the mean over models), the same table as ``eval.report``'s.

Bad input (a malformed folder, an unknown model, a missing weight file, no threshold, an output
in the way) is a :class:`LeakageFilterError` (an ``InputError``); the command prints it as one
line and exits with status 1 (2 for a malformed command line).

Python API: :func:`parse_model_spec`, :func:`load_models`, :func:`read_set`, :func:`mean_face`,
:func:`embed_set`, :func:`embed_gallery`, :func:`resolve_thresholds`, :func:`leakage`,
:func:`filter_folder`, :func:`tab1_table`, :func:`write_tab1`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from eval.identity import IDENTITY_MODELS, IdentityModel, face_found, load_identity_model
from eval.identity.faces import EYES_NOSE_MOUTH5, Face
from eval.identity.metrics import GalleryMatch, best_threshold, identity_leakage_rate
from eval.identity.weights import MissingWeightsError
from mema_jax.data import layout
from mema_jax.errors import InputError
from mema_jax.fileio import atomic_write_bytes

FACE_MODES = ("detect", "real-mean")
DETECTORS = ("auto", "dlib", "dlib_cnn", "mtcnn")
EMBED_CHUNK = 64            # images decoded at a time
GENERATION_FILE = "generation.csv"
LEAKAGE_FILE = "leakage.csv"
NO_FACE_FILE = "no_face.csv"
SUMMARY_FILE = "summary.json"
TAB1_KEY = "tab1_leakage"
UNION_RULE = ("an image is flagged when any identity model's nearest real image is within that model's threshold "
              "(the union: a leak one model sees is a leak)")


REAL_PAIRS = "real:"  # --pairs real:SPLIT: pairs of the real folder's SPLIT (held out of the gallery)


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


def _model_names(models) -> list[str]:
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
    _model_names(specs)
    models = {}
    for spec in specs:
        name, weights = parse_model_spec(spec)
        try:
            models[name] = load_identity_model(name, weights, device=device, detector=detector)
        except (MissingWeightsError, ValueError) as error:   # a missing or wrong weight file, a bad detector
            raise LeakageFilterError(f"--model {spec}: {error}") from None
    return models


def _loaded(models, detector: str) -> dict[str, IdentityModel]:
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

def embed_set(models: Mapping[str, IdentityModel], images: ImageSet, faces="detect") -> dict[str, np.ndarray]:
    """Features (N, dim) of every image with every model; a NaN row where that model has no face.

    ``faces``: ``"detect"`` (each model's own detector), ``"recorded"`` (the folder's faces.csv
    rows; no row = no face) or a :class:`MeanFace` (every image at the mean face, scaled to it).
    Each image is decoded once for all models.
    """
    if not (faces in ("detect", "recorded") or isinstance(faces, MeanFace)):
        raise ValueError(f"faces must be 'detect', 'recorded' or a MeanFace, got {faces!r}")
    features = {name: np.full((len(images), model.dim), np.nan, np.float32) for name, model in models.items()}
    for start in range(0, len(images), EMBED_CHUNK):
        records = images.records[start:start + EMBED_CHUNK]
        try:
            loaded = [images.dataset.load_image(r) for r in records]
        except layout.MeMaFormatError as error:
            raise LeakageFilterError(str(error)) from None
        if faces == "detect":
            given = None
        elif faces == "recorded":
            given = [recorded_face(images, r) for r in records]
        else:
            given = [faces.at(image.shape[1], image.shape[0]) for image in loaded]
        for name, model in models.items():
            features[name][start:start + len(records)] = model.embed(loaded, given)
    return features


@dataclasses.dataclass(frozen=True)
class Gallery:
    """The real patients: their images and each model's features."""

    images: ImageSet
    features: dict[str, np.ndarray]
    faces: str                       # how they were embedded: "detect" or "recorded"

    def n_faceless(self, model: str) -> int:
        return int((~face_found(self.features[model])).sum())


def embed_gallery(models: Mapping[str, IdentityModel], images: ImageSet, faces: str = "detect") -> Gallery:
    """The gallery's features (``faces``: ``"detect"``, or ``"real-mean"`` = the real folder's own
    faces.csv rows); a model that finds no face in any gallery image is an error."""
    how = "recorded" if faces == "real-mean" else "detect"
    features = embed_set(models, images, how)
    for name, feats in features.items():
        if not face_found(feats).any():
            where = "faces.csv records no face for them" if how == "recorded" else "its detector finds none"
            raise LeakageFilterError(f"real folder {images.root}: identity model {name} has no face in any of its "
                                     f"{len(images)} images ({where}); nothing could be checked against it")
    return Gallery(images, features, how)


# -------------------------------------------------------------------------------------- thresholds

@dataclasses.dataclass(frozen=True)
class Threshold:
    """A model's decision threshold (distance of L2-normalised features) and how it was chosen."""

    value: float
    source: str      # "given" or "pairs"
    how: str         # one sentence for the notes


def parse_threshold_specs(specs: Sequence[str]) -> dict[str, float]:
    """``NAME=T`` strings -> {name: T}."""
    thresholds = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name.strip() or not math.isfinite(number):
            raise LeakageFilterError(f"--threshold {spec}: expected NAME=T with T a number, e.g. dlib=0.41")
        if name.strip() in thresholds:
            raise LeakageFilterError(f"--threshold {name.strip()} given more than once")
        thresholds[name.strip()] = number
    return thresholds


def check_thresholds(names: Sequence[str], given: Mapping[str, float], pairs) -> None:
    """Before anything slow: every model has a threshold or the pairs file to choose one."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise LeakageFilterError(f"--threshold {', '.join(unknown)}: no such --model (models: {', '.join(names)})")
    for name, value in given.items():
        if not 0 <= value <= 2:
            raise LeakageFilterError(f"--threshold {name}={value}: distances of L2-normalised features lie in "
                                     "[0, 2]; expected a threshold in that range")
    missing = [n for n in names if n not in given]
    if missing and pairs is None:
        raise LeakageFilterError(f"identity model {missing[0]} has no decision threshold: give --threshold "
                                 f"{missing[0]}=T or --pairs PAIRS_CSV (file_x,file_y,Decision) to choose one")
    if missing and str(pairs).startswith(REAL_PAIRS):
        split = str(pairs)[len(REAL_PAIRS):]
        if split not in layout.SPLITS:
            raise LeakageFilterError(f"--pairs {pairs}: unknown split {split!r}; expected {REAL_PAIRS}one of "
                                     f"{list(layout.SPLITS)}")
        return
    if missing and not Path(pairs).is_file():
        raise LeakageFilterError(f"--pairs {pairs}: file does not exist (needed for the threshold of "
                                 f"{', '.join(missing)})")


def resolve_thresholds(models: Mapping[str, IdentityModel], given: Mapping[str, float] | None = None,
                       pairs=None, pairs_max_side: int | None = None) -> dict[str, Threshold]:
    """Each model's threshold: ``given[name]``, else the best one on the ``pairs`` file (images
    shrunk to ``pairs_max_side`` if given), else a :class:`LeakageFilterError` naming the model."""
    from eval.identity.evaluate import read_pairs_csv, verify_pairs

    given = dict(given or {})
    check_thresholds(list(models), given, pairs)
    thresholds = {name: Threshold(float(v), "given", f"{name}: {float(v):.4f} (given)")
                  for name, v in given.items()}
    missing = [n for n in models if n not in given]
    if missing:
        try:
            pair_list = read_pairs_csv(pairs)
        except ValueError as error:
            raise LeakageFilterError(f"--pairs: {error}") from None
        if not pair_list:
            raise LeakageFilterError(f"--pairs {pairs}: no pairs")
        same = np.array([p.same for p in pair_list])
        for name in missing:
            try:
                result = verify_pairs(models[name], pair_list, max_side=pairs_max_side, shuffle=True, seed=0)
            except FileNotFoundError as error:
                raise LeakageFilterError(f"--pairs {pairs}: {error}") from None
            except ValueError as error:   # too few pairs with faces for the folds
                raise LeakageFilterError(f"--pairs {pairs}, identity model {name}: {error}") from None
            ok = ~np.isnan(result.distances)
            value = best_threshold(result.distances[ok], same[ok])
            thresholds[name] = Threshold(value, "pairs", (
                f"{name}: {value:.4f}, the threshold that best separates the {int(ok.sum())} pairs of {pairs} with "
                f"a face on both sides (chosen on all pairs; 10-fold verification accuracy "
                f"{100 * result.verification.accuracy:.2f}%)"))
    return {name: thresholds[name] for name in models}


# ---------------------------------------------------------------------------------------- leakage

@dataclasses.dataclass(frozen=True)
class Leakage:
    """Per model, the gallery match of every generated image (``nearest_identity`` holds the
    nearest gallery row), and the union decisions."""

    images: ImageSet
    gallery: Gallery
    thresholds: dict[str, Threshold]
    matches: dict[str, GalleryMatch]

    @property
    def models(self) -> list[str]:
        return list(self.matches)

    def faceless(self, model: str) -> np.ndarray:
        return np.isnan(self.matches[model].nearest_distance)

    @property
    def flagged(self) -> np.ndarray:
        """Within the threshold of at least one model (the union)."""
        return np.logical_or.reduce([m.matched for m in self.matches.values()])

    @property
    def no_face(self) -> np.ndarray:
        """Some model found no face, so that model could not check the image."""
        return np.logical_or.reduce([self.faceless(m) for m in self.matches])

    def kept(self, keep_faceless: bool = False) -> np.ndarray:
        return ~self.flagged & (keep_faceless | ~self.no_face)

    def percent(self, model: str) -> float:
        """Tab. 1's value: flagged by ``model`` / images where ``model`` found a face, in percent."""
        return 100 * self.matches[model].rate

    def nearest(self, model: str, index: int) -> layout.Record | None:
        row = self.matches[model].nearest_identity[index]
        return None if row is None else self.gallery.images.records[row]


def leakage(features: Mapping[str, np.ndarray], images: ImageSet, gallery: Gallery,
            thresholds: Mapping[str, Threshold | float]) -> Leakage:
    """Nearest gallery image of each generated image per model, within that model's threshold or not."""
    thresholds = {m: t if isinstance(t, Threshold) else Threshold(float(t), "given", f"{m}: {float(t):.4f} (given)")
                  for m, t in thresholds.items()}
    rows = list(range(len(gallery.images)))   # gallery row as its "identity": nearest image and its identity
    matches = {m: identity_leakage_rate(features[m], gallery.features[m], rows, thresholds[m].value)
               for m in features}
    return Leakage(images, gallery, {m: thresholds[m] for m in features}, matches)


def _prepare(models, real, real_split, thresholds, pairs, faces):
    """What is cheap to check, before anything slow: models, thresholds, the real folder (and its mean face)."""
    names = _model_names(models)
    given = parse_threshold_specs(thresholds) if isinstance(thresholds, (list, tuple)) else dict(thresholds or {})
    check_thresholds(names, given, pairs)
    if faces not in FACE_MODES:
        raise LeakageFilterError(f"--faces {faces}: expected one of {', '.join(FACE_MODES)}")
    real_set = read_set(real, "real", real_split)
    mean = mean_face(real_set) if faces == "real-mean" else None
    return names, given, real_set, mean


def split_pair_thresholds(models: Mapping[str, IdentityModel], images: ImageSet, faces: str = "detect", *,
                          per_kind: int = 480, seed: int = 0) -> dict[str, Threshold]:
    """Each model's best threshold on same/different-person pairs of ``images`` (a real folder's
    held-out split, e.g. ``--pairs real:val``): ``per_kind`` pairs of each kind drawn with ``seed``,
    embedded as the gallery is (their recorded faces with ``--faces real-mean``)."""
    from eval.identity.metrics import id_distance, verification_accuracy

    ids = images.identities
    by_id: dict[str, list[int]] = {}
    for i, identity in enumerate(ids):
        if identity:
            by_id.setdefault(identity, []).append(i)
    same = [(a, b) for rows in by_id.values() for a, b in itertools.combinations(rows, 2)]
    people = sorted(by_id)
    if not same or len(people) < 2:
        raise LeakageFilterError(f"--pairs {REAL_PAIRS}{images.split}: {images.root / layout.LABELS_FILE} has too few "
                                 "identities with two images in that split to make pairs")
    rng = np.random.default_rng(seed)
    same = [same[i] for i in rng.permutation(len(same))[:per_kind]]
    different = []
    while len(different) < len(same):
        a, b = rng.choice(len(people), 2, replace=False)
        different.append((by_id[people[a]][int(rng.integers(len(by_id[people[a]])))],
                          by_id[people[b]][int(rng.integers(len(by_id[people[b]])))]))
    pairs = np.asarray(same + different)
    label = np.r_[np.ones(len(same), bool), np.zeros(len(different), bool)]
    features = embed_set(models, images, "recorded" if faces == "real-mean" else "detect")
    out = {}
    for name, feats in features.items():
        distances = id_distance(feats[pairs[:, 0]], feats[pairs[:, 1]]).per_pair
        ok = ~np.isnan(distances)
        if ok.sum() < 20:
            raise LeakageFilterError(f"--pairs {REAL_PAIRS}{images.split}, identity model {name}: only {int(ok.sum())} "
                                     "pairs with a face on both sides")
        value = best_threshold(distances[ok], label[ok])
        accuracy = verification_accuracy(distances[ok], label[ok], shuffle=True, seed=seed).accuracy
        out[name] = Threshold(value, "pairs", (
            f"{name}: {value:.4f}, the threshold that best separates {int(ok.sum())} same/different pairs of the "
            f"{images.split} split of {images.root} ({len(people)} people the gallery does not hold, faces "
            f"{'recorded' if faces == 'real-mean' else 'detected'}; chosen on all pairs; 10-fold verification "
            f"accuracy {100 * accuracy:.2f}%)"))
    return out


def _finish_prepare(models, detector, given, pairs, pairs_max_side, real_set, faces):
    loaded = _loaded(models, detector)
    if str(pairs).startswith(REAL_PAIRS) and any(n not in given for n in loaded):
        held_out = read_set(real_set.root, "real", str(pairs)[len(REAL_PAIRS):])
        chosen = split_pair_thresholds({n: m for n, m in loaded.items() if n not in given}, held_out, faces)
        resolved = {n: Threshold(float(given[n]), "given", f"{n}: {float(given[n]):.4f} (given)") if n in given
                    else chosen[n] for n in loaded}
    else:
        resolved = resolve_thresholds(loaded, given, pairs, pairs_max_side)
    gallery = embed_gallery(loaded, real_set, faces)
    return loaded, resolved, gallery


# ---------------------------------------------------------------------------------------- outputs

def _check_out(out: Path, overwrite: bool, inputs: Sequence[Path], flag: str = "--out") -> None:
    out = Path(out)
    resolved = out.resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if resolved == folder or resolved.is_relative_to(folder) or folder.is_relative_to(resolved):
            raise LeakageFilterError(f"{flag} {out}: overlaps the input folder {folder}; inputs are never written")
    if out.exists():
        if not out.is_dir():
            raise LeakageFilterError(f"{flag} {out}: exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise LeakageFilterError(f"{flag} {out}: exists and is not empty; remove it, choose another path or "
                                     "pass --overwrite")


def _publish(out: Path, overwrite: bool, fill) -> None:
    """``fill(tmp)`` writes into a temp folder beside ``out``, which then replaces ``out`` (absent,
    empty, or with ``overwrite`` any folder) by rename; on any error nothing of it is left."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        fill(tmp)
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise LeakageFilterError(f"--out {out}: appeared while writing; not replaced")
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)   # rename(2) replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _csv_bytes(header: Sequence[str], rows) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _filter_csv(source: Path, target: Path, keep: set[str]) -> int | None:
    """The rows of ``source`` whose image_id is in ``keep`` (header and every column as they are)
    written to ``target``; None (nothing written) when ``source`` has no image_id column."""
    with open(source, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or "image_id" not in rows[0]:
        return None
    column = rows[0].index("image_id")
    kept = [row for row in rows[1:] if len(row) > column and row[column].strip() in keep]
    atomic_write_bytes(target, _csv_bytes(rows[0], kept))
    return len(kept)


def _distance_text(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def _leakage_rows(result: Leakage, kept: np.ndarray):
    header = ["image_id", "image"]
    for m in result.models:
        header += [f"{m}_face", f"{m}_nearest_image_id", f"{m}_nearest_identity", f"{m}_distance", f"{m}_flagged"]
    header += ["flagged", "no_face", "kept"]
    rows = []
    flagged, no_face = result.flagged, result.no_face
    for i, record in enumerate(result.images.records):
        row = [record.image_id, record.image]
        for m in result.models:
            match, nearest = result.matches[m], result.nearest(m, i)
            if nearest is None:
                row += ["0", "", "", "", ""]
            else:
                row += ["1", nearest.image_id, nearest.identity, _distance_text(float(match.nearest_distance[i])),
                        str(int(match.matched[i]))]
        rows.append(row + [str(int(flagged[i])), str(int(no_face[i])), str(int(kept[i]))])
    return header, rows


def _no_face_rows(result: Leakage, kept: np.ndarray):
    rows = []
    for i in np.flatnonzero(result.no_face):
        record = result.images.records[i]
        models = ";".join(m for m in result.models if result.faceless(m)[i])
        rows.append([record.image_id, record.image, models, str(int(result.flagged[i])), str(int(kept[i]))])
    return ["image_id", "image", "models_without_face", "flagged", "kept"], rows


def summarise(result: Leakage, kept: np.ndarray, *, keep_faceless: bool, faces: str,
              models: Mapping[str, IdentityModel] | None = None) -> dict:
    """The counts, thresholds and per-model leakage behind a filter run, as summary.json holds them."""
    gallery = result.gallery
    per_model = {}
    for m in result.models:
        match = result.matches[m]
        per_model[m] = {
            "threshold": result.thresholds[m].value,
            "threshold_source": result.thresholds[m].source,
            "threshold_how": result.thresholds[m].how,
            "detector": None if models is None else getattr(models[m], "detector", None),
            "n_with_face": match.n_queries,
            "n_no_face": match.n_skipped,
            "n_flagged": match.n_matched,
            "leakage_percent": None if match.n_queries == 0 else 100 * match.rate,
            "gallery_no_face": gallery.n_faceless(m),
        }
    flagged, no_face = result.flagged, result.no_face
    faceless_unflagged = no_face & ~flagged
    policy = ("kept (--keep-faceless): images no model could fully check are kept" if keep_faceless else
              "not kept (privacy first; --keep-faceless keeps them)")
    return {
        "generated": str(result.images.root),
        "real": str(gallery.images.root),
        "real_split": gallery.images.split or "all",
        "faces": faces,
        "rule": UNION_RULE,
        "faceless_policy": f"images in which some model finds no face: {policy}",
        "n_generated": len(result.images),
        "n_gallery": len(gallery.images),
        "n_gallery_people": gallery.images.n_people,
        "n_flagged": int(flagged.sum()),
        "n_no_face": int(no_face.sum()),
        "n_no_face_not_flagged": int(faceless_unflagged.sum()),
        "n_kept": int(kept.sum()),
        "n_kept_without_face": int((kept & no_face).sum()),
        "models": per_model,
    }


@dataclasses.dataclass(frozen=True)
class FilterResult:
    out: Path
    leakage: Leakage
    kept: np.ndarray          # per generated image
    summary: dict


def filter_folder(generated, real, out, models, *, real_split: str = "", thresholds=None, pairs=None,
                  pairs_max_side: int | None = None, faces: str = "detect", detector: str = "auto",
                  keep_faceless: bool = False, overwrite: bool = False) -> FilterResult:
    """Step 3: writes ``out``, the generated MeMa folder without the images that leak a real patient.

    ``models``: ``NAME[=WEIGHTS]`` specs or a mapping name -> loaded IdentityModel.
    ``thresholds``: {name: T} or ``NAME=T`` strings; models without one take the best threshold
    on ``pairs``. See the module docstring for every decision and what ``out`` holds.
    """
    out = Path(out)
    names, given, real_set, mean = _prepare(models, real, real_split, thresholds, pairs, faces)
    generated_set = read_set(generated, "generated")
    _check_out(out, overwrite, [generated_set.root, real_set.root])
    loaded, resolved, gallery = _finish_prepare(models, detector, given, pairs, pairs_max_side, real_set, faces)
    features = embed_set(loaded, generated_set, mean if mean is not None else "detect")
    result = leakage(features, generated_set, gallery, resolved)
    kept = result.kept(keep_faceless)
    summary = summarise(result, kept, keep_faceless=keep_faceless, faces=faces, models=loaded)
    summary["out"] = str(out)
    if mean is not None:
        summary["mean_face"] = {"n_faces": mean.n_faces, "box_relative": list(mean.box),
                                "landmarks_relative": mean.landmarks.tolist()}
    kept_records = [r for r, k in zip(generated_set.records, kept) if k]
    notes = []
    if not kept_records:
        notes.append("no image was kept: labels.csv holds the header only (not a readable MeMa folder)")

    def fill(tmp: Path) -> None:
        source = generated_set.dataset
        for record in kept_records:
            for relative in (record.image, record.mask):
                if relative:
                    target = tmp / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source.root / relative, target)
        keep_ids = {r.image_id for r in kept_records}
        _filter_csv(generated_set.root / layout.LABELS_FILE, tmp / layout.LABELS_FILE, keep_ids)
        if (generated_set.root / layout.FACES_FILE).is_file():
            _filter_csv(generated_set.root / layout.FACES_FILE, tmp / layout.FACES_FILE, keep_ids)
        generation = generated_set.root / GENERATION_FILE
        if generation.is_file():
            if _filter_csv(generation, tmp / GENERATION_FILE, keep_ids) is None:
                notes.append(f"{generation} has no image_id column: not copied")
        atomic_write_bytes(tmp / LEAKAGE_FILE, _csv_bytes(*_leakage_rows(result, kept)))
        atomic_write_bytes(tmp / NO_FACE_FILE, _csv_bytes(*_no_face_rows(result, kept)))
        summary["notes"] = notes
        atomic_write_bytes(tmp / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
        if kept_records:
            layout.read_dataset(tmp)   # the kept folder is a valid MeMa folder before it is published

    _publish(out, overwrite, fill)
    return FilterResult(out, result, kept, summary)


# ------------------------------------------------------------------------------------------ Tab. 1

def parse_row_spec(spec: str) -> tuple[str, str]:
    """``"NAME=DIR"`` -> (name, dir)."""
    name, sep, folder = spec.partition("=")
    if not sep or not name.strip() or not folder:
        raise LeakageFilterError(f"--row {spec}: expected \"NAME=GENERATED_MEMA_DIR\", e.g. \"Direct sample=gen/\"")
    return name.strip(), folder


def tab1_table(rows: Sequence[tuple[str, object]], real, models, *, real_split: str = "", thresholds=None,
               pairs=None, pairs_max_side: int | None = None, faces: str = "detect", detector: str = "auto"):
    """Tab. 1 as an ``eval.report.table.Table``: one row per (name, generated MeMa folder), the
    leakage % per model and their mean; returns (table, {name: Leakage})."""
    from eval.report.scoring import nanmean
    from eval.report.tab1_leakage import TITLE
    from eval.report.table import Table, percent_value, text

    if not rows:
        raise LeakageFilterError("no --row NAME=GENERATED_MEMA_DIR given")
    names = [name for name, _ in rows]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LeakageFilterError(f"--row {', '.join(repeated)} given more than once")
    model_names, given, real_set, mean = _prepare(models, real, real_split, thresholds, pairs, faces)
    sets = [(name, read_set(folder, f"generated ({name})")) for name, folder in rows]
    loaded, resolved, gallery = _finish_prepare(models, detector, given, pairs, pairs_max_side, real_set, faces)
    table = Table(TAB1_KEY, TITLE, ["Row"], [text])
    table.add_columns([*model_names, "Average"], percent_value)
    results = {}
    faceless_notes = []
    for name, images in sets:
        result = leakage(embed_set(loaded, images, mean if mean is not None else "detect"), images, gallery, resolved)
        results[name] = result
        values = [result.percent(m) for m in model_names]
        table.rows.append([name, *values, nanmean(values)[0]])
        for m in model_names:
            match = result.matches[m]
            faceless_notes.append(f"{name}, {m}: {match.n_skipped} of {len(images)} generated images without a face")
    split = f", split {real_split}" if real_split else ""
    table.notes += [
        "Leakage % = generated images whose nearest real image lies within the model's decision threshold "
        "(distance of L2-normalised features), over the generated images in which that model finds a face; "
        "faceless images are left out of that model's percentage. Average = mean over the models.",
        "Thresholds: " + "; ".join(t.how for t in resolved.values()) + ".",
        f"Gallery: {real_set.root}{split}, {len(real_set)} images of {real_set.n_people} people "
        f"(an image without an identity counts as its own); without a face: "
        + ", ".join(f"{m} {gallery.n_faceless(m)}" for m in model_names) + ".",
        "Rows: " + "; ".join(f"{name} = {images.root} ({len(images)} images)" for name, images in sets) + ".",
        ("Faces: each model's own detector." if faces == "detect" else
         f"Faces: generated images at the mean face of {real_set.root / layout.FACES_FILE} "
         f"({mean.n_faces} faces), real images at their own recorded faces."),
        "Faceless images (left out of that model's percentage): " + "; ".join(faceless_notes) + ".",
    ]
    return table, results


def write_tab1(table, out, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Writes ``out``/tab1_leakage.md and .csv (``out`` new or empty, or ``overwrite``), atomically."""
    out = Path(out)
    _check_out(out, overwrite, [])

    def fill(tmp: Path) -> None:
        atomic_write_bytes(tmp / f"{table.key}.md", table.markdown().encode())
        atomic_write_bytes(tmp / f"{table.key}.csv", table.csv_text().encode())

    _publish(out, overwrite, fill)
    return out / f"{table.key}.md", out / f"{table.key}.csv"


def tab1(rows, real, out, models, *, overwrite: bool = False, **options):
    """:func:`tab1_table` then :func:`write_tab1`; the output folder and row folders are checked first."""
    rows = [parse_row_spec(r) if isinstance(r, str) else r for r in rows]
    inputs = [Path(real), *(Path(folder) for _, folder in rows)]
    _check_out(Path(out), overwrite, inputs)
    table, results = tab1_table(rows, real, models, **options)
    write_tab1(table, out, overwrite=overwrite)
    return table, results


# ---------------------------------------------------------------------------------------- command

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.leakage_filter",
                                     description="MeMa Step 3 identity filter and Tab. 1 (see the module docstring).")
    commands = parser.add_subparsers(dest="command", required=True)
    filt = commands.add_parser("filter", help="write the generated folder without the images that leak a patient")
    table = commands.add_parser("tab1", help="write Tab. 1 (leakage % per identity model) for named generated sets")
    filt.add_argument("--generated", required=True, help="generated MeMa folder")
    filt.add_argument("--keep-faceless", action="store_true",
                      help="keep images in which some model finds no face (default: not kept, privacy first)")
    table.add_argument("--row", action="append", required=True, metavar="NAME=GEN_DIR",
                       help="a table row: its name and generated MeMa folder (repeat)")
    for sub in (filt, table):
        sub.add_argument("--real", required=True,
                         help="real-patient MeMa folder (the gallery; identities from labels.csv)")
        sub.add_argument("--real-split", default="", choices=["", *layout.SPLITS],
                         help="only this split of the real folder (default: all images)")
        sub.add_argument("--out", required=True, help="output folder (new or empty; see --overwrite)")
        sub.add_argument("--model", action="append", required=True, metavar="NAME[=WEIGHTS]",
                         help=f"identity model (repeat): one of {', '.join(IDENTITY_MODELS)}")
        sub.add_argument("--threshold", action="append", default=[], metavar="NAME=T",
                         help="decision threshold of a model, a distance of L2-normalised features (dlib: 0.41 "
                              "is its documented 0.6 on raw descriptors)")
        sub.add_argument("--pairs", default=None, help="pairs csv (file_x,file_y,Decision) to choose the thresholds "
                                                       "not given")
        sub.add_argument("--pairs-max-side", type=int, default=None,
                         help="shrink the pairs photos to this longer side first (default: as they are)")
        sub.add_argument("--faces", default="detect", choices=FACE_MODES,
                         help="detect: each model's detector; real-mean: generated images at the mean face of the "
                              "real faces.csv")
        sub.add_argument("--detector", default="auto", choices=DETECTORS, help="face detector of the models")
        sub.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    options = dict(real_split=args.real_split, thresholds=args.threshold, pairs=args.pairs,
                   pairs_max_side=args.pairs_max_side, faces=args.faces, detector=args.detector)
    try:
        if args.command == "filter":
            result = filter_folder(args.generated, args.real, args.out, args.model, keep_faceless=args.keep_faceless,
                                   overwrite=args.overwrite, **options)
            s = result.summary
            print(f"{s['n_generated']} generated images: {s['n_flagged']} flagged, {s['n_no_face']} with no face "
                  f"for some model ({s['faceless_policy']}), {s['n_kept']} kept -> {result.out}")
            for name, m in s["models"].items():
                percent = "n/a" if m["leakage_percent"] is None else f"{m['leakage_percent']:.2f}%"
                print(f"  {name}: threshold {m['threshold']:.4f} ({m['threshold_source']}), leakage {percent} "
                      f"of {m['n_with_face']} with a face, {m['n_no_face']} without")
        else:
            table, _ = tab1(args.row, args.real, args.out, args.model, overwrite=args.overwrite, **options)
            print(table.markdown(), end="")
            print(f"wrote {Path(args.out) / (TAB1_KEY + '.md')} and {Path(args.out) / (TAB1_KEY + '.csv')}")
    except (InputError, FileNotFoundError) as error:   # the message names the file or model and the problem
        print(f"eval.leakage_filter: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
