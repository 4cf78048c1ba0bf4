r"""The one command: score de-identification methods' output folders and write the paper's tables.

  python -m eval.report --config=configs/eval_real_photos.py[:VARIANT] --out=DIR [--config.x.y=V ...]

The config (``get_config(arg)``; see configs/eval_real_photos.py and configs/eval_mema.py) names
the originals, the methods' folders (layout in eval/inputs.py), reference methods to generate,
and the models and weight files of each metric. Paths are relative to the current directory.

Writes into DIR:
  tables.md                    every table, each with note lines saying what was left out and why
  tab1_leakage.csv             Tab. 1: identity-leakage percentage of generated images per identity model, Average
  tab2_wasserstein.csv         Tab. 2: W1 between two label sets (disease, age, gender)
  tab3_medical.csv             Tab. 3: disease accuracy (per class, All, Top1), segmentation Dice/Jaccard
  tab4_kappa.csv               Tab. 4: Cohen's kappa of diagnoses on original vs de-identified images
  tab5_id_dis.csv              Tab. 5: ID-Dis per identity model
  tab6_matching.csv            Tab. 6: face-matching rate per identity model
  tab7_landmark_gaze.csv       Tab. 7: dlib landmark error (all/eye/mouth/nose), L2CS gaze error
  tab8_reversibility.csv       Tab. 8: recovered images: ID-Dis, PSNR, LPIPS, Med-Class
  verification.csv             identity models on a labelled pairs file (LFW protocol)
  per_image/<method>.csv       every per-image value behind the tables
  grids/<method>.png           examples: original | de-identified | recovered
  reference/<name>/            reference method folders generated for this report

Per-method files found by convention in a method folder: ``diagnoses.csv`` (columns image,diagnosis;
image = the original's name) for Tab. 4, ``segmentation/<image_id>.png`` (nnU-Net predictions on
the de-identified validation images) for Tab. 3's Dice and Jaccard.

A metric whose model or weights are not configured is left out with a note; a configured weight
file that does not exist stops the run with an error naming it.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from eval import grid, inputs, landmarks, reference_methods
from eval.agreement import cohen_kappa, label_distribution_distances
from eval.gaze import GazeEstimator, angle_difference
from eval.identity import face_found, load_identity_model
from eval.identity.evaluate import read_pairs_csv, verify_pairs
from eval.identity.metrics import best_threshold, face_matching_rate, id_distance, identity_leakage_rate
from eval.inputs import ImagePair, InputMismatchError, Originals, load_rgb
from eval.medical.segmentation import score_mask_folders
from eval.reconstruction import LPIPS, psnr
from mema_jax.data import layout

_CONFIG = config_flags.DEFINE_config_file("config", None, "Eval config file, e.g. configs/eval_real_photos.py.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder for the tables, grids and generated reference methods.")

DIAGNOSES_FILE = "diagnoses.csv"
SEGMENTATION_DIR = "segmentation"
REFERENCE_DIR = "reference"


class ReportConfigError(ValueError):
    """The config cannot be run as written; the message says which entry and why."""


# ----------------------------------------------------------------------------------------- tables

def _number(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def _percent(v: float) -> str:
    return f"{100 * v:.2f}%"


def _percent_value(v: float) -> str:
    return f"{v:.2f}%"   # values already in percent (Tab. 1, as the paper prints it)


def _text(v) -> str:
    return str(v)


@dataclasses.dataclass
class Table:
    """One paper table: ``rows`` hold raw values (NaN or None = not available)."""
    key: str
    title: str
    columns: list[str]
    formats: list[Callable]
    rows: list[list] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.rows:
            lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
            for row in self.rows:
                cells = ["n/a" if _missing(v) else fmt(v) for v, fmt in zip(row, self.formats)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        lines += [f"- Note: {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if _missing(v) else v for v in row])
        return buf.getvalue()


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _write_text(path: Path, text: str) -> None:
    layout.atomic_write_bytes(path, text.encode())


def _nanmean(values) -> tuple[float, int]:
    values = np.asarray([v for v in values], dtype=np.float64)
    ok = ~np.isnan(values)
    return (float(values[ok].mean()) if ok.any() else float("nan")), int(ok.sum())


# ------------------------------------------------------------------------------- methods and tools

@dataclasses.dataclass
class Method:
    name: str
    dir: Path
    reversible: bool
    deid: list[ImagePair] = dataclasses.field(default_factory=list)
    recovered: list[ImagePair] = dataclasses.field(default_factory=list)


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


@dataclasses.dataclass
class Tools:
    landmarker: object = None
    gaze: object = None
    identity: dict = dataclasses.field(default_factory=dict)   # name -> IdentityModel
    lpips: object = None
    classifier: object = None
    notes: dict = dataclasses.field(default_factory=dict)      # table key -> [note]

    def note(self, key: str, text: str) -> None:
        self.notes.setdefault(key, []).append(text)


def _build_tools(config, originals: Originals) -> Tools:
    tools = Tools()
    if config.landmarks.enabled:
        tools.landmarker = landmarks.Landmarker(config.landmarks.predictor or None)
    else:
        tools.note("tab7", "landmark error left out: config.landmarks.enabled is False.")
    if config.gaze.weights:
        tools.gaze = GazeEstimator(config.gaze.weights, device=config.device)
    else:
        tools.note("tab7", "gaze error left out: no L2CS-Net weights configured (set config.gaze.weights to "
                           "L2CSNet_gaze360.pkl from github.com/Ahmednull/L2CS-Net).")
    if config.identity.models:
        for name, entry in sorted(config.identity.models.items()):
            if not entry.weights and name != "dlib":
                for key in ("tab1", "tab5", "tab6", "tab8", "verification"):
                    tools.note(key, f"{name} left out: no weights configured (config.identity.models.{name}.weights).")
                continue
            tools.identity[name] = load_identity_model(name, entry.weights or None, device=config.device,
                                                       detector=config.identity.detector)
    else:
        for key in ("tab1", "tab5", "tab6", "tab8"):
            tools.note(key, "identity metrics left out: config.identity.models is empty.")
    if config.reconstruction.lpips_backbone:
        tools.lpips = LPIPS(config.reconstruction.lpips_backbone, net=config.reconstruction.lpips_net,
                            device=config.device)
    else:
        tools.note("tab8", "LPIPS left out: no backbone weights configured (config.reconstruction.lpips_backbone: "
                           "torchvision's alexnet-owt-7be5be79.pth).")
    if config.medical.classifier:
        if originals.dataset is None:
            tools.note("tab3", "disease accuracy left out: the originals are a plain folder without disease labels.")
        else:
            from eval.medical.classification import load_classifier   # imports transformers: only when asked
            tools.classifier = load_classifier(config.medical.classifier, device=config.device)
    else:
        for key in ("tab3", "tab8"):
            tools.note(key, "disease accuracy left out: no fine-tuned classifier configured "
                            "(config.medical.classifier; train one with "
                            "`python -m eval.medical.classification train`).")
    return tools


# --------------------------------------------------------------------------------------- scoring

def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclasses.dataclass
class OriginalScores:
    boxes: dict           # name -> FaceBox | None (dlib HOG, shared by landmarks and gaze)
    points: dict          # name -> (68, 2) landmarks
    gaze: dict            # name -> (pitch, yaw) degrees
    faces: dict           # identity model -> [Face | None] in originals order
    features: dict        # identity model -> (N, D)


def _score_originals(originals: Originals, tools: Tools, batch: int) -> OriginalScores:
    scores = OriginalScores({}, {}, {}, {m: [] for m in tools.identity}, {m: [] for m in tools.identity})
    for chunk in _chunks(originals.items, batch):
        images = [load_rgb(o.path) for o in chunk]
        if tools.landmarker or tools.gaze:
            for item, image in zip(chunk, images):
                scores.boxes[item.name] = box = landmarks.detect_face(image)
                if box is not None and tools.landmarker:
                    scores.points[item.name] = tools.landmarker.landmarks(image, box)
            with_face = [(o.name, im, scores.boxes[o.name]) for o, im in zip(chunk, images) if scores.boxes[o.name]]
            if tools.gaze and with_face:
                pitch, yaw = tools.gaze.predict([im for _, im, _ in with_face], [b for _, _, b in with_face])
                scores.gaze.update({n: (p, y) for (n, _, _), p, y in zip(with_face, pitch, yaw)})
        for name, model in tools.identity.items():
            faces = [model.locate(image) for image in images]
            scores.faces[name] += faces
            scores.features[name].append(model.embed(images, faces))
    scores.features = {m: np.concatenate(f) for m, f in scores.features.items()}
    return scores


@dataclasses.dataclass
class OutputScores:
    per_image: dict       # name -> {column: value}
    features: dict        # identity model -> (N, D), originals order
    predictions: np.ndarray | None


def _score_outputs(pairs: list[ImagePair], base: OriginalScores, tools: Tools, config, *,
                   reconstruction: bool) -> OutputScores:
    per_image = {p.name: {} for p in pairs}
    features = {m: [] for m in tools.identity}
    predictions = []
    offset = 0
    for chunk in _chunks(pairs, config.batch_size):
        images = [load_rgb(p.output) for p in chunk]
        originals = [load_rgb(p.original.path) for p in chunk] if reconstruction else None
        for i, (pair, image) in enumerate(zip(chunk, images)):
            row = per_image[pair.name]
            box = base.boxes.get(pair.name)
            if tools.landmarker and box is not None:
                errors = landmarks.point_errors(base.points[pair.name], tools.landmarker.landmarks(image, box))
                row.update({f"landmark_{g}": e for g, e in errors.items()})
            if reconstruction:
                row["psnr"] = psnr(originals[i], image)
                if tools.lpips:
                    row["lpips"] = tools.lpips(originals[i], image)
        if tools.gaze:
            with_face = [(p.name, im) for p, im in zip(chunk, images) if base.boxes.get(p.name)]
            if with_face:
                pitch, yaw = tools.gaze.predict([im for _, im in with_face], [base.boxes[n] for n, _ in with_face])
                for (name, _), p, y in zip(with_face, pitch, yaw):
                    per_image[name]["gaze_pitch"] = float(angle_difference(base.gaze[name][0], p))
                    per_image[name]["gaze_yaw"] = float(angle_difference(base.gaze[name][1], y))
        for name, model in tools.identity.items():
            faces = base.faces[name][offset:offset + len(chunk)] if config.identity.faces_from_originals else None
            features[name].append(model.embed(images, faces))
        if tools.classifier is not None:
            from eval.medical.classification import predict
            predictions.append(predict(tools.classifier, images, batch_size=config.batch_size))
        offset += len(chunk)
    features = {m: np.concatenate(f) for m, f in features.items()}
    return OutputScores(per_image, features, np.concatenate(predictions) if predictions else None)


def _id_distances(base: OriginalScores, outputs: OutputScores, pairs: list[ImagePair]) -> dict:
    result = {}
    for model, feats in outputs.features.items():
        dist = id_distance(base.features[model], feats)
        for pair, d in zip(pairs, dist.per_pair):
            outputs.per_image[pair.name][f"id_dis_{model}"] = float(d)
        result[model] = dist
    return result


def _disease_accuracy(tools: Tools, originals: Originals, predictions) -> dict | None:
    if predictions is None:
        return None
    from eval.medical.classification import per_class_accuracy
    true = np.array([tools.classifier.classes.index(o.record.disease) for o in originals])
    return per_class_accuracy(predictions, true, tools.classifier.classes)


@dataclasses.dataclass
class Gallery:
    """Where a de-identified image is searched for its person (Tab. 6)."""
    description: str
    features: dict          # model -> (G, D)
    ids: list
    exclude_self: bool      # leave-one-out over the originals themselves


def _build_gallery(config, originals: Originals, base: OriginalScores, tools: Tools) -> Gallery | None:
    if not tools.identity:
        return None
    if config.identity.gallery:
        gallery = inputs.read_originals(config.identity.gallery)
        ids = [g.identity for g in gallery]
        if not all(ids):
            raise ValueError(f"{config.identity.gallery}: gallery images must sit in <identity>/ sub-folders "
                             f"(or a MeMa root with an identity column)")
        images = [load_rgb(g.path) for g in gallery]
        features = {name: model.embed(images) for name, model in tools.identity.items()}
        return Gallery(f"gallery {config.identity.gallery} ({len(ids)} images)", features, ids, False)
    ids = [o.identity for o in originals]
    if sum(1 for i in ids if i) < 2:
        tools.note("tab6", "matching rate left out: no gallery configured (config.identity.gallery) and the "
                           "originals carry no identities to search among.")
        return None
    # A nearest neighbour drawn at random would be right this often (a few people with many photos raise it).
    eligible = [i for i in ids if i and ids.count(i) > 1]
    known = sum(1 for i in ids if i)
    chance = float(np.mean([(ids.count(i) - 1) / (known - 1) for i in eligible])) if eligible else 0.0
    return Gallery(f"leave-one-out over the originals: each de-identified image is searched among the OTHER "
                   f"originals ({len(eligible)} images whose person has another photo; "
                   f"chance level {100 * chance:.1f}%)",
                   base.features, ids, True)


def _matching_rates(gallery: Gallery, originals: Originals, outputs: OutputScores, config) -> dict:
    query_ids = [o.identity for o in originals]
    rates = {}
    for model, feats in outputs.features.items():
        threshold = config.identity.models[model].match_threshold
        if not gallery.exclude_self:
            known = [i for i, q in enumerate(query_ids) if q]
            match = face_matching_rate(feats[known], gallery.features[model], gallery.ids,
                                       [query_ids[i] for i in known], threshold=threshold)
            rates[model] = match.rate
            continue
        matched, scored = 0, 0
        for i, identity in enumerate(query_ids):
            others = [j for j in range(len(query_ids)) if j != i and query_ids[j]]
            if not identity or identity not in {query_ids[j] for j in others}:
                continue   # no other photo of this person to find
            match = face_matching_rate(feats[i:i + 1], gallery.features[model][others],
                                       [query_ids[j] for j in others], [identity], threshold=threshold)
            matched += match.n_matched
            scored += match.n_queries
        rates[model] = matched / scored if scored else float("nan")
    return rates


# ------------------------------------------------------------------------------- Tab. 1: leakage

@dataclasses.dataclass
class LeakageInputs:
    gallery: Originals | None   # the real patients
    rows: list                  # (row name, Originals of a generated folder or None, method name or None)


def _leakage_inputs(config, method_names: list[str]) -> LeakageInputs:
    """Lists Tab. 1's folders (no decoding), so a wrong entry stops the run before anything slow."""
    if not config.leakage.rows:
        return LeakageInputs(None, [])
    if not config.leakage.gallery:
        raise ReportConfigError("config.leakage.rows is set but config.leakage.gallery is empty; give the real "
                                "patients' photos (<identity>/ sub-folders, or a MeMa root with an identity column)")
    gallery = inputs.read_originals(config.leakage.gallery)
    if not all(g.identity for g in gallery):
        raise ReportConfigError(f"config.leakage.gallery {config.leakage.gallery}: gallery images must sit in "
                                "<identity>/ sub-folders (or a MeMa root with an identity column)")
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


