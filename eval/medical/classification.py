"""Disease classification for the paper's Tab. 3 (medical utility) and Tab. 8 (disease accuracy of recovered images).

Protocol (paper, "Evaluation Protocol and Metrics"): fine-tune DINOv2 on the MeMa training split, then score
top-1 accuracy per disease and overall on the MeMa validation split as processed by each de-identification method.

Two backbone kinds, chosen by ``--backbone``:
- a DINOv2 folder (the paper's classifier): ``transformers.Dinov2ForImageClassification`` (linear head on
  [CLS token, mean patch token]) built on a DINOv2 backbone that the user supplies as a local transformers folder
  (nothing is downloaded here), fine-tuned;
- ``resnet18``: torchvision's ResNet-18 with random weights and a small-image stem (a 3x3 conv of stride 2 and no
  max-pool instead of the 7x7/2 conv + 3x3/2 max-pool, so a 64 px face is 32 px in the first block, not 16 px),
  trained from scratch. It needs no downloaded weights: the offline Med-Class yardstick on MeMa-Synth.

Preprocessing (fixed, saved with the classifier): the whole RGB image resized to ``image_size`` x ``image_size``
(bicubic; no crop, so the eye region is never cut away), scaled to [0, 1] and normalised with the ImageNet mean and
std (DINOv2 was trained with them; ResNet-18 keeps them). Training augments with a random horizontal flip (see
``augment``: a mirrored one-sided sign is still that disease) and, if asked, random shifts of a few pixels and
brightness/contrast jitter.

Training: AdamW, cross-entropy, learning rate on a cosine decay over all steps (after a linear warm-up, if asked),
shuffled order and augmentation drawn from a generator seeded by (seed, epoch), so an interrupted run resumed from
its per-epoch checkpoint ends with the same weights as an uninterrupted one. The classifier of the last epoch is
kept; after each epoch the balanced accuracy on the ``select`` split (the paper's hyper-parameter-selection set) is
logged for the user's choice of settings. Settings left out take the kind's ``DEFAULTS``.

ResNet-18 on MeMa-Synth 64 px (``data/mema_synth_64_3k``: 3000 images, 750 patients; 2424 train, 256 select,
320 val images, splits by patient so validation patients are unseen), with the defaults (15 epochs, batch 64,
AdamW lr 2e-3 after 2 warm-up epochs, weight decay 0.05, flips and shifts of up to 4 px), measured:
    python -m eval.medical.classification train --data data/mema_synth_64_3k --backbone resnet18 --out DIR --threads 1
    14.5 min on a 2-core CPU shared with a training job (~57 s per epoch; 26 s with 2 threads alone);
    select balanced accuracy 0.43 / 0.78 / 0.91 after epochs 3 / 8 / 15;
    val top-1 0.866: Normal 0.75, BCC 0.975, Conj 0.975, Uveitis 0.90, Ptosis 0.95, SCC 1.00, Strab 0.375, TAO 1.00
    (strabismus, an iris turned by a pixel or two at 64 px, is the hard class).

``out_dir`` layout:
    checkpoint.pt       resumable state after the last finished epoch (replaced atomically; removed when done)
    classifier/         the trained classifier (written atomically when training ends):
        config.json, model.safetensors   DINOv2: transformers save_pretrained
        model.pth                        resnet18: torchvision state dict (torch.save of model.state_dict())
        mema_classifier.json             architecture, preprocessing, classes, training settings, per-epoch log

CLI (bad input, e.g. a --backbone that is neither a kind nor a DINOv2 folder, is one line on stderr, exit 1):
    python -m eval.medical.classification train --data ROOT --backbone resnet18 --out DIR [--epochs N ...]
    python -m eval.medical.classification train --data ROOT --backbone DINOV2_DIR --out DIR [--epochs N ...]
    python -m eval.medical.classification evaluate --classifier DIR --data ROOT [--split val]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from sklearn.metrics import accuracy_score, recall_score
from transformers import Dinov2ForImageClassification

from mema_jax.data.layout import DISEASES, MeMaDataset, Record, read_dataset
from mema_jax.errors import InputError
from mema_jax.fileio import atomic_file, atomic_folder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FILE = "checkpoint.pt"
CLASSIFIER_DIR = "classifier"
CLASSIFIER_INFO_FILE = "mema_classifier.json"
RESNET_WEIGHTS_FILE = "model.pth"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
BACKBONE_SOURCE = (
    "a DINOv2 backbone saved as a local transformers folder, e.g. the Hugging Face model facebook/dinov2-base "
    "(fetched on a machine with internet access by `huggingface-cli download facebook/dinov2-base --local-dir DIR`)"
)
DINOV2 = "dinov2"
RESNET18 = "resnet18"
BACKBONE_KINDS = (RESNET18,)  # --backbone values that name a model trained from scratch (no weights needed)
# ResNet-18's small-image stem: torchvision's 7x7/2 conv + 3x3/2 max-pool would shrink a 64 px face to 16 px
# before the first block, where a slight sign (an iris turned by under a pixel) is gone.
RESNET18_STEM = {"kernel": 3, "stride": 2, "maxpool": False}
# Per backbone kind, the settings a caller leaves out (None). DINOv2's are the fine-tuning settings used before
# the ResNet-18 kind existed; ResNet-18's are the MeMa-Synth 64 px recipe measured in the module docstring.
DEFAULTS = {
    DINOV2: {"epochs": 10, "batch_size": 32, "lr": 2e-5, "image_size": 224, "weight_decay": 0.05,
             "warmup_epochs": 0.0, "shift": 0, "jitter": 0.0, "blur": 0.0},
    RESNET18: {"epochs": 15, "batch_size": 64, "lr": 2e-3, "image_size": 64, "weight_decay": 0.05,
               "warmup_epochs": 2.0, "shift": 4, "jitter": 0.0, "blur": 0.0},
}
# Settings added after the first DINOv2 classifiers were saved, with the value that reproduces how those trained.
_LEGACY_SETTINGS = {"warmup_epochs": 0.0, "shift": 0, "jitter": 0.0, "blur": 0.0}


class ClassifierInputError(InputError, ValueError):
    """A bad --backbone value, setting, checkpoint or classifier folder; the message names it and the problem."""


class ClassifierFileError(InputError, FileNotFoundError):
    """A file the classifier needs is missing; the message names it and where it comes from."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights; a resumed run must use the same."""

    backbone: str  # a kind in BACKBONE_KINDS, or the resolved path of a DINOv2 folder
    dataset: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    image_size: int
    hflip: bool
    seed: int
    classes: tuple[str, ...] = DISEASES
    warmup_epochs: float = 0.0
    shift: int = 0
    jitter: float = 0.0
    blur: float = 0.0


