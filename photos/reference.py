"""Reference de-identifiers on an aligned face crop: what a clinic can run today without a trained
model, through the same detect -> align -> paste path as MedSem-DeID (``photos.folder``).

Strength is relative to the crop's side S (the crop runs from above the forehead to below the chin,
``align.HEAD_TEMPLATE``), so a face is hidden alike at any resolution:
- ``blur``: Gaussian blur, sigma = strength x S pixels (PIL's GaussianBlur);
- ``pixelate``: the mean over square cells of side round(strength x S);
- ``mask``: black, opacity ``strength`` (1 = solid);
- ``blur_keep_eyes``: ``blur``, then the eye region (the box around the template's eyes, padded by
  EYE_PAD x S) put back unchanged: the medical signs of the eyes kept, the rest of the face hidden.
Defaults (DEFAULT_STRENGTHS) hide the identity from the evaluation models at the crop scale: blur at
0.06 x S is ~0.1 of the face's width per sigma, stronger than the eval bridge's table rows (0.05 of a
box 1.3x dlib's), which are kept as they are for the paper's tables.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

METHODS = ("blur", "pixelate", "mask", "blur_keep_eyes")
DEFAULT_STRENGTHS = {"blur": 0.06, "pixelate": 0.1, "mask": 1.0, "blur_keep_eyes": 0.06}
EYE_PAD = 0.07


def eye_box(template: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels of the eye region of a crop of ``size`` aligned to ``template``."""
    eyes = np.asarray(template, np.float64)[:2] * size - 0.5
    pad = EYE_PAD * size
    (x0, y0), (x1, y1) = eyes.min(axis=0) - pad, eyes.max(axis=0) + pad
    return (max(0, int(np.floor(x0))), max(0, int(np.floor(y0 - 0.3 * pad))),
            min(size, int(np.ceil(x1)) + 1), min(size, int(np.ceil(y1 + 0.3 * pad)) + 1))


def deidentify_crop(crop: np.ndarray, method: str, strength: float | None = None,
                    template: np.ndarray | None = None) -> np.ndarray:
    """The de-identified crop (same size, uint8)."""
    if method not in METHODS:
        raise ValueError(f"unknown reference method {method!r}; expected one of {list(METHODS)}")
    strength = DEFAULT_STRENGTHS[method] if strength is None else float(strength)
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    size = crop.shape[0]
    if method in ("blur", "blur_keep_eyes"):
        out = np.asarray(Image.fromarray(crop).filter(ImageFilter.GaussianBlur(radius=strength * size)))
        if method == "blur_keep_eyes":
            if template is None:
                raise ValueError("blur_keep_eyes needs the crop's template (where the eyes are)")
            left, top, right, bottom = eye_box(template, size)
            out = out.copy()
            out[top:bottom, left:right] = crop[top:bottom, left:right]
        return out
    if method == "pixelate":
        cell = max(1, int(round(strength * size)))
        small = Image.fromarray(crop).resize((-(-size // cell),) * 2, Image.BOX)
        return np.asarray(small.resize((small.width * cell,) * 2, Image.NEAREST))[:size, :size].copy()
    opacity = float(np.clip(strength, 0.0, 1.0))
    return np.round(crop.astype(np.float32) * (1.0 - opacity)).astype(np.uint8)