def _leakage_thresholds(config, models: list[str], pair_results: dict, notes: list[str]) -> dict:
    """Each model's decision threshold: the configured one, else the best one on the pairs file, else none."""
    thresholds = {}
    for model in models:
        configured = config.identity.models[model].match_threshold
        result = pair_results.get(model)
        if configured is not None:
            thresholds[model] = float(configured)
        elif result is not None and (~np.isnan(result.distances)).any():
            same = np.array([p.same for p in read_pairs_csv(config.identity.pairs)])
            ok = ~np.isnan(result.distances)
            thresholds[model] = best_threshold(result.distances[ok], same[ok])
            notes.append(f"{model}: no match_threshold configured; using {thresholds[model]:.4f}, the threshold "
                         f"that best separates the {int(ok.sum())} pairs of {config.identity.pairs} with faces "
                         "(same person iff distance <= threshold, chosen on all pairs).")
        else:
            why = "its pairs have no face" if result is not None else "config.identity.pairs is empty"
            notes.append(f"{model} left out: no decision threshold (config.identity.models.{model}.match_threshold "
                         f"unset and {why}).")
    return thresholds


def _embed_folder(images: Originals, tools: Tools, models: list[str], batch: int, known: dict | None = None,
                  base: OriginalScores | None = None) -> dict:
    """Features of a folder's images, each with its own face detection; images found in ``known``
    (path -> originals row) take the originals' features instead of being embedded again."""
    known = known or {}
    rows = [known.get(item.path.resolve()) for item in images]
    features = {m: np.full((len(images), tools.identity[m].dim), np.nan, np.float32) for m in models}
    reused = [i for i, r in enumerate(rows) if r is not None]
    for m in models:
        if reused:
            features[m][reused] = base.features[m][[rows[i] for i in reused]]
    for chunk in _chunks([i for i, r in enumerate(rows) if r is None], batch):
        loaded = [load_rgb(images.items[i].path) for i in chunk]
        for m in models:
            features[m][chunk] = tools.identity[m].embed(loaded)
    return features


