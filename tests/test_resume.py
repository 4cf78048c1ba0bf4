"""A run killed with SIGKILL and restarted ends exactly where an uninterrupted run ends."""
import subprocess
import sys

import jax
import numpy as np
from conftest import REPO
from training_runs import kill_at_step, restored_state, run_env

TOTAL_STEPS = 40


def launch_cmd(workdir, data_root):
    return [
        sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny", f"--workdir={workdir}",
        f"--config.data.root={data_root}", f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every=4",
        "--config.log_every=2", "--config.grad_accum_steps=2", "--config.ema_decay=0.9",
    ]


def final_params(workdir):
    return restored_state(workdir, TOTAL_STEPS)


def test_killed_and_restarted_run_equals_uninterrupted_run_bit_for_bit(tmp_path, synth_dataset_32):
    data = str(synth_dataset_32.root)
    straight = tmp_path / "straight"
    subprocess.run(launch_cmd(straight, data), cwd=REPO, env=run_env(), check=True, capture_output=True, timeout=900)

    killed = tmp_path / "killed"
    seen = kill_at_step(launch_cmd(killed, data), TOTAL_STEPS // 2)
    assert not any(line.startswith("done:") for line in seen)

    restart = subprocess.run(launch_cmd(killed, data), cwd=REPO, env=run_env(), check=True, capture_output=True,
                             text=True, timeout=900)
    resumed = [line for line in restart.stdout.splitlines() if line.startswith("resumed from step")]
    assert resumed, restart.stdout
    step = int(resumed[0].split()[3])
    assert 0 < step < TOTAL_STEPS

    a, b = final_params(straight), final_params(killed)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
