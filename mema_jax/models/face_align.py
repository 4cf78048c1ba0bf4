"""Differentiable face crops in JAX: five points (or a box) -> the 112 x 112 ArcFace crop.

The eval bridge's protocol (``eval.identity.faces.align_to_template``, insightface's
``norm_crop``) as jittable array code, so an identity loss can be taken through the crop:

* ``similarity_transform``: the least-squares similarity (rotation, uniform scale,
  translation) taking the five points onto insightface's template -- skimage's
  ``SimilarityTransform.estimate`` in closed form (centred points, then
  a = sum(p.q) / sum(|p|^2), b = sum(p x q) / sum(|p|^2));
* ``warp_affine``: output pixel (x, y) samples the image at the inverse transform of (x, y),
  bilinearly, pixel centres at integers (OpenCV's convention).  Border as PIL's affine transform
  (what the eval bridge runs): a sample point outside [-0.5, size - 0.5) is ``fill``; inside,
  neighbours past the edge repeat the edge pixel.

Landmarks: (B, 5, 2) in (x, y) image pixels, insightface / MTCNN order (image-left eye,
image-right eye, nose tip, image-left mouth corner, image-right mouth corner), as MeMa's
``faces.csv`` records them.  Differentiable in the image (and in the points, through the
bilinear weights); the output is float, not rounded to uint8 as the eval bridge's crop is.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# insightface's arcface_torch / ONNX template for a 112 x 112 crop (= eval.identity.faces.ARCFACE_TEMPLATE_112;
# duplicated because the eval bridge never imports jax and JAX code never imports the eval bridge).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
ARCFACE_SIZE = (112, 112)  # (width, height)


def similarity_transform(source, target):
    """(..., K, 2) points -> (..., 2, 3) least-squares similarity mapping ``source`` onto ``target``."""
    source = jnp.asarray(source, jnp.float32)
    target = jnp.broadcast_to(jnp.asarray(target, jnp.float32), source.shape)
    ms, mt = source.mean(-2, keepdims=True), target.mean(-2, keepdims=True)
    p, q = source - ms, target - mt
    norm = jnp.sum(p * p, axis=(-2, -1))
    a = jnp.sum(p[..., 0] * q[..., 0] + p[..., 1] * q[..., 1], -1) / norm
    b = jnp.sum(p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0], -1) / norm
    linear = jnp.stack([jnp.stack([a, -b], -1), jnp.stack([b, a], -1)], -2)  # (..., 2, 2)
    shift = mt[..., 0, :] - jnp.einsum("...ij,...j->...i", linear, ms[..., 0, :])
    return jnp.concatenate([linear, shift[..., None]], -1)


def invert_affine(matrices):
    """(..., 2, 3) affine maps -> their inverses."""
    a, b, c = matrices[..., 0, 0], matrices[..., 0, 1], matrices[..., 0, 2]
    d, e, f = matrices[..., 1, 0], matrices[..., 1, 1], matrices[..., 1, 2]
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    return jnp.stack([jnp.stack([ia, ib, -(ia * c + ib * f)], -1), jnp.stack([id_, ie, -(id_ * c + ie * f)], -1)], -2)


def warp_affine(images, matrices, size: tuple[int, int], fill: float = 0.0):
    """``cv2.warpAffine(image, matrix, size)`` for a batch: images (B, H, W, C), matrices (B, 2, 3)
    mapping image pixels to output pixels, ``size`` (width, height).  Returns float32 (B, h, w, C)."""
    images = jnp.asarray(images)
    height, width = images.shape[1:3]
    out_w, out_h = size
    inverse = invert_affine(jnp.asarray(matrices, jnp.float32))
    ys, xs = jnp.meshgrid(jnp.arange(out_h, dtype=jnp.float32), jnp.arange(out_w, dtype=jnp.float32), indexing="ij")
    x = inverse[:, 0, 0, None, None] * xs + inverse[:, 0, 1, None, None] * ys + inverse[:, 0, 2, None, None]
    y = inverse[:, 1, 0, None, None] * xs + inverse[:, 1, 1, None, None] * ys + inverse[:, 1, 2, None, None]
    inside = (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    dx, dy = (x - x0)[..., None], (y - y0)[..., None]
    xa, xb = jnp.clip(x0, 0, width - 1).astype(jnp.int32), jnp.clip(x0 + 1, 0, width - 1).astype(jnp.int32)
    ya, yb = jnp.clip(y0, 0, height - 1).astype(jnp.int32), jnp.clip(y0 + 1, 0, height - 1).astype(jnp.int32)
    pixels = images.astype(jnp.float32)
    gather = jax.vmap(lambda image, yi, xi: image[yi, xi])
    top = (1 - dx) * gather(pixels, ya, xa) + dx * gather(pixels, ya, xb)
    bottom = (1 - dx) * gather(pixels, yb, xa) + dx * gather(pixels, yb, xb)
    out = (1 - dy) * top + dy * bottom
    return jnp.where(inside[..., None], out, jnp.float32(fill))


def align_faces(images, landmarks, size: tuple[int, int] = ARCFACE_SIZE, template=ARCFACE_TEMPLATE_112,
                fill: float = 0.0):
    """The crops (B, h, w, C) in which each image's five points best match ``template``."""
    return warp_affine(images, similarity_transform(landmarks, template), size, fill)


def crop_boxes(images, boxes, size: tuple[int, int] = ARCFACE_SIZE, fill: float = 0.0):
    """Each box (B, 4: left, top, right, bottom, in pixel-edge coordinates) stretched onto the
    whole (width, height) output, bilinearly (a box without landmarks)."""
    boxes = jnp.asarray(boxes, jnp.float32)
    out_w, out_h = size
    sx = out_w / (boxes[:, 2] - boxes[:, 0])
    sy = out_h / (boxes[:, 3] - boxes[:, 1])
    zeros = jnp.zeros_like(sx)
    # Edge coordinates: output pixel centre x + 0.5 sits at box left + (x + 0.5) / sx.
    tx = -0.5 + sx * (0.5 - boxes[:, 0])
    ty = -0.5 + sy * (0.5 - boxes[:, 1])
    matrices = jnp.stack([jnp.stack([sx, zeros, tx], -1), jnp.stack([zeros, sy, ty], -1)], -2)
    return warp_affine(images, matrices, size, fill)