def _leakage_table(config, leakage: LeakageInputs, originals: Originals, base: OriginalScores, tools: Tools,
                   pair_results: dict, method_features: dict) -> Table:
    table = Table("tab1_leakage", "Tab. 1: identity leakage of generated images (% whose nearest real patient is "
                  "within the threshold; lower = better)", ["Row"], [_text])
    if not leakage.rows:
        table.notes.append("left out: no rows configured (config.leakage.rows.<row> = {generated or method}, "
                           "config.leakage.gallery).")
        return table
    if not tools.identity:
        return table   # the tools' note says why
    thresholds = _leakage_thresholds(config, sorted(tools.identity), pair_results, table.notes)
    models = sorted(thresholds)
    if not models:
        table.notes.append("no identity model has a decision threshold: nothing to score.")
        return table
    table.columns += [*models, "Average"]
    table.formats += [_percent_value] * (len(models) + 1)
    # The real-photo config's gallery is its originals' folder: those photos are embedded already.
    known = {o.path.resolve(): i for i, o in enumerate(originals)}
    gallery_features = _embed_folder(leakage.gallery, tools, models, config.batch_size, known, base)
    gallery_ids = [g.identity for g in leakage.gallery]
    sizes = []
    for name, generated, method_name in leakage.rows:
        if method_name:
            features = method_features[method_name]
            sizes.append(f"{name} = method {method_name} ({len(originals)} de-identified images)")
        else:
            features = _embed_folder(generated, tools, models, config.batch_size)
            sizes.append(f"{name} = {generated.root} ({len(generated)} images)")
        values = []
        for model in models:
            match = identity_leakage_rate(features[model], gallery_features[model], gallery_ids, thresholds[model])
            values.append(100 * match.rate)
            if match.n_skipped:
                table.notes.append(f"{name}, {model}: {match.n_skipped} of {match.n_skipped + match.n_queries} "
                                   "generated images without a face, left out of the percentage.")
        table.rows.append([name, *values, _nanmean(values)[0]])
    for model in models:
        faceless = int((~face_found(gallery_features[model])).sum())
        if faceless:
            table.notes.append(f"gallery, {model}: {faceless} of {len(gallery_ids)} photos without a face left out.")
    how = ("embedded at the face found on its original" if config.identity.faces_from_originals
           else "with its own face detection")
    table.notes.append(f"gallery {config.leakage.gallery} ({len(gallery_ids)} photos of {len(set(gallery_ids))} "
                       f"people); rows: {'; '.join(sizes)}. Generated folders use each model's own face detection; "
                       f"a method's de-identified image is {how} (as in Tab. 5). Thresholds (distance of "
                       f"L2-normalised features): {', '.join(f'{m} {t:.4f}' for m, t in thresholds.items())}. "
                       "Average = mean over the models present.")
    return table


