"""What each generated image is conditioned on (paper, Step 2: real-guided rich-condition sampling).

No jax here: the plan is drawn before any model is loaded, and its statistics are what Tab. 2
compares with the real set.

* :class:`RealStatistics`: the real patients' disease frequencies, ages and gender ratio, read from
  a MeMa folder's labels.csv (optionally one split).
* :class:`PublicFaces`: the reference faces for IP-Adapter injection (the paper: FFHQ), with a
  metadata table ``image,age,gender`` (a given CSV, or one written by
  ``python -m eval.face_attributes`` with insightface's genderage model).
* :func:`draw_plan`: one :class:`PlannedImage` per index, each drawn from its own generator
  ``default_rng([seed, index])``, so an image's conditions do not depend on how many images are
  drawn, on the batch it falls in, or on the devices.

Real-guided (``mode="real"``): disease ~ the real frequencies, age ~ the real ages (resampled),
gender ~ the real ratio.  Random (``mode="random"``, Tab. 2's baseline): disease, gender uniform,
age uniform on ``random_age_range``.  Severity (slight/mid/heavy, uniform: the real captions have
none to follow) is added to every disease except Normal ("Normal, heavy level" names no sign).
The reference face is drawn uniformly among public faces of the drawn gender whose age lies in the
drawn age's band (``age_band`` years wide).  Fallback when that cell is empty, counted in the run's
summary: the nearest non-empty band of the same gender ("nearest_band"); with no face of that
gender at all, the face of the nearest age of any gender ("other_gender").
The generated image's labels then carry the reference's age and gender (what was injected); a
direct sample (no injection) carries the disease only: its age and gender are not controlled.
"""
from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mema_jax.data import layout
from mema_jax.errors import InputError

MODES = ("real", "random")
PUBLIC_COLUMNS = ("image", "age", "gender")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SamplingInputError(InputError, ValueError):
    """A sampler input (real set, public faces, model folder) is unusable; the message names it."""


@dataclasses.dataclass(frozen=True)
class RealStatistics:
    source: str
    diseases: tuple[str, ...]
    disease_probs: np.ndarray  # over ``diseases`` (those present)
    ages: np.ndarray  # every known real age (an empirical distribution)
    female_fraction: float
    n_records: int

    @classmethod
    def from_folder(cls, root, split: str = "") -> RealStatistics:
        dataset = layout.read_dataset(root, verify_images=False)  # raises naming labels.csv when it is missing
        labels = Path(root) / layout.LABELS_FILE
        records = [r for r in dataset.records if not split or r.split == split]
        if not records:
            raise SamplingInputError(f"{labels}: no rows in split {split!r} to take statistics from")
        return cls.from_records(records, str(labels))

    @classmethod
    def from_records(cls, records: Sequence[layout.Record], source: str = "records") -> RealStatistics:
        counts = Counter(r.disease for r in records)
        diseases = tuple(d for d in layout.DISEASES if counts[d])
        ages = np.asarray([r.age for r in records if r.age is not None], np.int64)
        genders = [r.gender for r in records if r.gender]
        if not len(ages):
            raise SamplingInputError(f"{source}: no record has an age; real-guided sampling draws ages from them "
                                     "(label the ages, or use sample.mode=random)")
        if not genders:
            raise SamplingInputError(f"{source}: no record has a gender; real-guided sampling draws genders from "
                                     "them (label them, or use sample.mode=random)")
        probs = np.asarray([counts[d] for d in diseases], np.float64)
        return cls(source, diseases, probs / probs.sum(), ages,
                   sum(g == "female" for g in genders) / len(genders), len(records))

    def summary(self) -> dict:
        return {"source": self.source, "records": self.n_records,
                "disease_frequencies": {d: round(float(p), 6) for d, p in zip(self.diseases, self.disease_probs)},
                "age_mean": round(float(self.ages.mean()), 3), "age_min": int(self.ages.min()),
                "age_max": int(self.ages.max()), "female_fraction": round(self.female_fraction, 6)}


@dataclasses.dataclass(frozen=True)
class PublicFace:
    image: str  # relative to the folder
    age: int
    gender: str