@dataclasses.dataclass
class DiseaseClassifier:
    model: torch.nn.Module  # Dinov2ForImageClassification, or a torchvision ResNet (architecture["kind"])
    image_size: int
    classes: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    architecture: dict = dataclasses.field(default_factory=lambda: {"kind": DINOV2})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, classes) logits of preprocessed pixels (N, 3, image_size, image_size) on the model's device."""
        if self.architecture["kind"] == DINOV2:
            return self.model(pixel_values=pixels).logits
        return self.model(pixels)


def _default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_resnet18(architecture: dict) -> torch.nn.Module:
    """torchvision's ResNet-18 (random weights) with the stem that ``architecture`` records.

    Its state dict has torchvision's key names and shapes (``conv1.weight`` is 64x3xKxK for a KxK stem), so the
    saved ``model.pth`` loads into ``torchvision.models.resnet18(num_classes=8)`` once its stem is swapped the same
    way.
    """
    stem = architecture["stem"]
    model = torchvision.models.resnet18(weights=None, num_classes=architecture["num_classes"])
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=stem["kernel"], stride=stem["stride"],
                                  padding=stem["kernel"] // 2, bias=False)
    torch.nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
    if not stem["maxpool"]:
        model.maxpool = torch.nn.Identity()
    return model


def check_backbone_dir(backbone_dir) -> Path:
    """Raises ClassifierFileError naming the expected files when ``backbone_dir`` holds no transformers model."""
    backbone_dir = Path(backbone_dir)
    config = backbone_dir / "config.json"
    if not config.is_file():
        raise ClassifierFileError(
            f"{config}: DINOv2 backbone config is missing; --backbone takes a kind trained from scratch "
            f"({', '.join(BACKBONE_KINDS)}; no weights needed) or {BACKBONE_SOURCE}")
    if not any((backbone_dir / name).is_file() for name in WEIGHT_FILES):
        raise ClassifierFileError(
            f"{backbone_dir}: no DINOv2 weight file (one of {list(WEIGHT_FILES)}); expected {BACKBONE_SOURCE}"
        )
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != DINOV2:
        raise ClassifierInputError(f"{config}: model_type is {model_type!r}, expected 'dinov2' ({BACKBONE_SOURCE})")
    return backbone_dir


