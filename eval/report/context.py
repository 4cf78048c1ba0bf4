"""The shared context of one report: config, originals, methods, loaded models, and scores that
are computed once, on first use, whichever tables read them.

``load`` reads and checks every input a table needs that the config can get wrong (method folders,
Tab. 1's and Tab. 6's galleries, the originals' diagnoses, the pairs file, every configured weight
file) before anything slow runs, then generates the reference method folders. The originals' scores, each method's
de-identified and recovered scores and the pairs check are computed when a table first asks.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import logging

from eval import inputs, reference_methods
from eval.identity.evaluate import PairVerification, identity_pairs, read_pairs_csv, verify_pairs
from eval.identity.faces import recorded_faces
from eval.inputs import ImagePair, InputMismatchError, Originals
from eval.report import scoring
from eval.report.tools import Notes, Tools, load_tools
from mema_jax.errors import InputError

REFERENCE_DIR = "reference"


class ReportConfigError(InputError, ValueError):
    """The config cannot be run as written; the message says which entry and why."""


# ------------------------------------------------------------------------------------------ methods

@dataclasses.dataclass
class Method:
    name: str
    dir: Path
    reversible: bool
    deid: list[ImagePair] = dataclasses.field(default_factory=list)
    recovered: list[ImagePair] = dataclasses.field(default_factory=list)

    @property
    def rev(self) -> str:
        """The tables' Rev column."""
        return "yes" if self.reversible else "no"


def _user_methods(config, originals: Originals) -> list[Method]:
    """The configured method folders, checked against the originals (before anything slow runs)."""
    users = []
    for name, entry in sorted(config.methods.items()):
        if not entry.dir:
            raise ReportConfigError(f"config.methods.{name}.dir is empty; give the method's output folder")
        users.append(Method(name, Path(entry.dir), bool(entry.reversible)))
    names = [*config.reference_methods.keys(), *(m.name for m in users)]
    if not names:
        raise ReportConfigError("the config lists no methods and no reference methods: nothing to score")
    if len(set(names)) != len(names):
        raise ReportConfigError(f"method names repeat: {sorted(names)}")
    _match_outputs(users, originals)
    return users


def _prepare_reference_methods(config, originals: Originals, out_dir: Path) -> list[Method]:
    """Generates (or reuses, when made with the same settings) the configured reference folders."""
    entries = sorted(config.reference_methods.items(), key=lambda kv: (kv[1].method, kv[1].strength, kv[0]))
    to_write, methods = [], []
    for name, entry in entries:
        folder = out_dir / REFERENCE_DIR / name
        methods.append(Method(name, folder, False))
        if not _reusable(folder, entry, originals):
            to_write.append(reference_methods.ReferenceSpec(entry.method, float(entry.strength), folder))
    if to_write:
        t0 = time.time()
        reference_methods.write_method_folders(originals, to_write)
        logging.warning("generated %d reference method folder(s) in %.0f s", len(to_write), time.time() - t0)
    _match_outputs(methods, originals)
    return methods


def _reusable(folder: Path, entry, originals: Originals) -> bool:
    info_file = folder / reference_methods.METHOD_FILE
    if not info_file.is_file():
        return False
    info = json.loads(info_file.read_text())
    same = (info.get("method") == entry.method and info.get("strength") == float(entry.strength)
            and info.get("originals") == str(originals.root)
            and info.get("face_box_scale") == reference_methods.FACE_BOX_SCALE
            and info.get("eye_pad") == reference_methods.EYE_PAD)
    if not same:
        return False
    try:
        inputs.match_method_folder(originals, folder, "deid")
    except (InputMismatchError, FileNotFoundError):
        return False
    return True


def _match_outputs(methods: list[Method], originals: Originals) -> None:
    """Pairs every method's outputs with the originals; one error naming every problem of every method."""
    problems = {}
    for method in methods:
        for kind in ("deid", "recovered") if method.reversible else ("deid",):
            try:
                setattr(method, kind, inputs.match_method_folder(originals, method.dir, kind))
            except InputMismatchError as e:
                problems.update({f"{method.name} {kind}/{name}": p for name, p in e.problems.items()})
            except FileNotFoundError as e:
                problems[f"{method.name} {kind}/"] = str(e)
    if problems:
        raise InputMismatchError(Path("method folders"), problems)


# ----------------------------------------------------------------------------------- other inputs

@dataclasses.dataclass
class LeakageInputs:
    """Tab. 1's folders, listed (not decoded)."""
    gallery: Originals | None   # the real patients
    rows: list                  # (row name, Originals of a generated folder or None, method name or None)