@dataclasses.dataclass(frozen=True)
class PublicFaces:
    folder: Path
    metadata: Path
    faces: tuple[PublicFace, ...]

    @classmethod
    def read(cls, folder, metadata: str | Path = "") -> PublicFaces:
        """The folder's reference faces and their metadata (default ``<folder>/metadata.csv``)."""
        folder = Path(folder)
        metadata = Path(metadata) if metadata else folder / "metadata.csv"
        if not folder.is_dir():
            raise SamplingInputError(f"{folder}: the public-face folder does not exist")
        if not metadata.is_file():
            raise SamplingInputError(
                f"{metadata}: the public-face metadata table is missing (columns {','.join(PUBLIC_COLUMNS)}); "
                f"write one, or estimate it: python -m eval.face_attributes --faces {folder} "
                f"--model genderage.onnx --out {metadata}")
        faces = []
        with open(metadata, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in PUBLIC_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise SamplingInputError(f"{metadata}: missing columns {missing}; expected {list(PUBLIC_COLUMNS)}")
            for line, row in enumerate(reader, start=2):
                where = f"{metadata} line {line}"
                image, age, gender = (row["image"] or "").strip(), (row["age"] or "").strip(), (row["gender"] or "").strip()
                if not image or Path(image).is_absolute() or ".." in Path(image).parts:
                    raise SamplingInputError(f"{where}: image {image!r} must be a path inside {folder}")
                if not (folder / image).is_file():
                    raise SamplingInputError(f"{folder / image}: listed at {where} but missing")
                try:
                    age_value = int(age)
                except ValueError:
                    raise SamplingInputError(f"{where}: age {age!r} is not a whole number of years") from None
                if gender not in layout.GENDERS:
                    raise SamplingInputError(f"{where}: gender {gender!r}; expected one of {list(layout.GENDERS)}")
                faces.append(PublicFace(image, age_value, gender))
        if not faces:
            raise SamplingInputError(f"{metadata}: no rows")
        return cls(folder, metadata, tuple(faces))


@dataclasses.dataclass(frozen=True)
class PlannedImage:
    index: int
    image_id: str
    seed: int  # of the initial noise
    disease: str
    severity: str  # "" for Normal or when severity words are off
    drawn_age: int
    drawn_gender: str
    split: str
    ip_scale: float  # 0 for a direct sample
    reference: str  # public face (relative path), "" for a direct sample
    reference_age: int | None
    reference_gender: str
    fallback: str  # "", "nearest_band" or "other_gender"

    @property
    def label_age(self) -> int | None:
        return self.reference_age if self.reference else None

    @property
    def label_gender(self) -> str:
        return self.reference_gender if self.reference else ""


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    mode: str = "real"
    seed: int = 0
    severity: bool = True
    inject: bool = True
    ip_scale_range: tuple[float, float] = (0.2, 0.4)
    age_band: int = 10
    random_age_range: tuple[int, int] = (1, 90)
    split_weights: tuple[float, ...] = tuple(float(layout.PAPER_SPLIT_SIZES[s]) for s in layout.SPLITS)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sample.mode {self.mode!r}; choose one of {MODES}")
        lo, hi = self.ip_scale_range
        if not 0.0 <= lo <= hi:
            raise ValueError(f"ip_scale_range {self.ip_scale_range} must satisfy 0 <= low <= high")
        if self.age_band < 1:
            raise ValueError("age_band must be >= 1 year")


def image_seed(seed: int, index: int) -> int:
    """The initial-noise seed of image ``index`` of a run seeded ``seed`` (31 bits)."""
    return int(np.random.SeedSequence([seed, index, 1]).generate_state(1)[0] >> 1)


def _pick_reference(rng, faces: Sequence[PublicFace], age: int, gender: str, band: int):
    same_gender = [f for f in faces if f.gender == gender]
    if not same_gender:
        nearest = min(abs(f.age - age) for f in faces)
        pool = [f for f in faces if abs(f.age - age) == nearest]
        return pool[int(rng.integers(len(pool)))], "other_gender"
    want = age // band
    bands = {f.age // band for f in same_gender}
    if want in bands:
        chosen, fallback = want, ""
    else:
        chosen = min(bands, key=lambda b: (abs(b - want), b))
        fallback = "nearest_band"
    pool = [f for f in same_gender if f.age // band == chosen]
    return pool[int(rng.integers(len(pool)))], fallback


def draw_image(index: int, options: PlanOptions, stats: RealStatistics | None, faces: PublicFaces | None) -> PlannedImage:
    rng = np.random.default_rng([options.seed, index, 0])
    if options.mode == "real":
        disease = stats.diseases[int(rng.choice(len(stats.diseases), p=stats.disease_probs))]
        age = int(stats.ages[int(rng.integers(len(stats.ages)))])
        gender = "female" if rng.random() < stats.female_fraction else "male"
    else:
        disease = layout.DISEASES[int(rng.integers(len(layout.DISEASES)))]
        age = int(rng.integers(options.random_age_range[0], options.random_age_range[1] + 1))
        gender = layout.GENDERS[int(rng.integers(len(layout.GENDERS)))]
    severity_draw = layout.SEVERITIES[int(rng.integers(len(layout.SEVERITIES)))]
    severity = severity_draw if options.severity and disease != "Normal" else ""
    w = np.asarray(options.split_weights, np.float64)
    split = layout.SPLITS[int(rng.choice(len(layout.SPLITS), p=w / w.sum()))]
    lo, hi = options.ip_scale_range
    scale = float(np.float32(rng.uniform(lo, hi)))
    reference, ref_age, ref_gender, fallback = "", None, "", ""
    if options.inject:
        face, fallback = _pick_reference(rng, faces.faces, age, gender, options.age_band)
        reference, ref_age, ref_gender = face.image, face.age, face.gender
    else:
        scale = 0.0
    return PlannedImage(index, f"{index:06d}", image_seed(options.seed, index), disease, severity, age, gender, split,
                        scale, reference, ref_age, ref_gender, fallback)


def draw_plan(num_images: int, options: PlanOptions, stats: RealStatistics | None = None,
              faces: PublicFaces | None = None) -> list[PlannedImage]:
    options.validate()
    if options.mode == "real" and stats is None:
        raise ValueError("real-guided sampling needs the real set's statistics")
    if options.inject and faces is None:
        raise ValueError("face injection needs a public-face folder")
    return [draw_image(i, options, stats, faces) for i in range(num_images)]


def plan_records(plan: Sequence[PlannedImage]) -> list[layout.Record]:
    """The generated folder's labels.csv rows (each virtual patient its own identity)."""
    return [layout.Record(p.image_id, f"images/{p.image_id}.png", p.disease, p.severity, p.label_age, p.label_gender,
                          p.split, f"gen{p.image_id}", "") for p in plan]


def fallback_counts(plan: Sequence[PlannedImage]) -> dict[str, int]:
    counts = Counter(p.fallback or "exact" for p in plan if p.reference)
    return {k: int(counts.get(k, 0)) for k in ("exact", "nearest_band", "other_gender")}
