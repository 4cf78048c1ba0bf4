"""A run whose latest checkpoint is unreadable falls back to the previous one; none readable is one error."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from training_runs import run_env

TOTAL_STEPS = 12


def launch(workdir, data_root):
    cmd = [sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny", f"--workdir={workdir}",
           f"--config.data.root={data_root}", f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every=4"]
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synth_dataset_32):
    """One finished run (checkpoints at steps 4, 8, 12); each test breaks its own copy."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    first = launch(workdir, synth_dataset_32.root)
    assert first.returncode == 0, first.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]
    return workdir


def copy_of(finished_run, tmp_path):
    """The finished run copied to where it was made in this test (runs record no absolute paths
    that resuming needs)."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    return workdir


def params_at(checkpoints, step):
    mngr = ocp.CheckpointManager(checkpoints, item_names=("state", "data"))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return jax.tree.leaves(restored["state"]["params"])


def truncate_files(folder, keep_fraction):
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    assert files
    for path in files:
        os.truncate(path, int(os.path.getsize(path) * keep_fraction))


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one_and_is_kept(tmp_path, synth_dataset_32,
                                                                                 finished_run):
    workdir = copy_of(finished_run, tmp_path)
    checkpoints = workdir / "checkpoints"
    want = params_at(checkpoints, TOTAL_STEPS)

    truncate_files(checkpoints / "12", 0.5)
    second = launch(workdir, synth_dataset_32.root)
    assert second.returncode == 0, second.stderr
    assert f"checkpoint step 12 in {checkpoints} is unreadable (" in second.stderr
    assert "trying the previous one" in second.stderr
    assert f"kept unreadable checkpoint step 12 as {checkpoints / '12.unreadable'}; resuming from step 8" in second.stderr
    assert "resumed from step 8 in" in second.stdout and "done: 12 steps" in second.stdout
    assert "Traceback" not in second.stderr
    assert sorted(os.listdir(checkpoints)) == ["12", "12.unreadable", "4", "8"]
    # Steps 9-12 trained again from step 8's state and data position: the same parameters.
    for a, b in zip(params_at(checkpoints, TOTAL_STEPS), want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_readable_checkpoint_is_one_error_naming_the_directory_and_renames_nothing(tmp_path, synth_dataset_32,
                                                                                      finished_run):
    workdir = copy_of(finished_run, tmp_path)
    checkpoints = workdir / "checkpoints"
    for step in ("4", "8", "12"):
        truncate_files(checkpoints / step, 0.0)
    result = launch(workdir, synth_dataset_32.root)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("launch.main:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"launch.main: {checkpoints}: no readable checkpoint (step 12: ")
    assert "step 8: " in errors[0] and "step 4: " in errors[0]
    assert sorted(os.listdir(checkpoints)) == ["12", "4", "8"]