def _read_diagnoses(path: Path, names: Sequence[str]) -> list[str]:
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


# ---------------------------------------------------------------------------------------- report

def run(config, out_dir) -> dict[str, Table]:
    """Scores every configured method and writes the report; returns the tables by key."""
    out_dir = Path(out_dir)
    t_start = time.time()
    originals = inputs.read_originals(config.originals.root, split=config.originals.split)
    if config.max_images:
        originals = dataclasses.replace(originals, items=originals.items[:config.max_images])
    users = _user_methods(config, originals)
    leakage = _leakage_inputs(config, [*config.reference_methods.keys(), *(m.name for m in users)])
    tools = _build_tools(config, originals)   # a missing weight file stops the run here, before slow work
    references = _prepare_reference_methods(config, originals, out_dir)
    _match_outputs(references, originals)
    methods = references + users
    base = _score_originals(originals, tools, config.batch_size)
    gallery = _build_gallery(config, originals, base, tools)
    pair_results = _verify_pairs(config, tools)
    method_features = {}   # method -> identity model -> (N, D): Tab. 1 rows that name a method reuse them
    models = sorted(tools.identity)
    classes = list(tools.classifier.classes) if tools.classifier else []

    tab3 = Table("tab3_medical", "Tab. 3: medical utility (disease accuracy on de-identified images, segmentation)",
                 ["Method", "Rev", "All", "Top1", *classes, "Dice", "Jaccard"],
                 [_text, _text, _percent, _percent, *[_percent] * len(classes), _number(4), _number(4)])
    tab4 = Table("tab4_kappa", "Tab. 4: Cohen's kappa of diagnoses, original vs de-identified", ["Method"], [_text])
    tab5 = Table("tab5_id_dis", "Tab. 5: ID-Dis (original vs de-identified; higher = better de-identified)",
                 ["Method", "Rev", *models], [_text, _text, *[_number(4)] * len(models)])
    tab6 = Table("tab6_matching", "Tab. 6: face-matching rate of de-identified images (lower = better)",
                 ["Method", *models], [_text, *[_percent] * len(models)])
    lm_groups = list(landmarks.LANDMARK_GROUPS)
    tab7 = Table("tab7_landmark_gaze", "Tab. 7: landmark error (pixels) and gaze error (degrees)",
                 ["Method", "Rev", *[f"Landmark {g}" for g in lm_groups], "Gaze pitch", "Gaze yaw"],
                 [_text, _text, *[_number(2)] * (len(lm_groups) + 2)])
    tab8 = Table("tab8_reversibility", "Tab. 8: recovered images of reversible methods (ID-Dis and LPIPS: lower = "
                 "better)",
                 ["Method", *[f"ID-Dis {m}" for m in models], "PSNR (dB)", "LPIPS", "Med-Class"],
                 [_text, *[_number(4)] * len(models), _number(2), _number(4), _percent])

    kappa_rows, seg_truth = [], Path(config.medical.segmentation_truth) if config.medical.segmentation_truth else None
    names = [o.name for o in originals]
    diagnoses_original = (_read_diagnoses(Path(config.agreement.diagnoses_original), names)
                          if config.agreement.diagnoses_original else None)
    for method in methods:
        t0 = time.time()
        rev = "yes" if method.reversible else "no"
        outputs = _score_outputs(method.deid, base, tools, config, reconstruction=False)
        method_features[method.name] = outputs.features
        id_dis = _id_distances(base, outputs, method.deid)
        for model, dist in id_dis.items():
            if dist.n_skipped:
                tab5.notes.append(f"{method.name}, {model}: {dist.n_skipped} of {len(names)} pairs without a face "
                                  "left out of the mean.")
        tab5.rows.append([method.name, rev, *[id_dis[m].mean for m in models]])
        if gallery is not None:
            rates = _matching_rates(gallery, originals, outputs, config)
            tab6.rows.append([method.name, *[rates[m] for m in models]])
        lm = {g: _nanmean(r.get(f"landmark_{g}", np.nan) for r in outputs.per_image.values()) for g in lm_groups}
        gaze = {a: _nanmean(r.get(f"gaze_{a}", np.nan) for r in outputs.per_image.values()) for a in ("pitch", "yaw")}
        tab7.rows.append([method.name, rev, *[lm[g][0] for g in lm_groups], gaze["pitch"][0], gaze["yaw"][0]])

        accuracy = _disease_accuracy(tools, originals, outputs.predictions)
        dice = jaccard = float("nan")
        seg_dir = method.dir / SEGMENTATION_DIR
        if seg_truth is not None and seg_dir.is_dir():
            seg = score_mask_folders(seg_dir, seg_truth)
            dice, jaccard = seg.dice, seg.jaccard
        elif seg_truth is not None:
            tab3.notes.append(f"{method.name}: no nnU-Net predictions at {seg_dir}; Dice/Jaccard left out.")
        if accuracy is not None or not math.isnan(dice):
            acc = accuracy or {}
            tab3.rows.append([method.name, rev, acc.get("All"), acc.get("Top1"), *[acc.get(c) for c in classes],
                              dice, jaccard])

        if diagnoses_original is not None:
            diagnoses_file = method.dir / DIAGNOSES_FILE
            if diagnoses_file.is_file():
                diagnoses = _read_diagnoses(diagnoses_file, names)
                kappa_rows.append((method.name, cohen_kappa(diagnoses_original, diagnoses)))
            else:
                tab4.notes.append(f"{method.name}: no {DIAGNOSES_FILE} in {method.dir}; left out.")

        if method.reversible:
            recovered = _score_outputs(method.recovered, base, tools, config, reconstruction=True)
            rec_dis = _id_distances(base, recovered, method.recovered)
            rec_acc = _disease_accuracy(tools, originals, recovered.predictions)
            tab8.rows.append([method.name, *[rec_dis[m].mean for m in models],
                              _nanmean(r["psnr"] for r in recovered.per_image.values())[0],
                              _nanmean(r.get("lpips", np.nan) for r in recovered.per_image.values())[0],
                              rec_acc["All"] if rec_acc else None])
            for name, values in recovered.per_image.items():
                outputs.per_image[name].update({f"recovered_{k}": v for k, v in values.items()})
        _write_per_image(out_dir / "per_image" / f"{method.name}.csv", outputs.per_image)
        _write_method_grid(out_dir / "grids" / f"{method.name}.png", method, config)
        logging.warning("scored %s in %.0f s", method.name, time.time() - t0)

    _finish_notes(tools, base, originals, gallery, config, tab3, tab4, tab5, tab6, tab7, tab8, kappa_rows)
    tab1 = _leakage_table(config, leakage, originals, base, tools, pair_results, method_features)
    tables = [tab1, _label_distance_table(config), tab3, tab4, tab5, tab6, tab7, tab8,
              _verification_table(config, pair_results)]
    for table in tables:
        table.notes = tools.notes.get(table.key.split("_")[0], []) + table.notes
        _write_text(out_dir / f"{table.key}.csv", table.csv_text())
    header = (f"# De-identification report\n\nOriginals: {originals.root} ({len(originals)} images"
              f"{', split ' + config.originals.split if config.originals.split else ''}). "
              f"Methods: {', '.join(m.name for m in methods)}. Time: {time.time() - t_start:.0f} s.\n\n")
    _write_text(out_dir / "tables.md", header + "\n".join(t.markdown() for t in tables))
    return {t.key: t for t in tables}


