"""Disease classification for the paper's Tab. 3 (medical utility) and Tab. 8 (disease accuracy of recovered images).

Protocol (paper, "Evaluation Protocol and Metrics"): fine-tune DINOv2 on the MeMa training split, then score
top-1 accuracy per disease and overall on the MeMa validation split as processed by each de-identification method.

Model: ``transformers.Dinov2ForImageClassification`` (linear head on [CLS token, mean patch token]) built on a
DINOv2 backbone that the user supplies as a local transformers folder (nothing is downloaded here).

Preprocessing (fixed, saved with the classifier): the whole RGB image resized to ``image_size`` x ``image_size``
(bicubic; no crop, so the eye region is never cut away), scaled to [0, 1] and normalised with the ImageNet mean and
std that DINOv2 was trained with. Training adds a random horizontal flip.

Training: AdamW, cross-entropy, learning rate on a cosine decay over all steps, shuffled order and flips drawn from
a generator seeded by (seed, epoch), so an interrupted run resumed from its per-epoch checkpoint ends with the same
weights as an uninterrupted one. The classifier of the last epoch is kept; after each epoch the balanced accuracy on
the ``select`` split (the paper's hyper-parameter-selection set) is logged for the user's choice of settings.

``out_dir`` layout:
    checkpoint.pt       resumable state after the last finished epoch (replaced atomically; removed when done)
    classifier/         the fine-tuned classifier (written atomically when training ends):
        config.json, model.safetensors   (transformers save_pretrained)
        mema_classifier.json             preprocessing, classes, training settings and per-epoch log

CLI:
    python -m eval.medical.classification train --data ROOT --backbone DIR --out DIR [--epochs N ...]
    python -m eval.medical.classification evaluate --classifier DIR --data ROOT [--split val]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, recall_score
from transformers import Dinov2ForImageClassification

from mema_jax.fileio import atomic_file, atomic_folder
from mema_jax.data.layout import DISEASES, MeMaDataset, Record, read_dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FILE = "checkpoint.pt"
CLASSIFIER_DIR = "classifier"
CLASSIFIER_INFO_FILE = "mema_classifier.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
BACKBONE_SOURCE = (
    "a DINOv2 backbone saved as a local transformers folder, e.g. the Hugging Face model facebook/dinov2-base "
    "(fetched on a machine with internet access by `huggingface-cli download facebook/dinov2-base --local-dir DIR`)"
)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the fine-tuned weights; a resumed run must use the same."""

    backbone: str
    dataset: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    image_size: int
    hflip: bool
    seed: int
    classes: tuple[str, ...] = DISEASES


