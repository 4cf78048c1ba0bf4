"""The offline MeMa generation run (``python -m launch.mema_pipeline``) at its tiny preset: every
stage runs as a user would run it, Tab. 1, Tab. 2 and the generated images' scores are written, the
filtered folder is a MeMa folder of the injected samples that passed, and a second run is all cached.  Its two training
stages that the quickstart shares (the tiny pixel-space UNet, configs/mema_lora.py:tiny in full, and
the tiny ArcFace, configs/identity.py:tiny) are the suite's shared trained models (conftest.py),
linked in as cached stages: trained on the quickstart's MeMa-Synth rather than the clinic mix, they
serve the IP-Adapter and the leakage filter alike; every other stage runs."""
import csv
import os
import subprocess
import sys

import pytest
from conftest import REPO, child_xla_flags

from mema_jax.data import layout

pytestmark = pytest.mark.slow


def mema_pipeline(runs, data_dir):
    env = dict(os.environ, XLA_FLAGS=child_xla_flags(fast_compile=True))  # tiny stages: mostly compilation
    result = subprocess.run([sys.executable, "-m", "launch.mema_pipeline", "--preset=tiny", f"--runs={runs}",
                             f"--data-dir={data_dir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def test_every_stage_runs_writes_tab1_tab2_and_the_filtered_folder(tmp_path, tiny_diffusion_model,
                                                                   tiny_identity_backbone):
    runs, data = tmp_path / "runs", tmp_path / "data"
    runs.mkdir()
    for stage, trained in (("unet", tiny_diffusion_model.parent), ("identity", tiny_identity_backbone.parent)):
        (runs / stage).symlink_to(trained, target_is_directory=True)
    first = mema_pipeline(runs, data)
    cached = [line.split("]")[0].lstrip("[") for line in first.splitlines() if "] cached: " in line]
    assert cached == ["unet", "identity"], first
    assert len(list((runs / "embeddings").glob("*.npz"))) == 2  # Tab. 1's features, reused by the filter
    tab1 = (runs / "tab1" / "tab1_leakage.csv").read_text().splitlines()
    assert tab1[0] == "Row,dlib,arcface_r18,Average"
    assert [line.split(",")[0] for line in tab1[1:]] == ["Direct sample", "Face injection",
                                                         "Face injection (IP scale 0.7)", "Face injection (IP scale 1.0)"]
    with open(runs / "tab2" / "tab2_wasserstein.csv", newline="") as f:
        tab2 = {row["Rows"]: row for row in csv.DictReader(f)}
    assert set(tab2) == {"Random sampling", "Real-guided sampling"}
    assert all(0 <= float(v) <= 1 for row in tab2.values() for k, v in row.items() if k != "Rows")
    injected = layout.read_dataset(runs / "injected")
    assert len(injected) == 8 and all(r.age is not None for r in injected.records)
    direct = layout.read_dataset(runs / "direct")
    assert all(r.age is None and r.severity == "" for r in direct.records)
    with open(runs / "mema" / "leakage.csv", newline="") as f:
        decisions = {row["image_id"]: row for row in csv.DictReader(f)}
    assert set(decisions) == {r.image_id for r in injected.records}
    kept = sorted((runs / "mema" / "images").glob("*.png"))
    for path in kept:
        assert path.read_bytes() == (runs / "injected" / "images" / path.name).read_bytes()
    with open(runs / "quality" / "generation_disease.csv", newline="") as f:
        quality = {row["Set"]: row for row in csv.DictReader(f)}
    assert list(quality)[2:4] == ["Direct sample", "Face injection"] and list(quality)[0] == "Real val (yardstick)"
    assert all(0 <= float(row["Mean over diseases"]) <= 1 for row in quality.values())
    assert (runs / "grid.png").is_file() and "Tab. 1:" in first
    second = mema_pipeline(runs, data)
    assert second.count("cached:") == 19 and "done in" not in second.replace("finished in", "")