def _finish_notes(tools, base, originals, gallery, config, tab3, tab4, tab5, tab6, tab7, tab8, kappa_rows):
    no_face = [o.name for o in originals if o.name in base.boxes and base.boxes[o.name] is None]
    if no_face:
        tab7.notes.append(f"{len(no_face)} of {len(originals)} originals without a dlib face left out: "
                          f"{', '.join(no_face[:10])}{' ...' if len(no_face) > 10 else ''}.")
    if tools.identity:
        how = ("each output embedded at the face found on its original"
               if config.identity.faces_from_originals else "each image with its own face detection")
        tab5.notes.append(f"ID-Dis = Euclidean distance of L2-normalised features; {how}.")
    if gallery is not None:
        thresholds = {m: config.identity.models[m].match_threshold for m in tools.identity}
        tab6.notes.append(f"{gallery.description}; matched = nearest gallery image is the same person"
                          f" (distance thresholds: {thresholds}, None = rank-1).")
    if not tab3.rows and not tools.notes.get("tab3"):
        tab3.notes.append("no method has disease predictions or segmentation predictions.")
    if not config.medical.segmentation_truth:
        tab3.notes.append("segmentation left out: config.medical.segmentation_truth (nnU-Net labelsTs folder) not set.")
    if config.agreement.diagnoses_original:
        classes = sorted({c for _, k in kappa_rows for c in k if c != "All"})
        tab4.columns += ["All", *classes]
        tab4.formats += [_number(4)] * (len(classes) + 1)
        tab4.rows = [[name, k["All"], *[k.get(c) for c in classes]] for name, k in kappa_rows]
    else:
        tab4.notes.append("left out: no diagnoses of the original images configured (config.agreement."
                          "diagnoses_original, columns image,diagnosis; each method's in <method_dir>/diagnoses.csv).")
    if not tab8.rows:
        tab8.notes.append("no reversible method configured "
                          "(config.methods.<name>.reversible with a recovered/ folder).")