def backbone_kind(backbone) -> str:
    """``resnet18`` (a name in BACKBONE_KINDS; write ``./resnet18`` for a folder of that name) or ``dinov2``."""
    return str(backbone) if isinstance(backbone, str) and backbone in BACKBONE_KINDS else DINOV2


def preprocess(images: Sequence[np.ndarray], image_size: int, mean, std) -> torch.Tensor:
    """uint8 HxWx3 RGB arrays -> float tensor (N, 3, image_size, image_size), normalised."""
    return _normalise(_resize(images, image_size), mean, std)


def _resize(images: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """uint8 HxWx3 RGB arrays -> float tensor (N, 3, image_size, image_size) in [0, 1] (bicubic, whole image)."""
    batch = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i}: expected a uint8 HxWx3 RGB array, got {image.dtype} {image.shape}")
        resized = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
        batch.append(np.asarray(resized))
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0


def _normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(3, H, W) blurred by a separable Gaussian of ``sigma`` pixels (edges repeated)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=image.dtype) / sigma) ** 2)
    taps = taps / taps.sum()
    x = torch.nn.functional.pad(image[:, None], (radius, radius, radius, radius), mode="replicate")
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, taps.view(1, 1, -1, 1))[:, 0]


def augment(pixels: torch.Tensor, generator: torch.Generator, *, hflip: bool, shift: int,
            jitter: float, blur: float = 0.0) -> torch.Tensor:
    """Training augmentation of pixels in [0, 1], (N, 3, H, W); every draw comes from ``generator``.

    - ``hflip``: mirror half the images. MeMa-Synth draws the affected side of one-sided signs (Uveitis, Ptosis,
      Strab, BCC, SCC) at random per patient, and the labels name the disease, not the side, so a mirrored image
      is another valid image of the same class;
    - ``shift``: move each image by up to ``shift`` pixels in x and y (edge pixels repeated), as pose shifts do;
    - ``jitter``: scale brightness and contrast by factors in [1 - jitter, 1 + jitter]; hue and saturation are
      left alone, since redness is the sign of Conj, Uveitis and SCC;
    - ``blur``: blur half the images by a Gaussian of sigma drawn in [0, ``blur``] pixels (at ``image_size``),
      so that a diagnosis does not hang on the photo's sharpness: without it the 64 px ResNet-18 calls nearly
      every slightly soft face Conj (measured: a blur of sigma 0.7 px, 34 dB PSNR, takes it from 83% to 22%,
      while noise of 30 dB leaves 79%; benchmarks/medclass_vs_degradation.py).  Not yet a working recipe: the
      one run so far (``--blur 2 --epochs 8`` on MeMa-Synth 64 px) was still at chance after 3 epochs.
    """
    n, _, height, width = pixels.shape
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    if shift:
        padded = torch.nn.functional.pad(pixels, (shift,) * 4, mode="replicate")
        dx, dy = torch.randint(0, 2 * shift + 1, (2, n), generator=generator).tolist()
        pixels = torch.stack([padded[i, :, y:y + height, x:x + width] for i, (x, y) in enumerate(zip(dx, dy))])
    if jitter:
        brightness, contrast = 1 + jitter * (2 * torch.rand(2, n, 1, 1, 1, generator=generator) - 1)
        grey = pixels.mean(dim=(1, 2, 3), keepdim=True)
        pixels = (((pixels - grey) * contrast + grey) * brightness).clamp(0.0, 1.0)
    if blur:
        chosen = torch.rand(n, generator=generator) < 0.5
        sigmas = blur * torch.rand(n, generator=generator)
        pixels = torch.stack([_gaussian_blur(image, float(sigma)) if pick and sigma > 0.05 else image
                              for image, pick, sigma in zip(pixels, chosen, sigmas)])
    return pixels


