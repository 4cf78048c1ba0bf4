"""MeMa-Synth: procedural patient faces in the MeMa layout, the offline stand-in for MeMa.

Every image is a deterministic function of (seed, identity, image index): the same spec gives the
same bytes.  Each identity is one synthetic patient with fixed face parameters (face shape, skin
tone, eye spacing and size, iris colour, nose, mouth, hair, brows), an age and a gender that
shape the face (hair length, brow weight, grey hair, skin creases), and one disease with a
consistent affected side.  Every image of an identity varies pose (roll, shift, scale, yaw-like
feature shift), lighting and expression (smile, eye opening, brow raise), so identity is
learnable and measurable.  Diseases show in the eye region at three severities:

  Normal   no sign
  BCC      pearly nodule with rolled border and central ulcer near the lower lid (tumour mask)
  SCC      red scaly irregular plaque on the lid/cheek (tumour mask)
  Conj     red sclera with vessels, both eyes
  Uveitis  ciliary flush (red ring round the iris), small pupil, hazy iris, one eye
  Ptosis   upper lid drooping over the iris, one eye
  Strab    one iris turned in or out
  TAO      lid retraction (sclera above the iris), swollen lids, both eyes

Splits are by identity (no patient in two splits), stratified by disease, in the paper's
proportions 34000 / 3729 / 4578.

Each image's face is recorded as it is drawn, in ``faces.csv`` (``layout.FACES_FILE``): the eye
centres (centres of the eye openings), the nose tip (lower end of the nose ridge, level with the
nostrils), the mouth corners (ends of the lip line) and a detector-style box (see
``face_record``), in image pixels.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from mema_jax.data import layout

SEVERITY_SCALE = {"slight": 0.4, "mid": 0.7, "heavy": 1.0}
MASK_DISEASES = ("BCC", "SCC")
SPEC_FILE = "synth_spec.json"  # the spec a MeMa-Synth folder was rendered from
RESOLUTIONS = (64, 128, 256)
# The recorded face box, in face units: from this far above the eye line to this fraction of the
# face height below the face centre (the chin), this fraction of the face half-width either side.
FACE_BOX_ABOVE_EYES = 0.36
FACE_BOX_CHIN = 0.92
FACE_BOX_HALF_WIDTH = 1.0


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    num_images: int = 1000
    images_per_identity: int = 5
    resolution: int = 128
    seed: int = 0
    class_weights: Sequence[float] | None = None  # over layout.DISEASES; None = uniform
    female_fraction: float = 0.5
    age_range: tuple[int, int] = (18, 85)
    split_weights: Sequence[float] = tuple(layout.PAPER_SPLIT_SIZES[s] for s in layout.SPLITS)

    def validate(self) -> None:
        if self.num_images < 1 or self.images_per_identity < 1:
            raise ValueError("num_images and images_per_identity must be >= 1")
        if self.resolution < 32:
            raise ValueError(f"resolution {self.resolution} is too small (>= 32)")
        w = self.class_weights
        if w is not None and (len(w) != len(layout.DISEASES) or min(w) < 0 or sum(w) <= 0):
            raise ValueError(f"class_weights needs {len(layout.DISEASES)} non-negative weights, got {w}")
        if not 0.0 <= self.female_fraction <= 1.0:
            raise ValueError("female_fraction must lie in [0, 1]")
        if len(self.split_weights) != len(layout.SPLITS):
            raise ValueError(f"split_weights needs {len(layout.SPLITS)} weights")


def spec_dict(spec: SynthSpec) -> dict:
    d = dataclasses.asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def check_spec(root, spec: SynthSpec) -> None:
    """Raises if ``root`` holds MeMa-Synth rendered from another spec (so a config change is not
    silently trained on stale data)."""
    path = Path(root) / SPEC_FILE
    if not path.exists():
        return
    have = json.loads(path.read_text())
    want = spec_dict(spec)
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if diff:
        raise ValueError(f"{path}: this folder was rendered with another spec (have, asked): {diff}; "
                         f"choose another data.root or delete the folder")


def allocate(total: int, weights: Sequence[float]) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class Identity:
    identity: str
    disease: str
    gender: str
    age: int
    seed: int


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    image_id: str
    identity: Identity
    severity: str
    split: str
    index: int  # image index within the identity


def plan(spec: SynthSpec) -> list[ImageSpec]:
    """Decides every image's identity, disease, severity, attributes and split (no rendering)."""
    spec.validate()
    k = spec.images_per_identity
    rng = np.random.default_rng([spec.seed, 0xD15EA5E])
    weights = spec.class_weights or [1.0] * len(layout.DISEASES)
    per_class = allocate(spec.num_images, weights)
    identities: list[tuple[Identity, int]] = []  # (identity, number of images)
    for disease, n_images in zip(layout.DISEASES, per_class):
        n_ids = math.ceil(n_images / k) if n_images else 0
        counts = allocate(n_images, [1.0] * n_ids) if n_ids else []
        genders = np.repeat(["female", "male"], allocate(n_ids, [spec.female_fraction, 1 - spec.female_fraction]))
        rng.shuffle(genders)
        for j in range(n_ids):
            ident = Identity(
                identity=f"{disease.lower()}{j:05d}",
                disease=disease,
                gender=str(genders[j]),
                age=int(rng.integers(spec.age_range[0], spec.age_range[1] + 1)),
                seed=int(rng.integers(2**31)),
            )
            identities.append((ident, int(counts[j])))
    # Splits by identity, stratified by disease.
    split_of: dict[str, str] = {}
    for disease in layout.DISEASES:
        ids = [i for i, _ in identities if i.disease == disease]
        order = rng.permutation(len(ids))
        bounds = np.cumsum(allocate(len(ids), spec.split_weights))
        for rank, idx in enumerate(order):
            split_of[ids[idx].identity] = layout.SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
    images: list[ImageSpec] = []
    severity_counter = {d: 0 for d in layout.DISEASES}
    for ident, n in identities:
        for index in range(n):
            if ident.disease == "Normal":
                severity = ""
            else:
                severity = layout.SEVERITIES[severity_counter[ident.disease] % 3]
                severity_counter[ident.disease] += 1
            images.append(ImageSpec("", ident, severity, split_of[ident.identity], index))
    order = rng.permutation(len(images))
    return [dataclasses.replace(images[o], image_id=f"{n:06d}") for n, o in enumerate(order)]


