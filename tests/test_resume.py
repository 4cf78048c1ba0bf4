"""A run killed with SIGKILL and restarted ends exactly where an uninterrupted run ends."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from conftest import REPO

TOTAL_STEPS = 40


def launch_cmd(workdir, data_root):
    return [
        sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny", f"--workdir={workdir}",
        f"--config.data.root={data_root}", f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every=4",
        "--config.log_every=2", "--config.grad_accum_steps=2", "--config.ema_decay=0.9",
    ]


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop run
    return e


def final_params(workdir):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    assert mngr.latest_step() == TOTAL_STEPS
    restored = mngr.restore(TOTAL_STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return restored["state"]


def test_killed_and_restarted_run_equals_uninterrupted_run_bit_for_bit(tmp_path, synth_dataset_32):
    data = str(synth_dataset_32.root)
    straight = tmp_path / "straight"
    subprocess.run(launch_cmd(straight, data), cwd=REPO, env=env(), check=True, capture_output=True, timeout=900)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(launch_cmd(killed, data), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {TOTAL_STEPS // 2}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert not any(line.startswith("done:") for line in seen)

    restart = subprocess.run(launch_cmd(killed, data), cwd=REPO, env=env(), check=True, capture_output=True,
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
