"""Align a face to the crop a model was trained on, and put the processed crop back.

A *template* is the five points (``photos.detect`` order) of the training crop, as fractions of
the crop's side (a point at u is at pixel u x size - 0.5, pixel centres at integers).  A face is
aligned by the least-squares similarity (rotation, uniform scale, translation) that maps its five
points onto the template at the crop's size; the processed crop is warped back by the inverse map
and blended into the photo through a feathered ellipse inscribed in the crop: weight 1 inside
``inner`` of the ellipse's radius, falling smoothly (smoothstep) to 0 at its rim.  The photo's
pixels where the weight is 0 are not touched (byte-identical), so pixels away from the faces stay
as they were; the feather leaves no box edge.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

# MeMa-Synth's mean face (faces.csv of the 64 px benchmark, 3000 faces; std ~0.03 of the side): a crop
# from the forehead to below the chin, ears included.  The reference methods' crop, and any model's
# whose folder records no template of its own.
HEAD_TEMPLATE = np.array([[0.377, 0.455], [0.623, 0.455], [0.500, 0.583], [0.412, 0.671], [0.589, 0.671]])
INNER = 0.82  # of the inscribed ellipse's radius: full weight inside, feathered to 0 at the rim


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (no reflection) mapping ``source`` points onto ``target``."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    x, y = source[:, 0], source[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    rows = np.concatenate([np.stack([x, -y, ones, zeros], axis=1), np.stack([y, x, zeros, ones], axis=1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(rows, np.concatenate([target[:, 0], target[:, 1]]), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Where one face's crop lies in its photo: ``matrix`` maps photo pixels to crop pixels."""

    matrix: np.ndarray  # (2, 3)
    size: int

    @classmethod
    def of(cls, points: np.ndarray, template: np.ndarray, size: int) -> Alignment:
        return cls(similarity(points, np.asarray(template, np.float64) * size - 0.5), int(size))

    @property
    def scale(self) -> float:
        """Crop pixels per photo pixel (> 1: the crop enlarges the face)."""
        return float(np.hypot(self.matrix[0, 0], self.matrix[1, 0]))

    def crop(self, photo: np.ndarray) -> np.ndarray:
        """The aligned crop (size x size x 3, uint8), bilinear, black outside the photo."""
        inverse = np.linalg.inv(np.vstack([self.matrix, [0.0, 0.0, 1.0]]))[:2]
        linear, offset = inverse[:, :2], inverse[:, 2]
        offset = offset + 0.5 - linear @ np.array([0.5, 0.5])  # PIL samples pixel centres at +0.5
        coefficients = (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])
        out = Image.fromarray(photo).transform((self.size, self.size), Image.Transform.AFFINE, coefficients,
                                               resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
        return np.asarray(out)

    def weight(self, crop_xy: np.ndarray, inner: float = INNER) -> np.ndarray:
        """Blend weight at crop coordinates (..., 2): the feathered inscribed ellipse."""
        centre = (self.size - 1) / 2.0
        r = np.hypot(crop_xy[..., 0] - centre, crop_xy[..., 1] - centre) / (self.size / 2.0)
        t = np.clip((1.0 - r) / (1.0 - inner), 0.0, 1.0)
        return t * t * (3.0 - 2.0 * t)

    def region(self, shape) -> tuple[int, int, int, int]:
        """The photo's pixel box (left, top, right, bottom; right/bottom exclusive) the crop covers."""
        inverse = np.linalg.inv(np.vstack([self.matrix, [0.0, 0.0, 1.0]]))[:2]
        s = self.size
        corners = np.array([[-0.5, -0.5, 1], [s - 0.5, -0.5, 1], [-0.5, s - 0.5, 1], [s - 0.5, s - 0.5, 1]]) @ inverse.T
        h, w = shape[:2]
        left, top = np.floor(corners.min(axis=0)).astype(int)
        right, bottom = np.ceil(corners.max(axis=0)).astype(int) + 1
        return max(0, left), max(0, top), min(w, right), min(h, bottom)

    def _weights(self, shape, inner: float = INNER):
        """(region box, crop x, crop y, blend weight) for the photo pixels of :meth:`region`."""
        left, top, right, bottom = self.region(shape)
        ys, xs = np.mgrid[top:bottom, left:right].astype(np.float64)
        cx = self.matrix[0, 0] * xs + self.matrix[0, 1] * ys + self.matrix[0, 2]
        cy = self.matrix[1, 0] * xs + self.matrix[1, 1] * ys + self.matrix[1, 2]
        return (left, top, right, bottom), cx, cy, self.weight(np.stack([cx, cy], axis=-1), inner)

    def paste(self, photo: np.ndarray, crop: np.ndarray, inner: float = INNER) -> np.ndarray:
        """``photo`` with ``crop`` warped back and blended in; pixels of weight 0 are left as they were."""
        out = photo.copy()
        (left, top, right, bottom), cx, cy, w = self._weights(photo.shape, inner)
        inside = w > 0
        if not inside.any():
            return out
        values = _bilinear(crop.astype(np.float64), cx[inside], cy[inside])
        block = out[top:bottom, left:right]
        wi = w[inside][:, None]
        blended = block[inside].astype(np.float64) * (1.0 - wi) + values * wi
        block[inside] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
        return out

    def _mask(self, shape, keep) -> np.ndarray:
        mask = np.zeros(shape[:2], bool)
        (left, top, right, bottom), _, _, w = self._weights(shape)
        mask[top:bottom, left:right] = keep(w)
        return mask

    def inside(self, shape) -> np.ndarray:
        """Boolean mask (H, W) of the photo's pixels the blend gives full weight (the face region)."""
        return self._mask(shape, lambda w: w >= 1.0)

    def touched(self, shape) -> np.ndarray:
        """Boolean mask (H, W) of the pixels the blend may change (weight > 0)."""
        return self._mask(shape, lambda w: w > 0)


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``image`` (S, S, C) sampled at (x, y) pixel coordinates (centres at integers), edge-clamped."""
    h, w = image.shape[:2]
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy
