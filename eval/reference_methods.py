"""Reference de-identifiers: simple rows that fill every table without a trained model.

Each works on the face region: dlib's HOG face box (eval.landmarks.detect_face) grown by
FACE_BOX_SCALE about its centre, since dlib's box runs from the brows to the chin and leaves the
forehead, ears and hairline out. Where no face is found the whole image is treated (privacy
first) and the image is listed under ``no_face`` in the folder's ``method.json``.

Strength (0 leaves the image unchanged; larger hides more; "region width" is the grown box's):
- ``blur``: Gaussian blur (PIL's GaussianBlur, an extended-box approximation whose cost does not
  grow with sigma) with sigma = strength x region width, in pixels;
- ``pixelate``: mean over square cells of side round(strength x region width) pixels;
- ``mask``: black box with opacity ``strength`` (1 = solid black);
- ``blur_keep_eyes``: ``blur``, then the eye region is put back unchanged: the box around dlib's
  eye landmarks 36-47 padded by EYE_PAD x dlib face-box width on every side.

Command line (writes ``<out>/deid/<original name, .png>`` and ``<out>/method.json``)::

    python -m eval.reference_methods --data ROOT --method blur --strength 0.05 --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from eval.inputs import Originals, load_rgb, read_originals
from eval.landmarks import FaceBox, Landmarker, detect_face
from mema_jax.data import layout

METHODS = ("blur", "pixelate", "mask", "blur_keep_eyes")
FACE_BOX_SCALE = 1.3
EYE_PAD = 0.08
EYE_POINTS = slice(36, 48)
METHOD_FILE = "method.json"


@dataclasses.dataclass(frozen=True)
class Regions:
    face: FaceBox          # region to de-identify (the whole image when no face was found)
    eyes: FaceBox | None   # region to keep for blur_keep_eyes; None when no face was found
    found_face: bool


def find_regions(image: np.ndarray, landmarker: Landmarker | None = None) -> Regions:
    """Face region (and, with a landmarker, eye region) of an RGB image."""
    h, w = image.shape[:2]
    box = detect_face(image)
    if box is None:
        return Regions(FaceBox(0, 0, w, h), None, False)
    eyes = None
    if landmarker is not None:
        points = landmarker.landmarks(image, box)[EYE_POINTS]
        pad = EYE_PAD * box.width
        (x0, y0), (x1, y1) = points.min(axis=0) - pad, points.max(axis=0) + pad
        eyes = FaceBox(int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)) + 1, int(np.ceil(y1)) + 1)
        eyes = eyes.clipped(image.shape)
    return Regions(box.scaled(FACE_BOX_SCALE, image.shape), eyes, True)


def _paste(image: np.ndarray, source: np.ndarray, box: FaceBox) -> np.ndarray:
    out = image.copy()
    out[box.top:box.bottom, box.left:box.right] = source[box.top:box.bottom, box.left:box.right]
    return out


def gaussian_blur(image: np.ndarray, box: FaceBox, strength: float) -> np.ndarray:
    sigma = strength * box.width
    if sigma <= 0:
        return image.copy()
    # Blur the box with 4 sigma of real context around it (beyond that the kernel is ~0), so the
    # box edge sees image content, not padding, without blurring the whole (maybe huge) photo.
    margin = int(np.ceil(4 * sigma))
    context = FaceBox(box.left - margin, box.top - margin, box.right + margin, box.bottom + margin).clipped(image.shape)
    patch = Image.fromarray(image[context.top:context.bottom, context.left:context.right])
    blurred = np.asarray(patch.filter(ImageFilter.GaussianBlur(radius=sigma)))
    out = image.copy()
    out[box.top:box.bottom, box.left:box.right] = blurred[box.top - context.top:box.bottom - context.top,
                                                          box.left - context.left:box.right - context.left]
    return out


def pixelate(image: np.ndarray, box: FaceBox, strength: float) -> np.ndarray:
    cell = int(round(strength * box.width))
    if cell <= 1 or box.width == 0 or box.height == 0:
        return image.copy()
    region = Image.fromarray(image[box.top:box.bottom, box.left:box.right])
    small = region.resize((-(-box.width // cell), -(-box.height // cell)), Image.BOX)
    blocks = np.asarray(small.resize((small.width * cell, small.height * cell), Image.NEAREST))
    out = image.copy()
    out[box.top:box.bottom, box.left:box.right] = blocks[:box.height, :box.width]
    return out


def black_mask(image: np.ndarray, box: FaceBox, strength: float) -> np.ndarray:
    opacity = float(np.clip(strength, 0.0, 1.0))
    out = image.copy()
    region = out[box.top:box.bottom, box.left:box.right].astype(np.float32)
    out[box.top:box.bottom, box.left:box.right] = np.round(region * (1.0 - opacity)).astype(np.uint8)
    return out


def deidentify(image: np.ndarray, method: str, strength: float, regions: Regions) -> np.ndarray:
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if method == "blur":
        return gaussian_blur(image, regions.face, strength)
    if method == "pixelate":
        return pixelate(image, regions.face, strength)
    if method == "mask":
        return black_mask(image, regions.face, strength)
    if method == "blur_keep_eyes":
        blurred = gaussian_blur(image, regions.face, strength)
        return blurred if regions.eyes is None else _paste(blurred, image, regions.eyes)
    raise ValueError(f"unknown reference method {method!r}; expected one of {list(METHODS)}")


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    method: str
    strength: float
    out_dir: Path


def _check_out_dir(originals: Originals, out_dir: Path) -> None:
    out, root = out_dir.resolve(), originals.root.resolve()
    if out.is_relative_to(root) or root.is_relative_to(out):
        raise ValueError(f"{out_dir}: output folder and the originals folder {originals.root} contain one another; "
                         "choose separate folders so no input is ever overwritten or mixed with outputs")


def write_method_folders(originals: Originals, specs: Sequence[ReferenceSpec]) -> None:
    """Writes one method folder per spec; face detection runs once per original for all of them."""
    for spec in specs:
        if spec.method not in METHODS:
            raise ValueError(f"unknown reference method {spec.method!r}; expected one of {list(METHODS)}")
        _check_out_dir(originals, spec.out_dir)
    landmarker = Landmarker() if any(s.method == "blur_keep_eyes" for s in specs) else None
    no_face = []
    for item in originals:
        image = load_rgb(item.path)
        regions = find_regions(image, landmarker)
        if not regions.found_face:
            no_face.append(item.name)
        name = Path(item.name).with_suffix(".png")
        for spec in specs:
            layout.write_png(spec.out_dir / "deid" / name, deidentify(image, spec.method, spec.strength, regions))
    for spec in specs:
        info = {"method": spec.method, "strength": spec.strength, "reversible": False,
                "originals": str(originals.root), "face_box_scale": FACE_BOX_SCALE, "eye_pad": EYE_PAD,
                "no_face": no_face}
        layout.atomic_write_bytes(spec.out_dir / METHOD_FILE, json.dumps(info, indent=2).encode())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a reference de-identification method folder.")
    parser.add_argument("--data", required=True, help="originals: a MeMa root or a plain folder of images")
    parser.add_argument("--split", default="", help="MeMa split to process (default: all records)")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--strength", required=True, type=float)
    parser.add_argument("--out", required=True, help="method folder to write (<out>/deid/...)")
    args = parser.parse_args(argv)
    originals = read_originals(args.data, split=args.split)
    write_method_folders(originals, [ReferenceSpec(args.method, args.strength, Path(args.out))])
    print(f"wrote {len(originals)} images to {Path(args.out) / 'deid'}")


if __name__ == "__main__":
    main()
