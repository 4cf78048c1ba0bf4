"""grain input pipelines over a MeMa-layout folder.

Each process reads its own shard of the records (``ShardByJaxProcess``), shuffles with a seeded
sampler, decodes and augments per record (augmentation randomness comes from grain's per-record
RNG, so it is reproducible), and batches.  The iterator is checkpointable: its state is saved with
the model, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import grain.python as grain
import jax
import numpy as np
from PIL import Image

from mema_jax.data import layout


class MeMaSource(grain.RandomAccessDataSource):
    """Records of one split; yields dicts of numpy arrays (image uint8 HxWx3, label, ...)."""

    def __init__(self, dataset: layout.MeMaDataset, split: str, image_size: int, with_masks: bool = False,
                 with_faces: bool = False):
        self.dataset = dataset
        self.records = dataset.split(split)
        if not self.records:
            raise ValueError(f"{dataset.root / layout.LABELS_FILE}: split {split!r} has no records")
        if with_faces:
            missing = [r.image_id for r in self.records if dataset.face(r) is None]
            if missing:
                raise layout.MeMaFormatError(
                    f"{dataset.root / layout.FACES_FILE}: {len(missing)} images of split {split!r} have no recorded "
                    f"face (e.g. {missing[:3]}); this pipeline aligns faces from their five points")
        self.image_size = image_size
        self.with_masks = with_masks
        self.with_faces = with_faces

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = self.dataset.load_image(rec)
        scale = (self.image_size / image.shape[1], self.image_size / image.shape[0])
        if image.shape[:2] != (self.image_size, self.image_size):
            image = np.asarray(Image.fromarray(image).resize((self.image_size, self.image_size), Image.BICUBIC))
        out = {
            "image": image,
            "label": np.int32(rec.label),
            "severity": np.int32(layout.SEVERITIES.index(rec.severity) if rec.severity else -1),
            "index": np.int32(index),
        }
        if self.with_masks:
            if rec.mask:
                mask = self.dataset.load_mask(rec)
                if mask.shape != (self.image_size, self.image_size):
                    mask = np.asarray(Image.fromarray(mask).resize((self.image_size,) * 2, Image.NEAREST))
            else:
                mask = np.zeros((self.image_size, self.image_size), bool)
            out["mask"] = mask
            out["has_mask"] = np.bool_(bool(rec.mask))
        if self.with_faces:  # five points (x, y), in the pixels of the resized image (centres at integers)
            points = self.dataset.face(rec).landmarks_array()
            out["landmarks"] = ((points + 0.5) * np.asarray(scale) - 0.5).astype(np.float32)
        return out

    def __repr__(self) -> str:  # grain puts this in checkpoints / logs
        return f"MeMaSource(root={self.dataset.root}, n={len(self.records)}, size={self.image_size})"


@dataclasses.dataclass(frozen=True)
class Augment(grain.RandomMapTransform):
    """Horizontal flip (image, mask and five face points, whose image-left and image-right points
    then swap) and brightness/contrast jitter."""

    flip: bool = True
    brightness: float = 0.1
    contrast: float = 0.1

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"].astype(np.float32)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
            if "mask" in element:
                element = dict(element, mask=element["mask"][:, ::-1].copy())
            if "landmarks" in element:
                points = element["landmarks"][[1, 0, 2, 4, 3]].copy()  # eyes and mouth corners swap sides
                points[:, 0] = image.shape[1] - 1 - points[:, 0]
                element = dict(element, landmarks=points)
        if self.brightness or self.contrast:
            b = rng.uniform(-self.brightness, self.brightness) * 255
            c = 1 + rng.uniform(-self.contrast, self.contrast)
            image = (image - 127.5) * c + 127.5 + b
        return dict(element, image=np.clip(image, 0, 255).astype(np.uint8))


class ToFloat(grain.MapTransform):
    """uint8 [0, 255] -> float32 [-1, 1]."""

    def map(self, element: dict) -> dict:
        return dict(element, image=element["image"].astype(np.float32) / 127.5 - 1.0)


def make_loader(
    dataset: layout.MeMaDataset,
    split: str,
    *,
    global_batch_size: int,
    image_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    augment: bool = True,
    with_masks: bool = False,
    with_faces: bool = False,
    worker_count: int = 0,
    drop_remainder: bool = True,
) -> grain.DataLoader:
    """A grain DataLoader yielding this process's part of each global batch."""
    if global_batch_size % jax.process_count():
        raise ValueError(f"batch size {global_batch_size} is not divisible by {jax.process_count()} processes")
    source = MeMaSource(dataset, split, image_size, with_masks=with_masks, with_faces=with_faces)
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardByJaxProcess(drop_remainder=True),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    ops: list = [Augment()] if augment else []
    ops += [ToFloat(), grain.Batch(global_batch_size // jax.process_count(), drop_remainder=drop_remainder)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops, worker_count=worker_count)


def ensure_dataset(root, synth_config=None, *, verify_images: bool = True) -> layout.MeMaDataset:
    """Opens the dataset at ``root``; renders MeMa-Synth there first when asked and it is absent.

    Only process 0 renders; the others wait for the labels table (which is written last).
    """
    root = Path(root)
    if synth_config is not None:
        from mema_jax.data import synth

        spec = synth.SynthSpec(
            num_images=synth_config.num_images,
            images_per_identity=synth_config.images_per_identity,
            resolution=synth_config.resolution,
            seed=synth_config.seed,
        )
        synth.check_spec(root, spec)
    if not (root / layout.LABELS_FILE).exists() and synth_config is not None:
        if jax.process_index() == 0:
            print(f"rendering MeMa-Synth ({spec.num_images} images, {spec.resolution}px) into {root}", flush=True)
            synth.generate(root, spec, workers=min(os.cpu_count() or 1, 8))
        _wait_for(root / layout.LABELS_FILE)
    return layout.read_dataset(root, verify_images=verify_images)


def _wait_for(path: Path, timeout_s: float = 3600) -> None:
    import time

    start = time.time()
    while not path.exists():
        if time.time() - start > timeout_s:
            raise TimeoutError(f"{path} did not appear within {timeout_s}s")
        time.sleep(1)