# ----------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8)
def _pixel_grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    centers = (np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1
    x, y = np.meshgrid(centers, centers)
    x.flags.writeable = y.flags.writeable = False
    return x, y


class _Canvas:
    """An RGB float canvas with face coordinates u (right) and v (down) in [-1, 1] units."""

    def __init__(self, res: int, roll: float, scale: float, shift: tuple[float, float], background: np.ndarray):
        self.res = res
        self.scale = scale
        self.cos, self.sin = math.cos(roll), math.sin(roll)
        self.tx, self.ty = shift
        x, y = _pixel_grid(res)
        x, y = x - np.float32(self.tx), y - np.float32(self.ty)
        self.u = x * np.float32(self.cos / scale) + y * np.float32(self.sin / scale)
        self.v = y * np.float32(self.cos / scale) - x * np.float32(self.sin / scale)
        self.img = np.empty((res, res, 3), np.float32)
        self.img[:] = background
        self.lesion = None
        self.units_per_px = 2.0 / (res * scale)

    def _box(self, cu: float, cv: float, radius: float):
        x = self.scale * (self.cos * cu - self.sin * cv) + self.tx
        y = self.scale * (self.sin * cu + self.cos * cv) + self.ty
        r = self.scale * radius
        to_px = lambda t: (t + 1) / 2 * self.res
        x0, x1 = int(max(0, math.floor(to_px(x - r)) - 1)), int(min(self.res, math.ceil(to_px(x + r)) + 1))
        y0, y1 = int(max(0, math.floor(to_px(y - r)) - 1)), int(min(self.res, math.ceil(to_px(y + r)) + 1))
        if x0 >= x1 or y0 >= y1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def ellipse(self, cu, cv, ru, rv, angle=0.0, box=None):
        """Anti-aliased coverage of an ellipse, as (slices, alpha) over its bounding box."""
        box = box or self._box(cu, cv, max(ru, rv))
        if box is None:
            return None, None
        du, dv = self.u[box] - cu, self.v[box] - cv
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            du, dv = c * du + s * dv, -s * du + c * dv
        dist = np.sqrt((du / ru) ** 2 + (dv / rv) ** 2)
        alpha = np.clip((1.0 - dist) * (min(ru, rv) / self.units_per_px) + 0.5, 0.0, 1.0)
        return box, alpha

    def paint(self, box, alpha, color, opacity=1.0):
        if box is None:
            return
        a = (alpha * np.float32(opacity))[..., None] if opacity != 1.0 else alpha[..., None]
        region = self.img[box]
        region += a * (np.asarray(color, np.float32) - region)

    def mark_lesion(self, box, alpha):
        if box is None:
            return
        if self.lesion is None:
            self.lesion = np.zeros((self.res, self.res), np.float32)
        np.maximum(self.lesion[box], alpha, out=self.lesion[box])


def _identity_params(ident: Identity) -> dict:
    r = np.random.default_rng(ident.seed)
    female = ident.gender == "female"
    tone = r.uniform(0, 1)
    skin = (1 - tone) * np.array([0.96, 0.80, 0.69]) + tone * np.array([0.42, 0.27, 0.18])
    grey = float(np.clip((ident.age - 45) / 35, 0, 1))
    hair_base = np.array([[0.08, 0.06, 0.05], [0.35, 0.22, 0.12], [0.75, 0.60, 0.35], [0.45, 0.15, 0.08]])[r.integers(4)]
    hair = (1 - grey) * hair_base + grey * np.array([0.82, 0.82, 0.80])
    return dict(
        skin=skin,
        hair=hair,
        face_w=r.uniform(0.52, 0.64) + (0.0 if female else 0.04),
        face_h=r.uniform(0.70, 0.80),
        jaw=r.uniform(0.75, 0.95) + (0.0 if female else 0.08),
        eye_dx=r.uniform(0.21, 0.29),
        eye_y=r.uniform(-0.14, -0.04),
        eye_w=r.uniform(0.085, 0.12),
        eye_h=r.uniform(0.040, 0.058),
        iris=np.array([[0.25, 0.15, 0.08], [0.20, 0.35, 0.55], [0.30, 0.45, 0.25], [0.45, 0.30, 0.15]])[r.integers(4)]
        * r.uniform(0.8, 1.2),
        brow_h=r.uniform(0.012, 0.02) * (1.0 if female else 1.6),
        brow_tilt=r.uniform(-0.15, 0.15),
        nose_len=r.uniform(0.16, 0.24),
        nose_w=r.uniform(0.05, 0.085),
        mouth_y=r.uniform(0.30, 0.40),
        mouth_w=r.uniform(0.14, 0.22),
        lip=np.array([0.72, 0.36, 0.36]) * r.uniform(0.85, 1.1),
        hair_len=r.uniform(0.45, 0.9) if female else r.uniform(0.0, 0.12),
        hair_top=r.uniform(0.12, 0.25),
        creases=grey,
        side=int(r.integers(2)),  # affected eye: 0 = image-left, 1 = image-right
        turn=1.0 if r.integers(2) else -1.0,  # strabismus: eso (+1) or exo (-1)
        lesion_seed=int(r.integers(2**31)),
    )


def render(image: ImageSpec, resolution: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Renders one image: (uint8 HxWx3, bool HxW tumour mask or None)."""
    rgb, mask, _ = render_with_face(image, resolution)
    return rgb, mask


def render_with_face(image: ImageSpec, resolution: int) -> tuple[np.ndarray, np.ndarray | None, layout.FaceRecord]:
    """Renders one image: (uint8 HxWx3, bool HxW tumour mask or None, its face record)."""
    ident = image.identity
    p = _identity_params(ident)
    r = np.random.default_rng([ident.seed, image.index, 7])
    sev = SEVERITY_SCALE.get(image.severity, 0.0)
    background = r.uniform(0.3, 0.9, 3).astype(np.float32)
    c = _Canvas(resolution, roll=r.normal(0, 0.06), scale=r.uniform(0.92, 1.05),
                shift=(r.normal(0, 0.035), r.normal(0, 0.035)), background=background)
    yaw = r.normal(0, 0.03)  # inner features slide sideways as the head turns
    smile = r.normal(0, 0.5)
    open_ = np.clip(r.normal(1.0, 0.08), 0.75, 1.2)
    brow_raise = r.normal(0, 0.01)
    skin, fw, fh = p["skin"], p["face_w"], p["face_h"]

    # hair behind the head, face, ears
    c.paint(*c.ellipse(0, -0.12 + 0.5 * p["hair_len"] * 0.4, fw + 0.07, fh * 0.55 + p["hair_len"] * 0.55 + 0.08), p["hair"])
    for side in (-1, 1):
        c.paint(*c.ellipse(side * fw * 0.98, -0.02, 0.07, 0.13), skin * 0.93)
    c.paint(*c.ellipse(0, 0.02, fw, fh), skin)
    c.paint(*c.ellipse(0, 0.30, fw * p["jaw"], fh * 0.62), skin)  # jaw line
    c.paint(*c.ellipse(0, -fh * 0.82, fw * 1.02, p["hair_top"] + 0.08), p["hair"])  # fringe

    # eyes and brows, lesions, nose and mouth
    for k, side in enumerate((-1, 1)):
        _paint_eye(c, p, ident.disease, sev, k, side, yaw, open_, brow_raise)
    _paint_lesions(c, p, ident.disease, sev, image.index, yaw, p["eye_h"] * open_)
    mx, my, mw = _paint_nose_and_mouth(c, p, yaw, smile)

    # lighting, sensor noise
    light = r.normal(0, 0.25, 2)
    c.img *= (r.uniform(0.85, 1.1) + light[0] * c.u[..., None] * 0.25 + light[1] * c.v[..., None] * 0.15)
    c.img += r.standard_normal(c.img.shape, dtype=np.float32) * np.float32(0.012)
    rgb = (np.clip(c.img, 0, 1) * 255 + 0.5).astype(np.uint8)
    mask = None
    if c.lesion is not None:
        # At 32-64 px a slight lesion can be under a pixel: keep its most-covered pixels.
        mask = c.lesion > min(0.5, 0.5 * float(c.lesion.max()))
    return rgb, mask, face_record(image.image_id, c, p, yaw=yaw, mouth=(mx, my, mw), smile=smile)



def _paint_eye(c: _Canvas, p: dict, disease: str, sev: float, k: int, side: int, yaw: float, open_: float,
               brow_raise: float) -> None:
    """One eye (k: 0 left, 1 right) with its brow, lids and the signs of ``disease`` at severity ``sev``."""
    skin = p["skin"]
    eye_w, eye_h = p["eye_w"], p["eye_h"] * open_
    ex, ey = side * p["eye_dx"] + yaw, p["eye_y"]
    affected = k == p["side"]
    lid_open = eye_h
    sclera = np.array([0.95, 0.94, 0.92])
    iris_dx = 0.0
    if disease == "TAO":
        lid_open = eye_h * (1 + 0.6 * sev)
        c.paint(*c.ellipse(ex, ey + 0.005, eye_w * (1.5 + 0.4 * sev), lid_open * (2.2 + 0.8 * sev)),
                skin * np.array([1.0, 0.82, 0.82]), opacity=0.5 + 0.4 * sev)
    if disease == "Conj":
        sclera = (1 - 0.75 * sev) * sclera + 0.75 * sev * np.array([0.86, 0.32, 0.30])
    if disease == "Strab" and affected:
        iris_dx = p["turn"] * side * -1 * sev * eye_w * 0.55
    # brow
    c.paint(*c.ellipse(ex, ey - 0.10 + brow_raise, eye_w * 1.25, p["brow_h"], angle=side * p["brow_tilt"]),
            p["hair"] * 0.8)
    # eye white
    box, a_eye = c.ellipse(ex, ey, eye_w, lid_open)
    c.paint(box, a_eye, sclera)
    if disease == "Conj" and box is not None:
        vessels = 0.5 + 0.5 * np.sin((c.u[box] - ex) * 260 + np.cos((c.v[box] - ey) * 180) * 3)
        c.paint(box, a_eye * (vessels > 0.85), np.array([0.7, 0.08, 0.1]), opacity=sev)
    iris_r = eye_h * 1.1 * min(1.0, 1.0 / open_) if disease != "TAO" else eye_h * 1.1
    ix = ex + iris_dx
    iris_color = p["iris"]
    if disease == "Uveitis" and affected:
        bx, a_ring = c.ellipse(ix, ey, iris_r * (1.25 + 0.25 * sev), iris_r * (1.25 + 0.25 * sev))
        if bx is not None:
            c.paint(bx, a_ring * a_eye_in(c, bx, box, a_eye), np.array([0.85, 0.2, 0.2]), opacity=sev)
        iris_color = (1 - 0.5 * sev) * iris_color + 0.5 * sev * np.array([0.6, 0.6, 0.55])
    bi, a_iris = c.ellipse(ix, ey, iris_r, iris_r)
    if bi is not None:
        c.paint(bi, a_iris * a_eye_in(c, bi, box, a_eye), iris_color)
    pupil = iris_r * (0.45 if not (disease == "Uveitis" and affected) else 0.45 - 0.25 * sev)
    bp, a_p = c.ellipse(ix, ey, pupil, pupil)
    if bp is not None:
        c.paint(bp, a_p * a_eye_in(c, bp, box, a_eye), np.array([0.03, 0.03, 0.03]))
    # upper lid: a skin band whose lower edge falls with ptosis
    droop = 0.0
    if disease == "Ptosis" and affected:
        droop = sev * 1.5 * eye_h
    if droop > 0:
        bl, a_lid = c.ellipse(ex, ey - lid_open + droop, eye_w * 1.1, lid_open + droop * 0.2)
        if bl is not None:
            c.paint(bl, a_lid * a_eye_in(c, bl, box, a_eye), skin * 0.9)
    c.paint(*c.ellipse(ex, ey - lid_open * 0.95 + droop, eye_w * 1.02, lid_open * 0.18), skin * 0.45)
    if p["creases"] > 0:
        c.paint(*c.ellipse(ex + side * eye_w * 1.2, ey + 0.01, eye_w * 0.3, 0.004, angle=side * 0.5),
                skin * 0.7, opacity=p["creases"])



def _paint_lesions(c: _Canvas, p: dict, disease: str, sev: float, index: int, yaw: float, eye_h: float) -> None:
    """BCC / SCC lesions below the affected eye, marked in the canvas's lesion mask."""
    if disease not in MASK_DISEASES:
        return
    lr = np.random.default_rng([p["lesion_seed"], index])
    side = (-1, 1)[p["side"]]
    lx = side * p["eye_dx"] + yaw + side * lr.uniform(-0.03, 0.06)
    ly = p["eye_y"] + eye_h + lr.uniform(0.04, 0.08)
    size = 0.035 + 0.055 * sev
    if disease == "BCC":
        box, a = c.ellipse(lx, ly, size, size * lr.uniform(0.8, 1.0))
        c.paint(box, a, np.array([0.93, 0.72, 0.72]))
        c.mark_lesion(box, a)
        c.paint(*c.ellipse(lx, ly, size * 0.78, size * 0.7), np.array([0.98, 0.84, 0.82]))  # pearly
        c.paint(*c.ellipse(lx, ly, size * 0.35, size * 0.3), np.array([0.45, 0.15, 0.12]), opacity=sev)  # ulcer
    else:
        for _ in range(3 + int(3 * sev)):
            bx, a = c.ellipse(lx + lr.normal(0, size * 0.5), ly + lr.normal(0, size * 0.35),
                              size * lr.uniform(0.4, 0.8), size * lr.uniform(0.3, 0.6), angle=lr.uniform(0, 3))
            c.paint(bx, a, np.array([0.70, 0.25, 0.18]) * lr.uniform(0.85, 1.1))
            c.mark_lesion(bx, a)
        box, _ = c.ellipse(lx, ly, size * 1.6, size * 1.6)
        if box is not None and c.lesion is not None:
            scales = (lr.random(c.lesion[box].shape) > 0.7) * c.lesion[box]
            c.paint(box, scales, np.array([0.93, 0.88, 0.80]), opacity=0.8)



def _paint_nose_and_mouth(c: _Canvas, p: dict, yaw: float, smile: float) -> tuple[float, float, float]:
    """The nose and the mouth; returns the mouth's (x, y, width)."""
    skin = p["skin"]
    c.paint(*c.ellipse(yaw * 1.5, p["eye_y"] + 0.06 + p["nose_len"] * 0.5, p["nose_w"] * 0.45, p["nose_len"] * 0.5),
            skin * 1.06)
    for side in (-1, 1):
        c.paint(*c.ellipse(yaw * 1.5 + side * p["nose_w"] * 0.5, p["eye_y"] + 0.06 + p["nose_len"], p["nose_w"] * 0.3,
                           0.018), skin * 0.55)
    mx, my, mw = yaw * 1.3, p["mouth_y"], p["mouth_w"] * (1 + 0.08 * smile)
    box, a = c.ellipse(mx, my, mw, 0.035 + 0.01 * abs(smile))
    if box is not None:
        curve = (c.v[box] - my) - smile * 0.9 * ((c.u[box] - mx) ** 2) + 0.004 * smile
        c.paint(box, a * np.clip(1 - np.abs(curve) / 0.016, 0, 1), p["lip"])

    return mx, my, mw


def face_record(image_id: str, c: _Canvas, p: dict, *, yaw: float, mouth: tuple[float, float, float],
                smile: float) -> layout.FaceRecord:
    """Where ``render`` drew the face, in pixels (centres at integers).  Points in face units:
    eyes (+-eye_dx + yaw, eye_y), nose tip (1.5 yaw, eye_y + 0.06 + nose_len), mouth corners
    (mx -+ mw, on the lip curve).  Box: upright, centred on the face's (box_u, box_v) point and
    sized in face units to cover brows to chin and cheek to cheek (as a face detector's box)."""
    mx, my, mw = mouth

    def to_pixels(u: float, v: float) -> tuple[float, float]:
        x = c.scale * (c.cos * u - c.sin * v) + c.tx
        y = c.scale * (c.sin * u + c.cos * v) + c.ty
        return (x + 1) / 2 * c.res - 0.5, (y + 1) / 2 * c.res - 0.5

    corner_v = my + smile * (0.9 * mw**2 - 0.004)
    points = (to_pixels(-p["eye_dx"] + yaw, p["eye_y"]), to_pixels(p["eye_dx"] + yaw, p["eye_y"]),
              to_pixels(1.5 * yaw, p["eye_y"] + 0.06 + p["nose_len"]), to_pixels(mx - mw, corner_v),
              to_pixels(mx + mw, corner_v))
    top, bottom = p["eye_y"] - FACE_BOX_ABOVE_EYES, 0.02 + p["face_h"] * FACE_BOX_CHIN
    half_w = p["face_w"] * FACE_BOX_HALF_WIDTH
    cx, cy = to_pixels(yaw, (top + bottom) / 2)
    half = (half_w * c.scale * c.res / 2, (bottom - top) / 2 * c.scale * c.res / 2)
    box = (cx - half[0], cy - half[1], cx + half[0], cy + half[1])
    return layout.FaceRecord(image_id, box, points)


def a_eye_in(c: _Canvas, inner_box, eye_box, eye_alpha) -> np.ndarray:
    """The eye-opening coverage restricted to ``inner_box`` (iris and lids stay inside the eye)."""
    out = np.zeros((inner_box[0].stop - inner_box[0].start, inner_box[1].stop - inner_box[1].start), np.float32)
    if eye_box is None:
        return out
    y0, y1 = max(inner_box[0].start, eye_box[0].start), min(inner_box[0].stop, eye_box[0].stop)
    x0, x1 = max(inner_box[1].start, eye_box[1].start), min(inner_box[1].stop, eye_box[1].stop)
    if y0 < y1 and x0 < x1:
        out[y0 - inner_box[0].start:y1 - inner_box[0].start, x0 - inner_box[1].start:x1 - inner_box[1].start] = \
            eye_alpha[y0 - eye_box[0].start:y1 - eye_box[0].start, x0 - eye_box[1].start:x1 - eye_box[1].start]
    return out


# ----------------------------------------------------------------------------- writing


def _record(image: ImageSpec, has_mask: bool) -> layout.Record:
    return layout.Record(
        image_id=image.image_id,
        image=f"images/{image.image_id}.png",
        disease=image.identity.disease,
        severity=image.severity,
        age=image.identity.age,
        gender=image.identity.gender,
        split=image.split,
        identity=image.identity.identity,
        mask=f"masks/{image.image_id}.png" if has_mask else "",
    )


def _write_chunk(args) -> list[tuple[layout.Record, layout.FaceRecord]]:
    root, images, resolution = args
    out = []
    for image in images:
        rgb, mask, face = render_with_face(image, resolution)
        layout.write_png(Path(root) / "images" / f"{image.image_id}.png", rgb)
        if mask is not None:
            layout.write_png(Path(root) / "masks" / f"{image.image_id}.png", mask.astype(np.uint8) * 255)
        out.append((_record(image, mask is not None), face))
    return out


def generate(root, spec: SynthSpec, *, workers: int = 1, overwrite: bool = False) -> layout.MeMaDataset:
    """Renders ``spec`` into ``root`` in the MeMa layout and returns the validated dataset.

    An existing labels table is never overwritten unless ``overwrite``; the table is written last
    (atomically), so a crashed run leaves no table that lists missing images.
    """
    root = Path(root)
    if (root / layout.LABELS_FILE).exists() and not overwrite:
        raise FileExistsError(f"{root / layout.LABELS_FILE} exists; refusing to overwrite a dataset (pass overwrite)")
    images = plan(spec)
    chunks = [(str(root), images[i:i + 256], spec.resolution) for i in range(0, len(images), 256)]
    if workers > 1:
        # spawn, not fork: the caller may be a multithreaded (jax) process.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_write_chunk, chunks))
    else:
        parts = [_write_chunk(ch) for ch in chunks]
    records = [rec for part in parts for rec, _ in part]
    layout.atomic_write_bytes(root / SPEC_FILE, json.dumps(spec_dict(spec), indent=2).encode())
    layout.write_faces(root, [face for part in parts for _, face in part])
    layout.write_labels(root, records)
    return layout.read_dataset(root, verify_images=False)


def add_faces(root, spec: SynthSpec) -> layout.MeMaDataset:
    """Writes the missing faces.csv of a MeMa-Synth folder rendered before faces were recorded
    (the folder's spec must be ``spec``: same spec, same images, so the faces are theirs)."""
    root = Path(root)
    if not (root / SPEC_FILE).is_file():
        raise ValueError(f"{root / SPEC_FILE}: missing; only a MeMa-Synth folder's faces can be rendered again")
    check_spec(root, spec)
    if not (root / layout.FACES_FILE).exists():
        layout.write_faces(root, [render_with_face(image, spec.resolution)[2] for image in plan(spec)])
    return layout.read_dataset(root, verify_images=False)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Render MeMa-Synth in the MeMa folder layout.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--images-per-identity", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--class-weights", default="", help=f"comma-separated weights over {','.join(layout.DISEASES)} "
                                                         "(default uniform)")
    ap.add_argument("--female-fraction", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    weights = tuple(float(w) for w in a.class_weights.split(",")) if a.class_weights else None
    spec = SynthSpec(num_images=a.num_images, images_per_identity=a.images_per_identity, resolution=a.resolution,
                     seed=a.seed, class_weights=weights, female_fraction=a.female_fraction)
    ds = generate(a.out, spec, workers=a.workers, overwrite=a.overwrite)
    print(f"wrote {len(ds)} images to {a.out}")


if __name__ == "__main__":
    main()
