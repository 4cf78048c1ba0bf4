r"""MeMa Step 3, the identity filter, and Tab. 1: which generated images leak a real patient.

The paper (Step 3) removes the generated images whose identity features are close to the real
patient set; Tab. 1 reports the leakage percentage: the share of generated images whose nearest
real patient lies within an identity model's decision threshold, per model and averaged over them.

    python -m eval.leakage_filter filter --generated GEN_MEMA_DIR --real REAL_MEMA_DIR [--real-split train] \
        --out KEPT_DIR --model NAME[=WEIGHTS] [--model ...] [--threshold NAME=T ...] [--pairs PAIRS_CSV] \
        [--pairs-max-side N] [--faces detect|real-mean] [--detector auto|dlib|dlib_cnn|mtcnn] \
        [--keep-faceless] [--embedding-cache DIR] [--overwrite]

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

``--embedding-cache DIR`` keeps every identity feature computed (per model, weights, detector,
image bytes and face; ``eval.leakage.embedding.EmbeddingCache``) and reuses it: Tab. 1 and the
filter of one pipeline embed the gallery and the held-out pairs once.  The features are biometric
data of the people in the images, so the cache is off by default; keep DIR with the patient data.

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
import sys
from collections.abc import Sequence
from pathlib import Path

from eval.identity import IDENTITY_MODELS
from eval.leakage.decision import UNION_RULE, Leakage, leakage  # noqa: F401  (the Python API)
from eval.leakage.embedding import (  # noqa: F401
    DETECTORS, FACE_MODES, REAL_PAIRS, Gallery, ImageSet, LeakageFilterError, MeanFace, embed_gallery, embed_set,
    load_models, mean_face, parse_model_spec, read_set)
from eval.leakage.filter import (  # noqa: F401
    GENERATION_FILE, LEAKAGE_FILE, NO_FACE_FILE, SUMMARY_FILE, FilterResult, filter_folder, summarise)
from eval.leakage.tab1 import TAB1_KEY, parse_row_spec, tab1, tab1_table, write_tab1  # noqa: F401
from eval.leakage.thresholds import (  # noqa: F401
    Threshold, check_thresholds, parse_threshold_specs, resolve_thresholds, split_pair_thresholds)
from mema_jax.data import layout
from mema_jax.errors import InputError

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
        sub.add_argument("--embedding-cache", default=None, metavar="DIR",
                         help="keep the identity features computed here and reuse them (the filter and Tab. 1 "
                              "embed the same gallery); they are biometric data: keep DIR with the patient data")
        sub.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    options = dict(real_split=args.real_split, thresholds=args.threshold, pairs=args.pairs,
                   pairs_max_side=args.pairs_max_side, faces=args.faces, detector=args.detector,
                   embedding_cache=args.embedding_cache)
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