class _RecordImages(torch.utils.data.Dataset):
    """Resized [0, 1] pixels and the label of each record, decoded when asked for."""

    def __init__(self, dataset: MeMaDataset, records: Sequence[Record], image_size: int):
        self.dataset, self.records, self.image_size = dataset, records, image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        return _resize([self.dataset.load_image(rec)], self.image_size)[0], rec.label


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
        logits = classifier.logits(pixels.to(classifier.device))
        out.append(logits.argmax(-1).cpu().numpy().astype(np.int64))
    return np.concatenate(out)


def evaluate_split(classifier: DiseaseClassifier, dataset_root, split: str = "val", *, batch_size: int = 32):
    """per_class_accuracy of the classifier on one split of a MeMa-layout folder (e.g. de-identified images)."""
    dataset = read_dataset(dataset_root)
    records = dataset.split(split)
    if not records:
        raise ClassifierInputError(f"{dataset.root}: split {split!r} has no images")
    pred = np.concatenate([
        predict(classifier, [dataset.load_image(r) for r in records[i:i + batch_size]], batch_size=batch_size)
        for i in range(0, len(records), batch_size)
    ])
    true = np.array([classifier.classes.index(r.disease) for r in records])
    return per_class_accuracy(pred, true, classifier.classes)


def _load_resnet_weights(folder: Path, architecture: dict, info_file: Path) -> torch.nn.Module:
    weights = folder / RESNET_WEIGHTS_FILE
    if not weights.is_file():
        raise ClassifierFileError(f"{weights}: the {architecture['kind']} weights that {info_file.name} "
                                  f"describes are missing")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = build_resnet18(architecture)
        model.load_state_dict(state)
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise ClassifierInputError(f"{weights}: not the {architecture['kind']} state dict that {info_file.name} "
                                   f"describes ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model


def load_classifier(out_dir, *, device: str | None = None) -> DiseaseClassifier:
    """Loads the classifier that train_classifier wrote to ``out_dir`` (or the ``classifier/`` folder itself)."""
    out_dir = Path(out_dir)
    folder = out_dir if (out_dir / CLASSIFIER_INFO_FILE).is_file() else out_dir / CLASSIFIER_DIR
    info_file = folder / CLASSIFIER_INFO_FILE
    if not info_file.is_file():
        unfinished = (out_dir / CHECKPOINT_FILE).is_file()
        hint = (f"training stopped before the end; run train again with --out {out_dir} to resume" if unfinished
                else "run `python -m eval.medical.classification train` to make one")
        raise ClassifierFileError(f"{info_file}: no trained disease classifier here ({hint})")
    info = json.loads(info_file.read_text())
    architecture = info.get("architecture", {"kind": DINOV2})  # classifiers saved before ResNet-18 are DINOv2
    if architecture.get("kind") == DINOV2:
        model = Dinov2ForImageClassification.from_pretrained(folder, local_files_only=True)
    elif architecture.get("kind") in BACKBONE_KINDS:
        model = _load_resnet_weights(folder, architecture, info_file)
    else:
        raise ClassifierInputError(f"{info_file}: unknown architecture {architecture.get('kind')!r}; expected "
                                   f"one of {[DINOV2, *BACKBONE_KINDS]}")
    model.to(_default_device(device)).eval()
    return DiseaseClassifier(model, info["image_size"], tuple(info["classes"]), tuple(info["mean"]),
                             tuple(info["std"]), architecture)


def _check_same_settings(saved: dict, settings: TrainSettings, where: Path) -> None:
    wanted = json.loads(json.dumps(dataclasses.asdict(settings)))  # tuples -> lists, as stored
    saved = {**_LEGACY_SETTINGS, **saved}
    differing = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if differing:
        raise ClassifierInputError(
            f"{where}: was made with other settings ({', '.join(f'{k}={saved.get(k)!r}' for k in differing)}); "
            f"use a new output folder or the same settings"
        )


def _save_checkpoint(path: Path, **state) -> None:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def _schedule(optimizer, total_steps: int, warmup_steps: int):
    """Cosine decay of the learning rate to 0 over all steps, after a linear warm-up over ``warmup_steps``."""
    if warmup_steps == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(order: list[int], batch_size: int, batch_norm: bool) -> list[list[int]]:
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if batch_norm and len(batches[-1]) == 1:
        batches.pop()  # batch norm cannot train on one image; it is seen in the other epochs
    return batches


def train_classifier(
    dataset_root,
    backbone,
    out_dir,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    image_size: int | None = None,
    weight_decay: float | None = None,
    warmup_epochs: float | None = None,
    shift: int | None = None,
    jitter: float | None = None,
    blur: float | None = None,
    hflip: bool = True,
    seed: int = 0,
    device: str | None = None,
    num_workers: int = 0,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> DiseaseClassifier:
    """Trains a disease classifier on the ``train`` split of a MeMa folder; writes ``out_dir/classifier``.

    ``backbone``: ``"resnet18"`` (torchvision ResNet-18 with a small-image stem, trained from scratch) or a local
    transformers folder with a DINOv2 backbone (fine-tuned). Settings left as None take the kind's ``DEFAULTS``.
    Resumes from ``out_dir/checkpoint.pt`` when an earlier run with the same settings was interrupted; returns the
    finished classifier at once when ``out_dir`` already holds one made with the same settings.
    ``on_epoch_end`` gets each epoch's log entry after that epoch's checkpoint is written.
    """
    kind = backbone_kind(backbone)
    s = _resolved_settings(kind, {"epochs": epochs, "batch_size": batch_size, "lr": lr, "image_size": image_size,
                                  "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "shift": shift,
                                  "jitter": jitter, "blur": blur})
    backbone_id = kind if kind in BACKBONE_KINDS else str(check_backbone_dir(backbone).resolve())
    dataset = read_dataset(dataset_root)
    out_dir = Path(out_dir)
    settings = TrainSettings(backbone_id, str(dataset.root.resolve()), s["epochs"], s["batch_size"], s["lr"],
                             s["weight_decay"], s["image_size"], hflip, seed, warmup_epochs=s["warmup_epochs"],
                             shift=s["shift"], jitter=s["jitter"], blur=s["blur"])
    final_dir = out_dir / CLASSIFIER_DIR
    if _finished(final_dir, settings):
        return load_classifier(out_dir, device=device)
    train_records = _train_records(dataset, kind)
    select_records = dataset.split("select")
    device = _default_device(device)

    torch.manual_seed(seed)  # the new head's (DINOv2) or the whole network's (ResNet-18) initialisation
    model, architecture = _new_model(kind, backbone)
    model.to(device)
    batch_norm = kind != DINOV2
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    steps_per_epoch = len(_batches(list(range(len(train_records))), s["batch_size"], batch_norm))
    scheduler = _schedule(optimizer, s["epochs"] * steps_per_epoch, round(s["warmup_epochs"] * steps_per_epoch))
    checkpoint_path = out_dir / CHECKPOINT_FILE
    history, start_epoch = _resume(checkpoint_path, settings, device, model, optimizer, scheduler)

    classifier = DiseaseClassifier(model, s["image_size"], DISEASES, architecture=architecture)
    images = _RecordImages(dataset, train_records, s["image_size"])
    for epoch in range(start_epoch, s["epochs"]):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(images), generator=generator).tolist()
        loader = torch.utils.data.DataLoader(images, batch_sampler=_batches(order, s["batch_size"], batch_norm),
                                             num_workers=num_workers)
        losses = _train_epoch(classifier, loader, optimizer, scheduler, generator, device, hflip=hflip,
                              shift=s["shift"], jitter=s["jitter"], blur=s["blur"])
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if select_records:
            pred = predict(classifier, [dataset.load_image(r) for r in select_records], batch_size=s["batch_size"])
            entry["select_accuracy"] = per_class_accuracy(pred, np.array([r.label for r in select_records]))["All"]
        entry["seconds"] = round(time.perf_counter() - started, 1)
        history.append(entry)
        _save_checkpoint(checkpoint_path, settings=json.loads(json.dumps(dataclasses.asdict(settings))),
                         epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), history=history)
        if on_epoch_end is not None:
            on_epoch_end(entry)

    _save_classifier(final_dir, kind, model, {
        "architecture": architecture, "image_size": s["image_size"], "classes": list(DISEASES),
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "settings": dataclasses.asdict(settings),
        "history": history})
    checkpoint_path.unlink()
    model.eval()
    return classifier


