"""The MedSem-DeID trainer (configs/medsem_deid.py:tiny) through launch.main, as a user runs it.

The tiny medical encoder and ArcFace are trained here first (conftest fixtures), as the
quickstart trains the real ones.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, TINY_DEID_STEPS, made_once
from parity import rel_err
from training_runs import kill_at_step, metric, restored_state, run_env


@pytest.fixture(scope="module")
def deid_args(tiny_diffusion_model, tiny_identity_backbone, synth_dataset_32):
    return (f"--config.data.root={synth_dataset_32.root}", f"--config.medical_encoder.source={tiny_diffusion_model}",
            f"--config.identity.weights={tiny_identity_backbone}")


def launch_command(workdir, *args):
    return [sys.executable, "-m", "launch.main", "--config=configs/medsem_deid.py:tiny", f"--workdir={workdir}", *args]


def launch(workdir, *args, devices=1):
    """Every run here is a few steps, mostly compilation: compiled fast (conftest.child_xla_flags)."""
    result = subprocess.run(launch_command(workdir, *args), cwd=REPO, env=run_env(devices, fast_compile=True),
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def final_params(workdir, step):
    return restored_state(workdir, step)["params"]


def test_right_password_recovery_improves_with_training_and_wrong_passwords_do_not_recover(tiny_deid_run):
    rec, wrong = metric(tiny_deid_run, "eval/psnr_rec"), metric(tiny_deid_run, "eval/psnr_wrong")
    rec_id, wrong_id = metric(tiny_deid_run, "eval/id_cos_rec"), metric(tiny_deid_run, "eval/id_cos_wrong")
    end = TINY_DEID_STEPS
    # dB; measured (40 steps): recovered 9.6 -> 15.3, wrong password 8.5; ArcFace cosine 0.71 vs -0.19
    assert rec[end] > rec[0] + 3.0, rec  # the right password learns to recover ...
    assert rec[end] > wrong[end] + 3.0, (rec, wrong)  # ... a wrong one does not
    assert rec_id[end] > wrong_id[end] + 0.1, (rec_id, wrong_id)  # ArcFace cosine to X
    model = tiny_deid_run / "model"
    assert sorted(os.listdir(model)) == ["deid_config.json", "generator.safetensors", "medical_encoder"]


STRAIGHT_STEPS = 12
# Checkpoints at every second step, all kept: the 8-device run compares with step 2, the killed run with step 12.
STRAIGHT = (f"--config.total_steps={STRAIGHT_STEPS}", "--config.eval_every=0", "--config.checkpoint_every=2",
            "--config.keep_checkpoints=6", "--config.log_every=1")


@pytest.fixture(scope="module")
def straight_run(deid_args, tmp_path_factory):
    """One uninterrupted one-device run, made once for both xdist workers: the reference of the
    sharded and the killed runs."""
    return made_once(tmp_path_factory, "deid_trainer/straight", lambda workdir: launch(workdir, *deid_args, *STRAIGHT))


def test_sharded_step_on_8_devices_equals_one_device(deid_args, straight_run, tmp_path):
    args = (*deid_args, "--config.total_steps=2", "--config.eval_every=0", "--config.checkpoint_every=2",
            "--config.log_every=1")
    launch(tmp_path / "eight", *args, "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8)
    one_g, eight_g = metric(straight_run, "train/generator/loss"), metric(tmp_path / "eight", "train/generator/loss")
    one_d, eight_d = (metric(straight_run, "train/discriminator/loss"),
                      metric(tmp_path / "eight", "train/discriminator/loss"))
    one_g, one_d = {k: v for k, v in one_g.items() if k <= 2}, {k: v for k, v in one_d.items() if k <= 2}
    assert sorted(one_g) == sorted(eight_g) == sorted(one_d) == sorted(eight_d) == [1, 2]
    # Step 1's generator loss is the same parameters on the same batch: only the order of the fp32
    # reductions differs (measured: equal to every printed digit).
    assert abs(eight_g[1] - one_g[1]) <= 1e-6 * abs(one_g[1]), (one_g, eight_g)
    # After an update the runs part by more than fp32 noise, for a reason of Adam's, not of sharding:
    # its first steps are lr * g / |g|, so a gradient of ~0 (a bias in front of a GroupNorm, whose
    # gradient is reduction-order noise) takes a full step of either sign.  Measured: 1e-5 and 2e-4
    # relative on the losses after it, 1e-3 over the whole parameter tree.
    for one, eight in ((one_d, eight_d), (one_g, eight_g)):
        for step in one:
            assert abs(eight[step] - one[step]) <= 2e-3 * abs(one[step]), (one, eight)
    one, eight = final_params(straight_run, 2), final_params(tmp_path / "eight", 2)
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(one)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(eight)])
    assert rel_err(b, a) <= 1e-2, rel_err(b, a)


def test_killed_run_resumes_bit_for_bit(deid_args, straight_run, tmp_path):
    args = (*deid_args, *STRAIGHT)
    kill_at_step(launch_command(tmp_path / "killed", *args), 7, env=run_env(fast_compile=True))
    restart = launch(tmp_path / "killed", *args)
    assert "resumed from step" in restart.stdout
    for a, b in zip(jax.tree.leaves(final_params(tmp_path / "killed", STRAIGHT_STEPS)),
                    jax.tree.leaves(final_params(straight_run, STRAIGHT_STEPS)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
