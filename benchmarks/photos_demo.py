r"""A clinic photograph de-identified face by face: the README's picture of the whole-photo path.

    python benchmarks/photos_demo.py --model runs/pipeline/deid/model --out docs/photos_demo.png

Builds a 960 x 540 "photo" of four MeMa-Synth patients the model never saw (rendered at 256 px with
another seed, set at different sizes and tilts against a wall), with their faces given by hand
(``--boxes``, with the five points the renderer records: dlib's detector is made for real faces and
finds a third of the synthetic ones), then runs the commands a clinic runs:

    python -m deid_jax.deidentify deidentify --model MODEL --boxes boxes.csv --in photo/ --out medsem/
    python -m deid_jax.deidentify recover --model MODEL --in medsem/
    python -m deid_jax.deidentify deidentify --method blur_keep_eyes --boxes boxes.csv --in photo/ --out ref/

and draws photo | MedSem-DeID | recovered (right passphrase) | blur keeping the eyes, printing each
face's PSNR of recovery inside its blend region and the share of the photo left byte-identical.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mema_jax.data import synth  # noqa: E402
from photos import align  # noqa: E402
from photos.folder import FIVE_POINT_COLUMNS  # noqa: E402

PLACES = ((150, 250, 190, -8.0), (390, 230, 150, 5.0), (610, 270, 230, -3.0), (830, 240, 130, 11.0))  # x, y, size, deg
PASSPHRASE = "photos demo passphrase"


def wall(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    y = np.linspace(0, 1, height)[:, None, None]
    base = np.array([196, 204, 198]) * (1 - 0.25 * y) + rng.normal(0, 3, (height, width, 3))
    base[int(height * 0.78):] = np.array([120, 92, 70]) + rng.normal(0, 4, (height - int(height * 0.78), width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def build_photo(folder: Path, seed: int = 7) -> tuple[np.ndarray, list[tuple]]:
    """The composed photo and, per face, (box, five points) in its pixels."""
    faces_dir = folder / "faces"
    data = synth.generate(faces_dir, synth.SynthSpec(num_images=8, images_per_identity=1, resolution=256, seed=seed))
    rng = np.random.default_rng(seed)
    canvas = Image.fromarray(wall(960, 540, rng))
    faces = []
    for record, (cx, cy, size, degrees) in zip(data.records, PLACES):
        face = data.face(record)
        image = Image.open(data.image_path(record)).convert("RGB").resize((size, size), Image.BICUBIC)
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse((size * 0.06, size * 0.02, size * 0.94, size * 1.1), fill=255)
        mask = mask.filter(ImageFilter.GaussianBlur(size * 0.03))
        rotated, rotated_mask = image.rotate(degrees, Image.BICUBIC), mask.rotate(degrees, Image.BICUBIC)
        left, top = cx - size // 2, cy - size // 2
        canvas.paste(rotated, (left, top), rotated_mask)
        # the recorded points (256 px) -> the photo: scale, rotate about the square's centre, shift
        theta = np.deg2rad(degrees)
        rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
        centre = (size - 1) / 2
        points = (face.landmarks_array() + 0.5) * size / 256 - 0.5
        points = (points - centre) @ rot.T + centre + np.array([left, top])
        box = np.array(face.box).reshape(2, 2) * size / 256
        corners = (np.array([box[0], [box[1, 0], box[0, 1]], box[1], [box[0, 0], box[1, 1]]]) - centre) @ rot.T + centre
        corners += np.array([left, top])
        faces.append((tuple(corners.min(axis=0)) + tuple(corners.max(axis=0)), points))
    return np.asarray(canvas), faces


def run(*args, env=None):
    result = subprocess.run([sys.executable, "-m", "deid_jax.deidentify", *args], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    print(result.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="docs/photos_demo.png")
    parser.add_argument("--work", default="", help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="photos-demo-"))
    (work / "photo").mkdir(parents=True, exist_ok=True)
    photo, faces = build_photo(work)
    Image.fromarray(photo).save(work / "photo" / "clinic.png")
    rows = ["name,left,top,right,bottom," + ",".join(FIVE_POINT_COLUMNS)]
    for box, points in faces:
        rows.append("clinic.png," + ",".join(f"{v:.2f}" for v in (*box, *points.ravel())))
    (work / "boxes.csv").write_text("\n".join(rows) + "\n")
    env = dict(os.environ, DEMO_PASSPHRASE=PASSPHRASE)
    common = [f"--boxes={work / 'boxes.csv'}", f"--in={work / 'photo'}"]
    run("deidentify", f"--model={args.model}", *common, f"--out={work / 'medsem'}", "--passphrase-env=DEMO_PASSPHRASE", env=env)
    run("recover", f"--model={args.model}", f"--in={work / 'medsem'}", "--passphrase-env=DEMO_PASSPHRASE", env=env)
    run("deidentify", "--method=blur_keep_eyes", *common, f"--out={work / 'ref'}")
    medsem = np.asarray(Image.open(work / "medsem" / "deid" / "clinic.png").convert("RGB"))
    recovered = np.asarray(Image.open(work / "medsem" / "recovered" / "clinic.png").convert("RGB"))
    reference = np.asarray(Image.open(work / "ref" / "deid" / "clinic.png").convert("RGB"))
    import json

    template = np.asarray(json.loads((Path(args.model) / "deid_config.json").read_text())["face_template"])
    size = json.loads((Path(args.model) / "deid_config.json").read_text())["model"]["image_size"]
    touched = np.zeros(photo.shape[:2], bool)
    for i, (_, points) in enumerate(faces):
        a = align.Alignment.of(points, template, size)
        inside = a.inside(photo.shape)
        touched |= a.touched(photo.shape)
        err = np.mean((recovered[inside].astype(float) - photo[inside]) ** 2)
        err_deid = np.mean((medsem[inside].astype(float) - photo[inside]) ** 2)
        print(f"face {i + 1}: eye distance {np.linalg.norm(points[1] - points[0]):.0f} px; PSNR in its region: "
              f"recovered {10 * np.log10(255 ** 2 / err):.1f} dB, de-identified {10 * np.log10(255 ** 2 / err_deid):.1f} dB")
    same = np.all(medsem == photo, axis=-1)
    print(f"pixels outside every face's blend region unchanged: {same[~touched].mean():.4f}; "
          f"photo share outside the faces: {(~touched).mean():.2f}")
    tiles = [photo, medsem, recovered, reference]
    titles = ["photo (4 synthetic patients)", "MedSem-DeID", "recovered (passphrase)", "blur keeping the eyes"]
    half = [Image.fromarray(t).resize((480, 270), Image.LANCZOS) for t in tiles]
    sheet = Image.new("RGB", (960, 2 * (270 + 18)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (tile, title) in enumerate(zip(half, titles)):
        x, y = (k % 2) * 480, (k // 2) * (270 + 18)
        draw.text((x + 4, y + 3), title, fill=(0, 0, 0))
        sheet.paste(tile, (x, y + 18))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} (work folder {work})")


if __name__ == "__main__":
    main()