def _label_distance_table(config) -> Table:
    table = Table("tab2_wasserstein", "Tab. 2: Wasserstein distance between label distributions (lower = closer)",
                  ["Rows", "Disease", "Age", "Gender"], [_text, _number(3), _number(3), _number(3)])
    if not config.label_distances:
        table.notes.append("left out: no label sets configured (config.label_distances.<row> = {a, b, age_scale}).")
        return table
    for name, entry in sorted(config.label_distances.items()):
        a, b = layout.read_dataset(entry.a, verify_images=False), layout.read_dataset(entry.b, verify_images=False)
        d = label_distribution_distances(a.records, b.records, age_scale=entry.age_scale)
        table.rows.append([name, d["Disease"], d["Age"], d["Gender"]])
    table.notes.append("disease and gender: total variation (W1 under the 0/1 ground distance); age: W1 of "
                       "ages / age_scale.")
    return table


def _verify_pairs(config, tools: Tools) -> dict:
    """Each identity model on the pairs file (once: the verification table and Tab. 1's thresholds use it)."""
    if not config.identity.pairs:
        return {}
    pairs = read_pairs_csv(config.identity.pairs)
    return {name: verify_pairs(model, pairs, max_side=config.identity.pairs_max_side or None)
            for name, model in sorted(tools.identity.items())}