def _leakage_inputs(config, method_names: list[str]) -> LeakageInputs:
    """Lists Tab. 1's folders (no decoding), so a wrong entry stops the run before anything slow."""
    if not config.leakage.rows:
        return LeakageInputs(None, [])
    if not config.leakage.gallery:
        raise ReportConfigError("config.leakage.rows is set but config.leakage.gallery is empty; give the real "
                                "patients' photos (<identity>/ sub-folders, or a MeMa root with an identity column)")
    gallery = _identity_folder(config.leakage.gallery, "leakage.gallery")
    rows = []
    for name, entry in sorted(config.leakage.rows.items()):
        generated, method_name = entry.get("generated", ""), entry.get("method", "")
        if bool(generated) == bool(method_name):
            raise ReportConfigError(f"config.leakage.rows.{name}: set exactly one of generated (a folder of images) "
                                    f"and method (a method of this report); got {generated!r} and {method_name!r}")
        if method_name and method_name not in method_names:
            raise ReportConfigError(f"config.leakage.rows.{name}.method: {method_name!r} is not a method of this "
                                    f"report ({', '.join(sorted(method_names))})")
        rows.append((name, inputs.read_originals(generated) if generated else None, method_name or None))
    return LeakageInputs(gallery, rows)


def _matching_gallery(config) -> Originals | None:
    """Tab. 6's configured gallery, listed (None: leave-one-out over the originals)."""
    return _identity_folder(config.identity.gallery, "identity.gallery") if config.identity.gallery else None


def _identity_folder(folder: str, entry: str) -> Originals:
    """A gallery: photos that all carry their person's identity."""
    gallery = inputs.read_originals(folder)
    if not all(g.identity for g in gallery):
        raise ReportConfigError(f"config.{entry} {folder}: gallery images must sit in <identity>/ sub-folders "
                                "(or a MeMa root with an identity column)")
    return gallery


# config.identity.pairs = "originals": same/different pairs of the originals' own people (their
# identity column), drawn once with seed 0, embedded as the originals already are.
ORIGINAL_PAIRS = "originals"
FACE_SOURCES = ("detect", "recorded")


def _read_pairs(config) -> list:
    """The labelled pairs file, its images checked to exist (they are decoded when a table first asks)."""
    if not config.identity.pairs or config.identity.pairs == ORIGINAL_PAIRS:
        return []
    pairs = read_pairs_csv(config.identity.pairs)
    missing = sorted({str(f) for p in pairs for f in (p.first, p.second) if not f.is_file()})
    if missing:
        raise FileNotFoundError(f"{config.identity.pairs}: {len(missing)} pair images not found, first: {missing[:5]}")
    return pairs


