"""grain input pipelines over a MeMa-layout folder.

One seeded, shuffled order of the records is the same in every process; each global batch is the
next ``global_batch_size`` records of it, and process p reads only its rows of that batch (the
rows its devices hold), so a run on 2 processes x 4 devices sees the same batches, row for row,
as one process with 8 (:class:`GlobalBatchSampler`).  Decoding and augmentation are per record
(augmentation randomness comes from grain's per-record RNG, seeded by the record's position in
the global order, so it does not depend on the process count either), then batches.  The iterator is checkpointable: its state is saved with
the model, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import os
import sys
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


class GlobalBatchSampler:
    """Process ``p`` of ``P``'s view of one global, seeded record order, in global-batch rows.

    grain's DataLoader (given ``ShardOptions(p, P)``) asks for positions ``q = i * P + p``, i the
    process-local position.  Local position i is row ``j = i % L`` of local batch ``k = i // L``
    (L = B / P); its record is the global order's ``k * B + p * L + j``: the same rows as the
    process's devices hold of global batch k.  With ``P == 1`` this is the plain IndexSampler.
    A finite order ends after its last full global batch, or (``drop_remainder=False``) after the
    rest of it split evenly over the processes (at most P - 1 records left out, as grain does), so
    every process yields the same number of batches.
    """

    def __init__(self, order: grain.IndexSampler, global_batch_size: int, process_index: int, process_count: int,
                 drop_remainder: bool):
        self._order = order
        self._batch, self._p, self._count = global_batch_size, process_index, process_count
        self._local = global_batch_size // process_count
        total = len(order)
        if total >= sys.maxsize:
            self._full, self._rest = None, 0
        else:
            self._full = total // global_batch_size  # full global batches
            rest = total - self._full * global_batch_size
            self._rest = 0 if drop_remainder else rest // process_count  # per process, in the last one
        self._len = sys.maxsize if self._full is None else (self._full * self._local + self._rest) * process_count

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:  # grain puts this in checkpoints
        return (f"GlobalBatchSampler({self._order!r}, global_batch_size={self._batch}, "
                f"process={self._p}/{self._count}, rest={self._rest})")

    def global_position(self, q: int) -> int:
        if q < 0 or q >= self._len or q % self._count != self._p:
            raise IndexError(f"position {q} is not process {self._p}'s (of {self._count}) or past {self._len}")
        i = q // self._count
        if self._full is None or i < self._full * self._local:
            k, j = divmod(i, self._local)
            return k * self._batch + self._p * self._local + j
        return self._full * self._batch + self._p * self._rest + (i - self._full * self._local)

    def __getitem__(self, q: int) -> grain.RecordMetadata:
        record = self._order[self.global_position(q)]
        return grain.RecordMetadata(index=q, record_key=record.record_key, rng=record.rng)


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
    order = grain.IndexSampler(num_records=len(source), shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    process, count = jax.process_index(), jax.process_count()
    sampler = GlobalBatchSampler(order, global_batch_size, process, count, drop_remainder)
    ops: list = [Augment()] if augment else []
    ops += [ToFloat(), grain.Batch(global_batch_size // count, drop_remainder=drop_remainder)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops, worker_count=worker_count,
                            shard_options=grain.ShardOptions(shard_index=process, shard_count=count,
                                                             drop_remainder=True))


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