def _verification_table(config, pair_results: dict) -> Table:
    table = Table("verification", "Identity models on labelled pairs (LFW protocol, 10-fold threshold)",
                  ["Model", "Accuracy", "Std", "Pairs", "Skipped", "Mean dist same", "Mean dist different"],
                  [_text, _percent, _percent, _text, _text, _number(4), _number(4)])
    if not config.identity.pairs:
        table.notes.append("left out: no pairs file configured "
                           "(config.identity.pairs, columns file_x,file_y,Decision).")
        return table
    same = np.array([p.same for p in read_pairs_csv(config.identity.pairs)])
    for name, result in sorted(pair_results.items()):
        v = result.verification
        table.rows.append([name, v.accuracy, v.accuracy_std, v.n_pairs, v.n_skipped,
                           _nanmean(result.distances[same])[0], _nanmean(result.distances[~same])[0]])
    table.notes.append(f"pairs: {config.identity.pairs}.")
    return table


def _write_per_image(path: Path, per_image: dict) -> None:
    columns = sorted({c for row in per_image.values() for c in row})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *columns])
    for name, row in per_image.items():
        writer.writerow([name, *["" if _missing(row.get(c)) else row.get(c) for c in columns]])
    _write_text(path, buf.getvalue())


def _write_method_grid(path: Path, method: Method, config) -> None:
    count = min(config.grid.num_examples, len(method.deid))
    if count <= 0:
        return
    recovered = {p.name: p.output for p in method.recovered}
    rows = []
    for pair in method.deid[:count]:
        row = [load_rgb(pair.original.path), load_rgb(pair.output)]
        if method.reversible:
            row.append(load_rgb(recovered[pair.name]))
        rows.append(row)
    titles = ["original", f"{method.name}", "recovered"][:len(rows[0])]
    grid.write_grid(path, rows, titles, config.grid.cell_height)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or _OUT.value is None:
        raise app.UsageError("--config and --out are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        run(_CONFIG.value, _OUT.value)
    except (ReportConfigError, InputMismatchError, layout.MeMaFormatError, FileNotFoundError) as e:
        # Problems of the user's config, folders or weight files: the message says it all.
        print(f"eval.report: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {Path(_OUT.value) / 'tables.md'}")


def entry():
    try:
        app.run(main)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if flags.FLAGS.is_parsed():
            raise
        # An unknown key or a wrong type in --config.x=V: ml_collections raises these while parsing.
        print(f"eval.report: bad flag: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    entry()
