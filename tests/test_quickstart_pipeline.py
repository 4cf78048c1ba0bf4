"""The whole pipeline (``python -m launch.pipeline``, the quickstart) at its tiny preset: every stage
runs, the tables and the grid are written, and a second run does no training and rewrites nothing.
Its three training stages are the suite's shared trained models, made once per test run by these
stages' own commands (conftest.py): linked in here, they are cached, and every other stage runs."""
import hashlib
import os
import subprocess
import sys

import pytest
from conftest import QUICKSTART_TRAINED_STAGES, REPO
from PIL import Image

pytestmark = pytest.mark.slow


def digests(folder):
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pipeline(runs, data):
    env = dict(os.environ, MEMA_PASSPHRASE="a passphrase for the pipeline test")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-m", "launch.pipeline", "--preset=tiny", f"--runs={runs}",
                             f"--data={data}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def test_every_stage_runs_and_a_second_run_is_all_cached(synth_dataset_32, tiny_diffusion_model, tiny_identity_backbone,
                                                        tiny_deid_run, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for stage in (tiny_diffusion_model.parent, tiny_identity_backbone.parent, tiny_deid_run):
        (runs / stage.name).symlink_to(stage, target_is_directory=True)
    first = pipeline(runs, synth_dataset_32.root)
    cached = [line.split("]")[0].lstrip("[") for line in first.splitlines() if "] cached: " in line]
    assert cached == list(QUICKSTART_TRAINED_STAGES), first
    tables = (runs / "report" / "tables.md").read_text()
    assert "medsem_deid" in tables
    for title in ("ID-Dis", "Tab. 8"):
        assert title in tables, title
    with Image.open(runs / "grid.png") as grid:
        assert grid.width >= 4 * 32
    assert f"grid: {runs / 'grid.png'}" in first
    val = [line for line in (synth_dataset_32.root / "labels.csv").read_text().splitlines()[1:] if ",val," in line]
    assert len(list((runs / "method" / "deid").rglob("*.png"))) == len(val)
    assert len(list((runs / "method" / "recovered").rglob("*.png"))) == len(val)
    for p in runs.rglob("*"):  # every file written, checkpoints and TensorBoard events included
        assert not p.is_file() or b"a passphrase for the pipeline test" not in p.read_bytes(), p
    before = digests(runs)
    second = pipeline(runs, synth_dataset_32.root)
    assert second.count("cached:") == 10 and "launch.main" not in second, second
    assert digests(runs) == before
