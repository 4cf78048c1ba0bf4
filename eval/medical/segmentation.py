"""Tumour segmentation for the paper's Tab. 3: nnU-Net v2 on MeMa-Seg, scored by Dice and Jaccard.

MeMa-Seg is the subset of MeMa whose labels.csv rows have a ``mask`` (SCC tumour masks). The protocol:

1. ``convert_to_nnunet_raw`` writes MeMa-Seg in nnU-Net v2's raw format as a 2D natural-image dataset, the way
   nnU-Net's own natural-image example (Dataset120_RoadSegmentation) does it::

       <nnUNet_raw>/Dataset501_MeMaSeg/
           dataset.json     {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0,
                            "tumour": 1}, "numTraining": N, "file_ending": ".png", ...}
           imagesTr/<image_id>_0000.png   RGB uint8 (one file holds all three channels: nnU-Net's RGB exception)
           labelsTr/<image_id>.png        uint8, 0 = background, 1 = tumour
           imagesTs/, labelsTs/           the validation split, same naming

   nnU-Net reads these with its NaturalImage2DIO. The training cases are the ``train`` and ``select`` splits
   (nnU-Net chooses its own settings by 5-fold cross-validation on them); the test cases are the ``val`` split.
2. Training, on a GPU: ``training_commands`` (plan_and_preprocess with --verify_dataset_integrity, then
   ``nnUNetv2_train <id> 2d <fold>`` for each fold).
3. Prediction, on CPU or GPU: ``write_nnunet_inputs`` writes a method's de-identified validation images as
   ``<image_id>_0000.png``; ``predict_command`` runs the trained folds on that folder.
4. ``score_mask_folders`` compares the predicted masks with labelsTs: Dice and Jaccard per image and their means.

Every command is a shell line that sets nnU-Net's three folder variables (nnUNet_raw, nnUNet_preprocessed,
nnUNet_results) in front, so it runs as printed.

CLI:
    python -m eval.medical.segmentation convert --data ROOT --raw NNUNET_RAW [--id 501]
    python -m eval.medical.segmentation inputs --data ROOT --out DIR [--split val]
    python -m eval.medical.segmentation commands --raw R --preprocessed P --results S --id 501 --input I --output O
    python -m eval.medical.segmentation score --pred DIR --true DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mema_jax.fileio import atomic_folder
from mema_jax.data.layout import LABELS_FILE, MeMaFormatError, read_dataset, write_png

CHANNEL_NAMES = {"0": "R", "1": "G", "2": "B"}
LABELS = {"background": 0, "tumour": 1}
FILE_ENDING = ".png"
CHANNEL_SUFFIX = "_0000"
DEFAULT_DATASET_ID = 501  # nnU-Net asks custom datasets to use ids from 500 up, clear of its pretrained models
DATASET_NAME = "MeMaSeg"
TRAIN_SPLITS = ("train", "select")
TEST_SPLIT = "val"
ALL_FOLDS = (0, 1, 2, 3, 4)
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def dataset_folder_name(dataset_id: int = DEFAULT_DATASET_ID, name: str = DATASET_NAME) -> str:
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    return f"Dataset{dataset_id:03d}_{name}"


def _case_id(image_id: str, where: str) -> str:
    if not _CASE_ID.fullmatch(image_id):
        raise MeMaFormatError(f"{where}: image_id {image_id!r} cannot name an nnU-Net case (use letters, digits, ._-)")
    return image_id


def convert_to_nnunet_raw(dataset_root, nnunet_raw, *, dataset_id: int = DEFAULT_DATASET_ID) -> Path:
    """Writes the masked images of a MeMa folder as ``<nnunet_raw>/Dataset<id>_MeMaSeg`` (atomically); returns it.

    Raises MeMaFormatError naming the file when an image and its mask differ in size, FileExistsError when the
    dataset folder or another dataset with the same id is already there, ValueError when no training case has a mask.
    """
    dataset = read_dataset(dataset_root)
    nnunet_raw = Path(nnunet_raw)
    taken = sorted(nnunet_raw.glob(f"Dataset{dataset_id:03d}_*"))
    if taken:
        raise FileExistsError(f"{taken[0]}: nnU-Net dataset id {dataset_id} is already used in {nnunet_raw}")
    where = dataset.root / LABELS_FILE
    train = [r for r in dataset.records if r.mask and r.split in TRAIN_SPLITS]
    test = [r for r in dataset.records if r.mask and r.split == TEST_SPLIT]
    if not train:
        raise ValueError(f"{where}: no image of the {'/'.join(TRAIN_SPLITS)} splits has a mask; nothing to train on")
    with atomic_folder(nnunet_raw / dataset_folder_name(dataset_id)) as folder:
        for records, images_dir, labels_dir in ((train, "imagesTr", "labelsTr"), (test, "imagesTs", "labelsTs")):
            for rec in records:
                case = _case_id(rec.image_id, str(where))
                image, mask = dataset.load_image(rec), dataset.load_mask(rec)
                if image.shape[:2] != mask.shape:
                    raise MeMaFormatError(f"{dataset.mask_path(rec)}: mask is {mask.shape[1]}x{mask.shape[0]} but "
                                          f"image {dataset.image_path(rec)} is {image.shape[1]}x{image.shape[0]}")
                write_png(folder / images_dir / f"{case}{CHANNEL_SUFFIX}{FILE_ENDING}", image)
                write_png(folder / labels_dir / f"{case}{FILE_ENDING}", mask.astype(np.uint8))
        dataset_json = {
            "channel_names": CHANNEL_NAMES,
            "labels": LABELS,
            "numTraining": len(train),
            "file_ending": FILE_ENDING,
            "name": dataset_folder_name(dataset_id),
            "description": f"MeMa-Seg tumour masks from {dataset.root}: imagesTr = splits {list(TRAIN_SPLITS)}, "
                           f"imagesTs/labelsTs = split {TEST_SPLIT!r}",
        }
        (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return nnunet_raw / dataset_folder_name(dataset_id)


def write_nnunet_inputs(images: Iterable[tuple[str, np.ndarray]], out_dir) -> Path:
    """Writes (case id, uint8 HxWx3 RGB image) pairs as ``out_dir/<case>_0000.png`` for nnUNetv2_predict.

    The folder appears complete or not at all.
    """
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as folder:
        for case, image in images:
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"case {case}: expected a uint8 HxWx3 RGB array, got {image.dtype} {image.shape}")
            write_png(folder / f"{_case_id(case, 'nnU-Net input')}{CHANNEL_SUFFIX}{FILE_ENDING}", image)
    return out_dir


def write_split_inputs(dataset_root, out_dir, *, split: str = TEST_SPLIT) -> Path:
    """nnU-Net input folder from the masked images of one split of a MeMa folder (e.g. a method's de-identified set)."""
    dataset = read_dataset(dataset_root)
    records = [r for r in dataset.split(split) if r.mask]
    if not records:
        raise ValueError(f"{dataset.root / LABELS_FILE}: no image of split {split!r} has a mask")
    return write_nnunet_inputs(((r.image_id, dataset.load_image(r)) for r in records), out_dir)


@dataclasses.dataclass(frozen=True)
class NnUNetFolders:
    """nnU-Net's three folders, given to every command through its environment variables."""

    raw: Path
    preprocessed: Path
    results: Path

    def env_prefix(self) -> str:
        return " ".join(f"{name}={shlex.quote(str(Path(path).resolve()))}" for name, path in (
            ("nnUNet_raw", self.raw), ("nnUNet_preprocessed", self.preprocessed), ("nnUNet_results", self.results)))


def training_commands(folders: NnUNetFolders, dataset_id: int = DEFAULT_DATASET_ID, *,
                      folds: Sequence[int] = ALL_FOLDS, configuration: str = "2d") -> list[str]:
    """Shell lines that plan, preprocess (checking the dataset) and train each fold; training needs a GPU."""
    env = folders.env_prefix()
    return [f"{env} nnUNetv2_plan_and_preprocess -d {dataset_id} --verify_dataset_integrity"] + [
        f"{env} nnUNetv2_train {dataset_id} {configuration} {fold}" for fold in folds]


def predict_command(folders: NnUNetFolders, input_dir, output_dir, dataset_id: int = DEFAULT_DATASET_ID, *,
                    folds: Sequence[int] = ALL_FOLDS, configuration: str = "2d", device: str = "cpu") -> str:
    """Shell line that segments ``input_dir`` (``<case>_0000.png``) into ``output_dir`` (``<case>.png``)."""
    if device not in ("cpu", "cuda", "mps"):
        raise ValueError(f"nnUNetv2_predict devices are cpu, cuda and mps, got {device!r}")
    return (f"{folders.env_prefix()} nnUNetv2_predict -i {shlex.quote(str(input_dir))} "
            f"-o {shlex.quote(str(output_dir))} -d {dataset_id} -c {configuration} "
            f"-f {' '.join(str(f) for f in folds)} -device {device}")


def dice_jaccard(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Dice = 2|P∩T| / (|P|+|T|) and Jaccard = |P∩T| / |P∪T| of two boolean masks of one image.

    Empty-vs-empty policy: when neither mask has a tumour pixel both scores are 1.0 (the prediction is exactly
    right); a tumour predicted where the truth has none, or the reverse, scores 0.0.
    """
    pred, true = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: predicted {pred.shape}, true {true.shape}")
    intersection = np.logical_and(pred, true).sum()
    union = np.logical_or(pred, true).sum()
    if union == 0:
        return 1.0, 1.0
    return float(2 * intersection / (pred.sum() + true.sum())), float(intersection / union)


@dataclasses.dataclass(frozen=True)
class SegmentationScores:
    """Per-image (dice, jaccard) by case id, and their means over all images (Tab. 3's Dice and Jaccard).

    The paper's means are over images, not pooled pixels: in every row of Tab. 3 its Jaccard exceeds
    Dice / (2 - Dice), which pooled counts would make an equality.
    """

    per_image: dict[str, tuple[float, float]]
    dice: float
    jaccard: float


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) > 0
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # what PIL raises for unreadable files
        raise MeMaFormatError(f"{path}: cannot decode mask ({type(e).__name__}: {e})") from None


def score_mask_folders(pred_dir, true_dir) -> SegmentationScores:
    """Dice and Jaccard of ``pred_dir/<case>.png`` against ``true_dir/<case>.png`` (non-zero = tumour).

    Both folders must hold the same cases: a case missing on either side is an error naming it.
    """
    pred_dir, true_dir = Path(pred_dir), Path(true_dir)
    for folder in (pred_dir, true_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: mask folder does not exist")
    pred_cases = {p.name[:-len(FILE_ENDING)] for p in pred_dir.glob(f"*{FILE_ENDING}")}
    true_cases = {p.name[:-len(FILE_ENDING)] for p in true_dir.glob(f"*{FILE_ENDING}")}
    if not true_cases:
        raise ValueError(f"{true_dir}: no {FILE_ENDING} ground-truth masks")
    if pred_cases != true_cases:
        missing, extra = sorted(true_cases - pred_cases), sorted(pred_cases - true_cases)
        raise FileNotFoundError(f"{pred_dir}: predictions do not match {true_dir}: missing {missing[:10]}"
                                f"{' ...' if len(missing) > 10 else ''}, unexpected {extra[:10]}"
                                f"{' ...' if len(extra) > 10 else ''}")
    per_image = {}
    for case in sorted(true_cases):
        pred_path, true_path = pred_dir / f"{case}{FILE_ENDING}", true_dir / f"{case}{FILE_ENDING}"
        pred, true = _read_mask(pred_path), _read_mask(true_path)
        if pred.shape != true.shape:
            raise ValueError(f"{pred_path}: predicted mask is {pred.shape[1]}x{pred.shape[0]} but {true_path} is "
                             f"{true.shape[1]}x{true.shape[0]}")
        per_image[case] = dice_jaccard(pred, true)
    scores = np.array(list(per_image.values()))
    return SegmentationScores(per_image, float(scores[:, 0].mean()), float(scores[:, 1].mean()))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.medical.segmentation", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write MeMa-Seg in nnU-Net v2's raw format")
    convert.add_argument("--data", required=True, help="MeMa-layout folder with masks")
    convert.add_argument("--raw", required=True, help="the nnUNet_raw folder")
    convert.add_argument("--id", type=int, default=DEFAULT_DATASET_ID)
    inputs = commands.add_parser("inputs", help="write one split's masked images as an nnU-Net input folder")
    inputs.add_argument("--data", required=True, help="MeMa-layout folder, e.g. a method's de-identified images")
    inputs.add_argument("--out", required=True)
    inputs.add_argument("--split", default=TEST_SPLIT)
    show = commands.add_parser("commands", help="print the training and prediction command lines")
    show.add_argument("--raw", required=True)
    show.add_argument("--preprocessed", required=True)
    show.add_argument("--results", required=True)
    show.add_argument("--id", type=int, default=DEFAULT_DATASET_ID)
    show.add_argument("--input", required=True, help="folder of <case>_0000.png to segment")
    show.add_argument("--output", required=True, help="folder for the predicted <case>.png masks")
    show.add_argument("--device", default="cpu", help="prediction device: cpu, cuda or mps")
    score = commands.add_parser("score", help="Dice and Jaccard of predicted masks against ground truth, as JSON")
    score.add_argument("--pred", required=True)
    score.add_argument("--true", required=True, help="e.g. <nnUNet_raw>/Dataset501_MeMaSeg/labelsTs")
    args = parser.parse_args(argv)
    if args.command == "convert":
        print(convert_to_nnunet_raw(args.data, args.raw, dataset_id=args.id))
    elif args.command == "inputs":
        print(write_split_inputs(args.data, args.out, split=args.split))
    elif args.command == "commands":
        folders = NnUNetFolders(Path(args.raw), Path(args.preprocessed), Path(args.results))
        print("\n".join(training_commands(folders, args.id)))
        print(predict_command(folders, args.input, args.output, args.id, device=args.device))
    else:
        scores = score_mask_folders(args.pred, args.true)
        per_image = {case: {"dice": d, "jaccard": j} for case, (d, j) in scores.per_image.items()}
        print(json.dumps({"dice": scores.dice, "jaccard": scores.jaccard, "per_image": per_image}, indent=2))


if __name__ == "__main__":
    main()
