r"""Is a generated MeMa folder what it claims to be?  The prompted disease, a face, and the distance to
real images, scored with models no generator saw:

  python -m eval.report.generation_quality --classifier runs/mema/medclass --real data/mema_synth_64_3k \
      --row "Direct sample=runs/mema/direct" --row "Face injection=runs/mema/injected" --out runs/mema/quality

writes ``<out>/generation_quality.md`` and two CSVs:

* ``generation_disease``: Med-Class (the disease classifier, trained on real images) accuracy per
  prompted disease and its mean over the diseases present (a class with no image is n/a, not 0);
  the real validation split is the yardstick row.
* ``generation_realism``: the face detector's hit rate (and its ratio to the real validation
  images': a generator that draws faces scores ~1), and the Fréchet distance between the Med-Class
  network's pooled features of each set and of the real validation split (FID's formula in a
  network that knows the diseases; Inception's ImageNet features are not offline).  The real
  training split, subsampled to the size of the largest generated set, is the floor: two samples of
  the same distribution (the distance is biased upwards at small N, the same for every row of that N).

Generated folders are MeMa folders (labels.csv gives each image's prompted disease), as the sampler
writes them; every split of a generated folder is used.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.report.table import Table, number, percent, text, write_text
from mema_jax.data import layout
from mema_jax.errors import InputError

FILE = "generation_quality.md"
DISEASE_KEY, REALISM_KEY = "generation_disease", "generation_realism"


def _records(root, split: str = "") -> tuple[layout.MeMaDataset, list[layout.Record]]:
    dataset = layout.read_dataset(root)
    records = [r for r in dataset.records if not split or r.split == split]
    if not records:
        raise InputError(f"{Path(root) / layout.LABELS_FILE}: no images" + (f" in split {split!r}" if split else ""))
    return dataset, records


def _images(dataset: layout.MeMaDataset, records: Sequence[layout.Record]) -> list[np.ndarray]:
    return [dataset.load_image(r) for r in records]


def classifier_outputs(classifier, images: Sequence[np.ndarray], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class indices (N,), pooled features (N, D)): the input of the classifier's last layer."""
    import torch

    from eval.medical.classification import preprocess

    model = classifier.model
    head = model.fc if hasattr(model, "fc") else model.classifier
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach().flatten(1).cpu()))
    preds = []
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                pixels = preprocess(images[start:start + batch_size], classifier.image_size, classifier.mean,
                                    classifier.std)
                preds.append(classifier.logits(pixels.to(classifier.device)).argmax(-1).cpu().numpy())
    finally:
        hook.remove()
    return np.concatenate(preds), torch.cat(captured).numpy().astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets (N, D), as FID computes it."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def face_rate(finder, images: Sequence[np.ndarray], upscale: int = 1) -> float:
    """Share of ``images`` in which ``finder`` finds a face, each enlarged ``upscale`` times (bicubic) first:
    dlib's HOG detector finds faces down to ~40 px, about the size of a face in a 64 px MeMa-Synth image."""
    from PIL import Image

    if not images:
        return float("nan")
    if upscale > 1:
        images = [np.asarray(Image.fromarray(im).resize((im.shape[1] * upscale, im.shape[0] * upscale), Image.BICUBIC))
                  for im in images]
    return float(np.mean([finder(image) is not None for image in images]))


def per_disease_accuracy(pred: np.ndarray, diseases: Sequence[str], classes: Sequence[str]) -> dict[str, float]:
    """Accuracy over the images prompted with each disease (NaN for a disease with none)."""
    true = np.array([classes.index(d) for d in diseases])
    return {c: float(np.mean(pred[true == i] == i)) if (true == i).any() else float("nan")
            for i, c in enumerate(classes)}