@dataclasses.dataclass
class DiseaseClassifier:
    model: Dinov2ForImageClassification
    image_size: int
    classes: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_backbone_dir(backbone_dir) -> Path:
    """Raises FileNotFoundError naming the expected files when ``backbone_dir`` holds no transformers model."""
    backbone_dir = Path(backbone_dir)
    config = backbone_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: DINOv2 backbone config is missing; expected {BACKBONE_SOURCE}")
    if not any((backbone_dir / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(
            f"{backbone_dir}: no DINOv2 weight file (one of {list(WEIGHT_FILES)}); expected {BACKBONE_SOURCE}"
        )
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "dinov2":
        raise ValueError(f"{config}: model_type is {model_type!r}, expected 'dinov2' ({BACKBONE_SOURCE})")
    return backbone_dir


def preprocess(images: Sequence[np.ndarray], image_size: int, mean, std) -> torch.Tensor:
    """uint8 HxWx3 RGB arrays -> float tensor (N, 3, image_size, image_size), normalised."""
    batch = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i}: expected a uint8 HxWx3 RGB array, got {image.dtype} {image.shape}")
        resized = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
        batch.append(np.asarray(resized))
    pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class _RecordImages(torch.utils.data.Dataset):
    def __init__(self, dataset: MeMaDataset, records: Sequence[Record], image_size: int):
        self.dataset, self.records, self.image_size = dataset, records, image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        pixels = preprocess([self.dataset.load_image(rec)], self.image_size, IMAGENET_MEAN, IMAGENET_STD)[0]
        return pixels, rec.label


def per_class_accuracy(pred, true, classes: Sequence[str] = DISEASES) -> dict[str, float]:
    """Tab. 3's accuracies as fractions in [0, 1], from class indices.

    Returns ``{"All": ..., "Top1": ..., <class>: ...}``:
    - ``<class>``: accuracy on the images whose true class it is (per-class recall); NaN when no image has it;
    - ``All``: the mean of the per-class accuracies over the classes present (balanced accuracy). This is what the
      paper's "All" column is: in every row of Tab. 3 it equals the mean of the eight per-class figures
      (e.g. Ours: mean(96.45, 99.83, 98.98, 92.32, 87.05, 63.70, 97.72, 57.56) = 86.70);
    - ``Top1``: plain top-1 accuracy over all images.
    """
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 1 or len(pred) == 0:
        raise ValueError(f"pred and true must be equal-length non-empty 1-D arrays, got {pred.shape} and {true.shape}")
    for name, values in (("pred", pred), ("true", true)):
        if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= len(classes):
            raise ValueError(f"{name} must hold class indices in 0..{len(classes) - 1}")
    recalls = recall_score(true, pred, labels=list(range(len(classes))), average=None, zero_division=np.nan)
    scores = {"All": float(np.nanmean(recalls)), "Top1": float(accuracy_score(true, pred))}
    scores.update({name: float(r) for name, r in zip(classes, recalls, strict=True)})
    return scores


@torch.no_grad()
def predict(classifier: DiseaseClassifier, images: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
    """Class indices (into ``classifier.classes``) for uint8 HxWx3 RGB images, shape (N,)."""
    classifier.model.eval()
    out = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(images), batch_size):
        pixels = preprocess(images[start:start + batch_size], classifier.image_size, classifier.mean, classifier.std)
        logits = classifier.model(pixel_values=pixels.to(classifier.device)).logits
        out.append(logits.argmax(-1).cpu().numpy().astype(np.int64))
    return np.concatenate(out)


def evaluate_split(classifier: DiseaseClassifier, dataset_root, split: str = "val", *, batch_size: int = 32):
    """per_class_accuracy of the classifier on one split of a MeMa-layout folder (e.g. de-identified images)."""
    dataset = read_dataset(dataset_root)
    records = dataset.split(split)
    if not records:
        raise ValueError(f"{dataset.root}: split {split!r} has no images")
    pred = np.concatenate([
        predict(classifier, [dataset.load_image(r) for r in records[i:i + batch_size]], batch_size=batch_size)
        for i in range(0, len(records), batch_size)
    ])
    true = np.array([classifier.classes.index(r.disease) for r in records])
    return per_class_accuracy(pred, true, classifier.classes)


def load_classifier(out_dir, *, device: str | None = None) -> DiseaseClassifier:
    """Loads the classifier that train_classifier wrote to ``out_dir`` (or the ``classifier/`` folder itself)."""
    out_dir = Path(out_dir)
    folder = out_dir if (out_dir / CLASSIFIER_INFO_FILE).is_file() else out_dir / CLASSIFIER_DIR
    info_file = folder / CLASSIFIER_INFO_FILE
    if not info_file.is_file():
        unfinished = (out_dir / CHECKPOINT_FILE).is_file()
        hint = (f"training stopped before the end; run train again with --out {out_dir} to resume" if unfinished
                else "run `python -m eval.medical.classification train` to make one")
        raise FileNotFoundError(f"{info_file}: no fine-tuned disease classifier here ({hint})")
    info = json.loads(info_file.read_text())
    model = Dinov2ForImageClassification.from_pretrained(folder, local_files_only=True)
    model.to(_default_device(device)).eval()
    return DiseaseClassifier(model, info["image_size"], tuple(info["classes"]), tuple(info["mean"]), tuple(info["std"]))


def _check_same_settings(saved: dict, settings: TrainSettings, where: Path) -> None:
    wanted = json.loads(json.dumps(dataclasses.asdict(settings)))  # tuples -> lists, as stored
    differing = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if differing:
        raise ValueError(
            f"{where}: was made with other settings ({', '.join(f'{k}={saved.get(k)!r}' for k in differing)}); "
            f"use a new output folder or the same settings"
        )


def _save_checkpoint(path: Path, **state) -> None:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def train_classifier(
    dataset_root,
    backbone_dir,
    out_dir,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 2e-5,
    image_size: int = 224,
    weight_decay: float = 0.05,
    hflip: bool = True,
    seed: int = 0,
    device: str | None = None,
    num_workers: int = 0,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> DiseaseClassifier:
    """Fine-tunes DINOv2 on the ``train`` split of a MeMa folder; writes ``out_dir/classifier`` and returns it.

    Resumes from ``out_dir/checkpoint.pt`` when an earlier run with the same settings was interrupted; returns the
    finished classifier at once when ``out_dir`` already holds one made with the same settings.
    ``on_epoch_end`` gets each epoch's log entry after that epoch's checkpoint is written.
    """
    if min(epochs, batch_size, image_size) < 1 or lr <= 0:
        raise ValueError(f"epochs, batch_size, image_size and lr must be positive, got {epochs}, {batch_size}, "
                         f"{image_size}, {lr}")
    backbone_dir = check_backbone_dir(backbone_dir)
    dataset = read_dataset(dataset_root)
    out_dir = Path(out_dir)
    settings = TrainSettings(str(backbone_dir.resolve()), str(dataset.root.resolve()), epochs, batch_size, lr,
                             weight_decay, image_size, hflip, seed)
    final_dir = out_dir / CLASSIFIER_DIR
    if (final_dir / CLASSIFIER_INFO_FILE).is_file():
        _check_same_settings(json.loads((final_dir / CLASSIFIER_INFO_FILE).read_text())["settings"], settings,
                             final_dir / CLASSIFIER_INFO_FILE)
        return load_classifier(out_dir, device=device)
    train_records = dataset.split("train")
    if not train_records:
        raise ValueError(f"{dataset.root}: the train split is empty; nothing to fine-tune on")
    select_records = dataset.split("select")
    device = _default_device(device)

    torch.manual_seed(seed)  # the new linear head's initialisation
    model = Dinov2ForImageClassification.from_pretrained(
        backbone_dir, num_labels=len(DISEASES), id2label=dict(enumerate(DISEASES)),
        label2id={d: i for i, d in enumerate(DISEASES)}, local_files_only=True,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_records) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    history: list[dict] = []
    start_epoch = 0
    checkpoint_path = out_dir / CHECKPOINT_FILE
    if checkpoint_path.is_file():
        try:
            state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{checkpoint_path}: unreadable training checkpoint ({type(e).__name__}: {e}); "
                             f"delete it to start over") from None
        _check_same_settings(state["settings"], settings, checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch = state["history"], state["epoch"]

    classifier = DiseaseClassifier(model, image_size, DISEASES)
    images = _RecordImages(dataset, train_records, image_size)
    for epoch in range(start_epoch, epochs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(images), generator=generator).tolist()
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=order, num_workers=num_workers)
        model.train()
        losses = []
        for pixels, labels in loader:
            if hflip:
                flip = torch.rand(len(pixels), generator=generator) < 0.5
                pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels.to(device)).logits, labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if select_records:
            pred = predict(classifier, [dataset.load_image(r) for r in select_records], batch_size=batch_size)
            entry["select_accuracy"] = per_class_accuracy(pred, np.array([r.label for r in select_records]))["All"]
        history.append(entry)
        _save_checkpoint(checkpoint_path, settings=json.loads(json.dumps(dataclasses.asdict(settings))),
                         epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), history=history)
        if on_epoch_end is not None:
            on_epoch_end(entry)

    info = {"image_size": image_size, "classes": list(DISEASES), "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "settings": dataclasses.asdict(settings), "history": history}
    with atomic_folder(final_dir) as tmp:
        model.save_pretrained(tmp)
        (tmp / CLASSIFIER_INFO_FILE).write_text(json.dumps(info, indent=2))
    checkpoint_path.unlink()
    model.eval()
    return classifier


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.medical.classification", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune DINOv2 on the train split of a MeMa folder")
    train.add_argument("--data", required=True, help="MeMa-layout folder (labels.csv, images/)")
    train.add_argument("--backbone", required=True, help="local transformers folder with a DINOv2 backbone")
    train.add_argument("--out", required=True,
                       help="output folder (checkpoint.pt while training, classifier/ at the end)")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=2e-5)
    train.add_argument("--image-size", type=int, default=224)
    train.add_argument("--weight-decay", type=float, default=0.05)
    train.add_argument("--no-hflip", action="store_true", help="train without random horizontal flips")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    train.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    evaluate = commands.add_parser("evaluate", help="per-class accuracy on a split of a MeMa folder, as JSON")
    evaluate.add_argument("--classifier", required=True, help="the --out folder of train")
    evaluate.add_argument("--data", required=True, help="MeMa-layout folder, e.g. a method's de-identified images")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.command == "train":
        classifier = train_classifier(
            args.data, args.backbone, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            image_size=args.image_size, weight_decay=args.weight_decay, hflip=not args.no_hflip, seed=args.seed,
            device=args.device, num_workers=args.num_workers, on_epoch_end=lambda entry: print(json.dumps(entry)),
        )
        print(f"classifier written to {Path(args.out) / CLASSIFIER_DIR} ({len(classifier.classes)} classes)")
    else:
        print(json.dumps(evaluate_split(load_classifier(args.classifier, device=args.device), args.data, args.split),
                         indent=2))


if __name__ == "__main__":
    main()
