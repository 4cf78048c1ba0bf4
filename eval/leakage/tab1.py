"""Tab. 1: the leakage percentage of named generated sets, per identity model and averaged."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


from mema_jax.data import layout
from mema_jax.fileio import atomic_write_bytes
from eval.leakage.decision import leakage, load_and_resolve, prepare_inputs
from eval.leakage.embedding import EmbeddingCache, LeakageFilterError, embed_set, read_set
from eval.leakage.folders import check_out, publish

TAB1_KEY = "tab1_leakage"
# ------------------------------------------------------------------------------------------ Tab. 1

def parse_row_spec(spec: str) -> tuple[str, str]:
    """``"NAME=DIR"`` -> (name, dir)."""
    name, sep, folder = spec.partition("=")
    if not sep or not name.strip() or not folder:
        raise LeakageFilterError(f"--row {spec}: expected \"NAME=GENERATED_MEMA_DIR\", e.g. \"Direct sample=gen/\"")
    return name.strip(), folder


def tab1_table(rows: Sequence[tuple[str, object]], real, models, *, real_split: str = "", thresholds=None,
               pairs=None, pairs_max_side: int | None = None, faces: str = "detect", detector: str = "auto",
               embedding_cache=None):
    """Tab. 1 as an ``eval.report.table.Table``: one row per (name, generated MeMa folder), the
    leakage % per model and their mean; returns (table, {name: Leakage}).  ``embedding_cache``: as
    in ``filter_folder``."""
    from eval.report.scoring import nanmean
    from eval.report.tab1_leakage import TITLE
    from eval.report.table import Table, percent_value, text

    if not rows:
        raise LeakageFilterError("no --row NAME=GENERATED_MEMA_DIR given")
    names = [name for name, _ in rows]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LeakageFilterError(f"--row {', '.join(repeated)} given more than once")
    model_names, given, real_set, mean = prepare_inputs(models, real, real_split, thresholds, pairs, faces)
    sets = [(name, read_set(folder, f"generated ({name})")) for name, folder in rows]
    cache = None if embedding_cache is None else EmbeddingCache(embedding_cache)
    loaded, resolved, gallery = load_and_resolve(models, detector, given, pairs, pairs_max_side, real_set, faces,
                                                 cache)
    table = Table(TAB1_KEY, TITLE, ["Row"], [text])
    table.add_columns([*model_names, "Average"], percent_value)
    results = {}
    faceless_notes = []
    for name, images in sets:
        result = leakage(embed_set(loaded, images, mean if mean is not None else "detect", cache), images, gallery,
                         resolved)
        results[name] = result
        values = [result.percent(m) for m in model_names]
        table.rows.append([name, *values, nanmean(values)[0]])
        for m in model_names:
            match = result.matches[m]
            faceless_notes.append(f"{name}, {m}: {match.n_skipped} of {len(images)} generated images without a face")
    split = f", split {real_split}" if real_split else ""
    table.notes += [
        "Leakage % = generated images whose nearest real image lies within the model's decision threshold "
        "(distance of L2-normalised features), over the generated images in which that model finds a face; "
        "faceless images are left out of that model's percentage. Average = mean over the models.",
        "Thresholds: " + "; ".join(t.how for t in resolved.values()) + ".",
        f"Gallery: {real_set.root}{split}, {len(real_set)} images of {real_set.n_people} people "
        f"(an image without an identity counts as its own); without a face: "
        + ", ".join(f"{m} {gallery.n_faceless(m)}" for m in model_names) + ".",
        "Rows: " + "; ".join(f"{name} = {images.root} ({len(images)} images)" for name, images in sets) + ".",
        ("Faces: each model's own detector." if faces == "detect" else
         f"Faces: generated images at the mean face of {real_set.root / layout.FACES_FILE} "
         f"({mean.n_faces} faces), real images at their own recorded faces."),
        "Faceless images (left out of that model's percentage): " + "; ".join(faceless_notes) + ".",
    ]
    return table, results


def write_tab1(table, out, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Writes ``out``/tab1_leakage.md and .csv (``out`` new or empty, or ``overwrite``), atomically."""
    out = Path(out)
    check_out(out, overwrite, [])

    def fill(tmp: Path) -> None:
        atomic_write_bytes(tmp / f"{table.key}.md", table.markdown().encode())
        atomic_write_bytes(tmp / f"{table.key}.csv", table.csv_text().encode())

    publish(out, overwrite, fill)
    return out / f"{table.key}.md", out / f"{table.key}.csv"


def tab1(rows, real, out, models, *, overwrite: bool = False, **options):
    """:func:`tab1_table` then :func:`write_tab1`; the output folder and row folders are checked first."""
    rows = [parse_row_spec(r) if isinstance(r, str) else r for r in rows]
    inputs = [Path(real), *(Path(folder) for _, folder in rows)]
    check_out(Path(out), overwrite, inputs)
    table, results = tab1_table(rows, real, models, **options)
    write_tab1(table, out, overwrite=overwrite)
    return table, results