def _finished(final_dir: Path, settings) -> bool:
    """Whether ``final_dir`` holds a classifier trained with ``settings`` (other settings: an error)."""
    info = final_dir / CLASSIFIER_INFO_FILE
    if not info.is_file():
        return False
    _check_same_settings(json.loads(info.read_text())["settings"], settings, info)
    return True


def _train_records(dataset, kind: str) -> list:
    records = dataset.split("train")
    if len(records) < (2 if kind in BACKBONE_KINDS else 1):
        raise ClassifierInputError(f"{dataset.root}: the train split has {len(records)} images; too few to "
                                   f"train {kind} on")
    return records


def _train_epoch(classifier, loader, optimizer, scheduler, generator, device, *, hflip, shift, jitter,
                 blur=0.0) -> list[float]:
    """One pass over ``loader`` (augmented batches, cross-entropy, one optimizer step each); the losses."""
    classifier.model.train()
    losses = []
    for pixels, labels in loader:
        pixels = augment(pixels, generator, hflip=hflip, shift=shift, jitter=jitter, blur=blur)
        logits = classifier.logits(_normalise(pixels, IMAGENET_MEAN, IMAGENET_STD).to(device))
        loss = torch.nn.functional.cross_entropy(logits, labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def _resolved_settings(kind: str, given: dict) -> dict:
    """The training settings: those given, the kind's DEFAULTS for the rest; bad values are one error."""
    s = {name: DEFAULTS[kind][name] if value is None else value for name, value in given.items()}
    if min(s["epochs"], s["batch_size"], s["image_size"]) < 1 or s["lr"] <= 0:
        raise ClassifierInputError(
            f"epochs, batch_size, image_size and lr must be positive, got {s['epochs']}, {s['batch_size']}, "
            f"{s['image_size']}, {s['lr']}")
    if s["blur"] < 0:
        raise ClassifierInputError(f"blur must be >= 0 (pixels), got {s['blur']}")
    if s["weight_decay"] < 0 or s["shift"] < 0 or not 0 <= s["jitter"] < 1 or not 0 <= s["warmup_epochs"] < s["epochs"]:
        raise ClassifierInputError(
            f"weight_decay and shift must be >= 0, jitter in [0, 1) and warmup_epochs in [0, epochs), got "
            f"{s['weight_decay']}, {s['shift']}, {s['jitter']}, {s['warmup_epochs']}")
    return s


def _new_model(kind: str, backbone):
    """(model, architecture record) for a new training run."""
    if kind == DINOV2:
        model = Dinov2ForImageClassification.from_pretrained(
            backbone, num_labels=len(DISEASES), id2label=dict(enumerate(DISEASES)),
            label2id={d: i for i, d in enumerate(DISEASES)}, local_files_only=True,
        )
        return model, {"kind": DINOV2}
    architecture = {"kind": kind, "num_classes": len(DISEASES), "stem": dict(RESNET18_STEM)}
    return build_resnet18(architecture), architecture


def _resume(checkpoint_path: Path, settings, device, model, optimizer, scheduler) -> tuple[list[dict], int]:
    """(history, next epoch) of an interrupted run with the same settings, its state loaded; ([], 0) without one."""
    if not checkpoint_path.is_file():
        return [], 0
    try:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ClassifierInputError(f"{checkpoint_path}: unreadable training checkpoint ({type(e).__name__}: "
                                   f"{e}); delete it to start over") from None
    _check_same_settings(state["settings"], settings, checkpoint_path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["history"], state["epoch"]


def _save_classifier(final_dir: Path, kind: str, model, info: dict) -> None:
    with atomic_folder(final_dir) as tmp:
        if kind == DINOV2:
            model.save_pretrained(tmp)
        else:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / RESNET_WEIGHTS_FILE)
        (tmp / CLASSIFIER_INFO_FILE).write_text(json.dumps(info, indent=2))


THREADS_HELP = ("torch CPU threads (default: torch's choice, one per core); on a machine shared with other jobs "
                "--threads 1 can be several times faster than two threads that wait on each other")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.medical.classification", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a disease classifier on the train split of a MeMa folder")
    train.add_argument("--data", required=True, help="MeMa-layout folder (labels.csv, images/)")
    train.add_argument("--backbone", required=True,
                       help=f"{' or '.join(BACKBONE_KINDS)} (trained from scratch, no weights needed), or a local "
                            f"transformers folder with a DINOv2 backbone (fine-tuned; write ./resnet18 for a folder "
                            f"of that name)")
    train.add_argument("--out", required=True,
                       help="output folder (checkpoint.pt while training, classifier/ at the end)")
    default = lambda name: f"default: {DEFAULTS[RESNET18][name]} for resnet18, {DEFAULTS[DINOV2][name]} for DINOv2"
    train.add_argument("--epochs", type=int, help=default("epochs"))
    train.add_argument("--batch-size", type=int, help=default("batch_size"))
    train.add_argument("--lr", type=float, help=default("lr"))
    train.add_argument("--image-size", type=int, help=default("image_size"))
    train.add_argument("--weight-decay", type=float, help=default("weight_decay"))
    train.add_argument("--warmup-epochs", type=float, help="linear learning-rate warm-up before the cosine decay; "
                                                           + default("warmup_epochs"))
    train.add_argument("--shift", type=int, help="random shifts of up to this many pixels; " + default("shift"))
    train.add_argument("--jitter", type=float, help="brightness/contrast jitter; " + default("jitter"))
    train.add_argument("--blur", type=float, help="blur half the training images by a Gaussian of sigma up to this "
                                                  "many pixels; " + default("blur"))
    train.add_argument("--no-hflip", action="store_true", help="train without random horizontal flips")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    train.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    train.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    evaluate = commands.add_parser("evaluate", help="per-class accuracy on a split of a MeMa folder, as JSON")
    evaluate.add_argument("--classifier", required=True, help="the --out folder of train")
    evaluate.add_argument("--data", required=True, help="MeMa-layout folder, e.g. a method's de-identified images")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            classifier = train_classifier(
                args.data, args.backbone, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                image_size=args.image_size, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                shift=args.shift, jitter=args.jitter, blur=args.blur, hflip=not args.no_hflip, seed=args.seed, device=args.device,
                num_workers=args.num_workers, on_epoch_end=lambda entry: print(json.dumps(entry), flush=True),
            )
            print(f"classifier written to {Path(args.out) / CLASSIFIER_DIR} ({len(classifier.classes)} classes)")
        else:
            scores = evaluate_split(load_classifier(args.classifier, device=args.device), args.data, args.split)
            print(json.dumps(scores, indent=2))
    except InputError as e:  # its message names the file or value and the problem: one line, no traceback
        print(f"{parser.prog}: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
