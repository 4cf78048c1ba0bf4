"""The whole pipeline (``python -m launch.pipeline``, the quickstart) at its tiny preset: every stage
runs, the tables and the grid are written, and a second run does no training and rewrites nothing.
Its three training stages are the suite's shared trained models, made once per test run by these
stages' own commands (conftest.py): linked in here, they are cached, and every other stage runs.
The evaluation-only ArcFace stage is linked to the shared ArcFace too (the same command with another
seed; training it again would only add time): the test checks the report's wiring, not its numbers.
The shipped MedSem-DeID (pretrained/) goes through the same CLI stages and the same report."""
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
    (runs / "eval_identity").symlink_to(tiny_identity_backbone.parent, target_is_directory=True)
    first = pipeline(runs, synth_dataset_32.root)
    cached = [line.split("]")[0].lstrip("[") for line in first.splitlines() if "] cached: " in line]
    assert cached == ["unet", "identity", "eval_identity", "deid"] == [*QUICKSTART_TRAINED_STAGES[:2], "eval_identity",
                                                                     QUICKSTART_TRAINED_STAGES[2]], first
    tables = (runs / "report" / "tables.md").read_text()
    assert "medsem_deid" in tables
    for title in ("ID-Dis", "Tab. 8"):
        assert title in tables, title
    # Both identity models score every face (recorded faces) and are verified on the validation people's pairs.
    tab5 = tables.split("## Tab. 5")[1].split("## Tab. 6")[0]
    assert "| Method | Rev | arcface_r18 | dlib |" in tab5 and "without a face" not in tab5
    verification = (runs / "report" / "verification.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in verification[1:]] == ["arcface_r18", "dlib"]
    # The shipped 64 px model (pretrained/) runs through the same CLI on the 32 px faces (resized) and is scored too.
    assert "| medsem_deid_pretrained | yes |" in tab5, tab5
    for name in ("grid.png", "grid_this_run.png"):
        with Image.open(runs / name) as grid:
            assert grid.width >= 4 * 32
    assert f"grid (the shipped model): {runs / 'grid.png'}" in first
    assert f"grid (this run's model): {runs / 'grid_this_run.png'}" in first
    val = [line for line in (synth_dataset_32.root / "labels.csv").read_text().splitlines()[1:] if ",val," in line]
    for method in ("method", "pretrained_method"):
        for folder in ("deid", "recovered", "wrong"):
            assert len(list((runs / method / folder).rglob("*.png"))) == len(val), (method, folder)
    for p in runs.rglob("*"):  # every file written, checkpoints and TensorBoard events included
        assert not p.is_file() or b"a passphrase for the pipeline test" not in p.read_bytes(), p
    before = digests(runs)
    second = pipeline(runs, synth_dataset_32.root)
    assert second.count("cached:") == 15 and "launch.main" not in second, second
    assert digests(runs) == before
