"""Input pipeline throughput: images/s of ``pipeline.make_loader`` from a PNG folder and from its
TFDS ArrayRecord build (mema_jax/data/tfds_mema.py), by grain worker count and image size.

  python benchmarks/bench_loader.py [--root MEMA_DIR] [--images 512] [--sizes 64,256] [--workers 0,2,4]
                                    [--epochs 3] [--batch 32] [--out benchmarks/results/loader.md]

Without ``--root`` it renders MeMa-Synth (``--images`` images, all in the train split) at each of
``--sizes`` into a temp folder; with ``--root`` it reads that folder's train split, resized to each
size.  The ArrayRecord build goes to a temp data dir (``--data-dir`` to keep it).  Each loader is
the training one: shuffled, flip + brightness/contrast augmentation, masks, float conversion,
batches of ``--batch``; one warm-up epoch (worker start-up, file cache), then images/s over each of
``--epochs`` epochs, the median reported (min-max beside it).  Prints one Markdown table and writes
it to ``--out``, with the machine's core count and load average: figures from a shared machine are
contended.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from absl import flags

from mema_jax.data import layout, pipeline, synth, tfds_mema


def rate(dataset, *, size: int, workers: int, batch: int, epochs: int) -> list[float]:
    """images/s of each of ``epochs`` epochs after one warm-up epoch."""
    n = len(dataset.split("train"))
    per_epoch = n // batch
    if per_epoch < 1:
        raise SystemExit(f"{n} train images: fewer than one batch of {batch}")
    loader = pipeline.make_loader(dataset, "train", global_batch_size=batch, image_size=size, seed=0,
                                  with_masks=True, worker_count=workers)
    it = iter(loader)
    for _ in range(per_epoch):  # warm-up
        next(it)
    rates = []
    for _ in range(epochs):
        t = time.perf_counter()
        for _ in range(per_epoch):
            next(it)
        rates.append(per_epoch * batch / (time.perf_counter() - t))
    del it
    return rates


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="", help="a MeMa folder to read (default: render MeMa-Synth)")
    ap.add_argument("--images", type=int, default=512, help="MeMa-Synth images to render (without --root)")
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--workers", default="0,2,4", help="grain worker processes (0: in the main process)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--data-dir", default="", help="where to put the ArrayRecord builds (default: temp)")
    ap.add_argument("--out", default="benchmarks/results/loader.md")
    a = ap.parse_args(argv)
    if not flags.FLAGS.is_parsed():  # grain's worker processes read its absl flags
        flags.FLAGS.mark_as_parsed()
    sizes = [int(s) for s in a.sizes.split(",")]
    workers = [int(w) for w in a.workers.split(",")]
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        folders = {}
        given = layout.read_dataset(a.root) if a.root else None
        for size in sizes:
            if given is not None:
                folders[size] = given  # one folder (and one build) for every size
            else:
                spec = synth.SynthSpec(num_images=a.images, images_per_identity=4, resolution=size, seed=0,
                                       split_weights=(1, 0, 0))
                t = time.perf_counter()
                folders[size] = synth.generate(tmp / f"synth_{size}", spec, workers=min(os.cpu_count() or 1, 8))
                print(f"rendered {a.images} images at {size} px in {time.perf_counter() - t:.1f}s", flush=True)
        builds = {}
        for size, folder in folders.items():
            key = id(folder)
            if key not in builds:
                data_dir = Path(a.data_dir or tmp) / f"arrayrecord_{size}"
                t = time.perf_counter()
                builds[key] = tfds_mema.build(folder, data_dir, overwrite=True)
                took = time.perf_counter() - t
                print(f"built {len(folder)} images into {builds[key].builder_dir} in {took:.1f}s "
                      f"({len(folder) / took:.0f} images/s)", flush=True)
        for size in sizes:
            folder = folders[size]
            for source, dataset in (("PNG folder", folder), ("ArrayRecord", builds[id(folder)])):
                for w in workers:
                    rates = rate(dataset, size=size, workers=w, batch=a.batch, epochs=a.epochs)
                    rows.append((size, source, w, statistics.median(rates), min(rates), max(rates)))
                    print(f"{size} px, {source}, {w} workers: {statistics.median(rates):.0f} images/s", flush=True)
    load_after = os.getloadavg()
    n = len(next(iter(folders.values())).split("train"))
    what = f"`{a.root}`" if a.root else f"MeMa-Synth ({a.images} images rendered at each size)"
    lines = [
        f"Loader throughput: `pipeline.make_loader` over the train split of {what}, {n} images, batch "
        f"{a.batch}, masks + flip/jitter augmentation + float conversion; median (min-max) of {a.epochs} "
        f"epochs after one warm-up epoch.",
        "",
        f"Machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after "
        f"(the load before the run says whether other jobs shared the cores; the grain workers raise it during the run).  "
        f"Command: `python benchmarks/bench_loader.py --sizes {a.sizes} --workers {a.workers} --epochs {a.epochs}"
        f" --batch {a.batch}{' --root ' + a.root if a.root else f' --images {a.images}'}`",
        "",
        "| size (px) | source | grain workers | images/s | min-max |",
        "|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {s} | {src} | {w} | {med:.0f} | {lo:.0f}-{hi:.0f} |" for s, src, w, med, lo, hi in rows]
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}")
    return table


if __name__ == "__main__":
    main()