def build(classifier, real_root, rows: Sequence[tuple[str, str]], *, finder=None, upscale: int = 1,
          real_split: str = "val", floor_split: str = "train", seed: int = 0) -> tuple[Table, Table]:
    classes = list(classifier.classes)
    disease = Table(DISEASE_KEY, "Generated images: Med-Class accuracy per prompted disease",
                    ["Set", "Images", *classes, "Mean over diseases"], [text, str, *[percent] * (len(classes) + 1)])
    realism = Table(REALISM_KEY, "Generated images: faces and Fréchet distance to real validation images",
                    ["Set", "Images", "Face found", "Face rate / real", "Fréchet distance (Med-Class features)"],
                    [text, str, percent, number(2), number(1)])
    real_dataset, real_records = _records(real_root, real_split)
    sets = []
    for name, folder in rows:
        dataset, records = _records(folder)
        for r in records:
            if r.disease not in classes:
                raise InputError(f"{Path(folder) / layout.LABELS_FILE}: image {r.image_id}: disease {r.disease!r} is "
                                 f"not one the classifier knows ({', '.join(classes)})")
        sets.append((name, records, _images(dataset, records)))
    largest = max((len(s[1]) for s in sets), default=len(real_records))
    floor_dataset, floor_records = _records(real_root, floor_split)
    rng = np.random.default_rng(seed)
    floor_records = [floor_records[i] for i in sorted(rng.permutation(len(floor_records))[:largest])]
    real_images = _images(real_dataset, real_records)
    _, real_features = classifier_outputs(classifier, real_images)
    real_faces = face_rate(finder, real_images, upscale) if finder else float("nan")
    all_sets = [(f"Real {real_split} (yardstick)", real_records, real_images),
                (f"Real {floor_split}, {len(floor_records)} images (floor)", floor_records,
                 _images(floor_dataset, floor_records)), *sets]
    for name, records, images in all_sets:
        pred, features = classifier_outputs(classifier, images)
        acc = per_disease_accuracy(pred, [r.disease for r in records], classes)
        present = [v for v in acc.values() if not np.isnan(v)]
        disease.rows.append([name, len(images), *acc.values(), float(np.mean(present))])
        faces = real_faces if records is real_records else (face_rate(finder, images, upscale) if finder else float("nan"))
        realism.rows.append([name, len(images), faces, faces / real_faces if real_faces else float("nan"),
                             frechet_distance(features, real_features)])
    disease.notes.append("accuracy over the images whose prompt (labels.csv) names that disease; the mean is over "
                         "the diseases with images.")
    realism.notes.append(f"face detector: {getattr(finder, 'name', 'none')} on images enlarged {upscale}x; Fréchet distance between the pooled "
                         f"features of the Med-Class network for each set and for the {len(real_records)} real "
                         f"{real_split} images (lower = closer; biased upwards for small sets).")
    return disease, realism


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.report.generation_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--classifier", required=True, help="a Med-Class classifier folder (eval.medical.classification train)")
    p.add_argument("--real", required=True, help="the real MeMa folder the classifier was trained on")
    p.add_argument("--real-split", default="val")
    p.add_argument("--floor-split", default="train")
    p.add_argument("--row", action="append", default=[], help="NAME=FOLDER of a generated MeMa folder (repeatable)")
    p.add_argument("--detector", default="dlib", help="face detector: dlib (HOG), mtcnn, auto, none (default dlib: "
                                                     "on 64 px MeMa-Synth it finds 53%% of real faces at 2x, MTCNN 28%%)")
    p.add_argument("--upscale", type=int, default=2, help="enlarge images this many times before detection")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    try:
        rows = []
        for entry in a.row:
            name, sep, folder = entry.partition("=")
            if not sep or not name or not folder:
                raise InputError(f"--row {entry!r}: expected NAME=FOLDER")
            rows.append((name, folder))
        import torch

        from eval.identity.faces import make_face_finder
        from eval.medical.classification import load_classifier

        if a.threads:
            torch.set_num_threads(a.threads)
        finder = None if a.detector == "none" else make_face_finder(a.detector)
        tables = build(load_classifier(a.classifier), a.real, rows, finder=finder, upscale=a.upscale, real_split=a.real_split,
                       floor_split=a.floor_split)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"generation_quality: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for table in tables:
        write_text(out / f"{table.key}.csv", table.csv_text())
    write_text(out / FILE, "\n".join(t.markdown() for t in tables))
    print((out / FILE).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