def read_diagnoses(path: Path, names: Sequence[str]) -> list[str]:
    """The diagnosis of each of ``names`` from an image,diagnosis csv (Tab. 4)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: diagnoses file not found (columns image,diagnosis)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "diagnosis"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns image,diagnosis, got {reader.fieldnames}")
        by_name = {row["image"]: row["diagnosis"] for row in reader}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{path}: no diagnosis for {len(missing)} image(s): {missing[:10]}")
    return [by_name[n] for n in names]


# ------------------------------------------------------------------------------------------ context

@dataclasses.dataclass
class Context:
    config: object
    out_dir: Path
    originals: Originals
    methods: list[Method]                  # reference methods, then the configured ones
    tools: Tools
    notes: Notes                           # what is left out because a tool or input is not configured
    leakage: LeakageInputs
    diagnoses_original: list[str] | None   # Tab. 4, in originals order
    gallery: Originals | None              # config.identity.gallery (Tab. 6), None when unset
    pairs: list                            # config.identity.pairs (eval.identity.evaluate.FacePair), [] when unset
    recorded: list | None = None           # config.identity.faces = "recorded": the originals' faces.csv faces
    _scores: dict = dataclasses.field(default_factory=dict, repr=False)   # (method, kind) -> OutputScores

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.originals]

    @property
    def models(self) -> list[str]:
        """The identity models loaded, by name."""
        return sorted(self.tools.identity)

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    @functools.cached_property
    def base(self) -> scoring.OriginalScores:
        """The originals' faces, landmarks, gaze and identity features."""
        return scoring.score_originals(self.originals, self.tools, self.config.batch_size, recorded=self.recorded)

    @functools.cached_property
    def original_predictions(self):
        """The disease classifier's predictions on the originals (None without a classifier): the
        yardstick's own accuracy, the row every method's Med-Class is read against."""
        if self.tools.classifier is None:
            return None
        predictions = []
        for chunk in scoring.chunks(self.originals.items, self.config.batch_size):
            images = [scoring.load_rgb(o.path) for o in chunk]
            predictions.append(scoring.disease_predictions(self.tools.classifier, images, self.config.batch_size))
        return np.concatenate(predictions)

    def deid(self, method: Method) -> scoring.OutputScores:
        """The method's de-identified images scored against the originals."""
        return self._output_scores(method, "deid")

    def recovered(self, method: Method) -> scoring.OutputScores:
        """A reversible method's recovered images scored against the originals (PSNR and LPIPS too)."""
        if not method.reversible:
            raise ValueError(f"{method.name} is not reversible: it has no recovered images")
        return self._output_scores(method, "recovered")

    def _output_scores(self, method: Method, kind: str) -> scoring.OutputScores:
        if (method.name, kind) not in self._scores:
            t0 = time.time()
            self._scores[method.name, kind] = scoring.score_outputs(
                getattr(method, kind), self.base, self.tools, batch=self.config.batch_size,
                faces_from_originals=self.config.identity.faces_from_originals,
                reconstruction=kind == "recovered")
            logging.warning("scored %s %s in %.0f s", method.name, kind, time.time() - t0)
        return self._scores[method.name, kind]

    @functools.cached_property
    def original_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """``identity.pairs = "originals"``: (pairs (N, 2) of originals' indices, same (N,))."""
        return identity_pairs([o.identity for o in self.originals])

    @property
    def pairs_same(self) -> np.ndarray:
        if self.config.identity.pairs == ORIGINAL_PAIRS:
            return self.original_pairs[1]
        return np.array([p.same for p in self.pairs])

    @functools.cached_property
    def pair_results(self) -> dict:
        """Each identity model on the pairs file (the verification table and Tab. 1's thresholds use it)."""
        if not self.config.identity.pairs:
            return {}
        if self.config.identity.pairs == ORIGINAL_PAIRS:
            from eval.identity.metrics import id_distance, verification_accuracy

            (pairs, same), out = self.original_pairs, {}
            for name, features in sorted(self.base.features.items()):
                distances = id_distance(features[pairs[:, 0]], features[pairs[:, 1]]).per_pair
                out[name] = PairVerification(distances, verification_accuracy(distances, same, shuffle=True, seed=0))
            return out
        return {name: verify_pairs(model, self.pairs, max_side=self.config.identity.pairs_max_side or None)
                for name, model in sorted(self.tools.identity.items())}


def load(config, out_dir) -> Context:
    """Reads and checks the inputs, loads the models and generates the reference method folders."""
    out_dir = Path(out_dir)
    originals = inputs.read_originals(config.originals.root, split=config.originals.split)
    if config.max_images:
        originals = dataclasses.replace(originals, items=originals.items[:config.max_images])
    users = _user_methods(config, originals)
    leakage = _leakage_inputs(config, [*config.reference_methods.keys(), *(m.name for m in users)])
    diagnoses_original = (read_diagnoses(Path(config.agreement.diagnoses_original), [o.name for o in originals])
                          if config.agreement.diagnoses_original else None)
    gallery, pairs = _matching_gallery(config), _read_pairs(config)
    recorded = _recorded_faces(config, originals)
    if config.identity.pairs == ORIGINAL_PAIRS:
        try:
            identity_pairs([o.identity for o in originals])
        except ValueError as err:
            raise ReportConfigError(f"config.identity.pairs = {ORIGINAL_PAIRS!r}: the originals {config.originals.root} "
                                    f"(split {config.originals.split or 'all'}): {err}") from None
    notes = Notes()
    tools = load_tools(config, originals, notes)   # a missing weight file stops the run here, before slow work
    references = _prepare_reference_methods(config, originals, out_dir)
    return Context(config, out_dir, originals, references + users, tools, notes, leakage, diagnoses_original,
                   gallery, pairs, recorded)


def _recorded_faces(config, originals: Originals) -> list | None:
    """The originals' faces.csv faces where ``config.identity.faces = "recorded"`` (None: detect)."""
    source = config.identity.get("faces", "detect")
    if source not in FACE_SOURCES:
        raise ReportConfigError(f"config.identity.faces = {source!r}: expected one of {', '.join(FACE_SOURCES)}")
    if source == "detect":
        return None
    faces = recorded_faces(originals)
    if faces is None:
        raise ReportConfigError(f"config.identity.faces = 'recorded': the originals {config.originals.root} record no "
                                "faces (a MeMa root with faces.csv is needed); use 'detect'")
    return faces
