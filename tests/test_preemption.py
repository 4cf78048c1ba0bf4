"""Preemption: SIGTERM mid-run checkpoints the step the run is at and exits with status 75; the same
command resumes from that step and finishes; started again, a finished run exits at once."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO

STEPS = 400


def command(workdir, data_root):
    return [sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny", f"--workdir={workdir}",
            f"--config.data.root={data_root}", f"--config.total_steps={STEPS}", "--config.checkpoint_every=1000",
            "--config.log_every=1", "--config.eval_every=0"]


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.pop("XLA_FLAGS", None)
    return e


def test_sigterm_checkpoints_the_current_step_and_the_rerun_resumes_there(tmp_path, synth_dataset_32):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(command(workdir, synth_dataset_32.root), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    for line in proc.stdout:  # the console line of every step once training runs
        if line.startswith("step 5/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert "preempted by SIGTERM: checkpointed step" in err and "Traceback" not in err
    step = int(err.split("checkpointed step ")[1].split(";")[0])
    assert 5 <= step < STEPS
    assert (workdir / "checkpoints" / str(step)).is_dir()  # not a multiple of checkpoint_every: saved on the signal
    assert not (workdir / "final_metrics.json").exists()

    resumed = subprocess.run(command(workdir, synth_dataset_32.root), cwd=REPO, env=env(), capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {step} in" in resumed.stdout
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["step"] == STEPS and "train/loss" in final["metrics"]

    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    again = subprocess.run(command(workdir, synth_dataset_32.root), cwd=REPO, env=env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and f"resumed from step {STEPS}" in again.stdout
    assert "step 1/" not in again.stdout and sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    assert json.loads((workdir / "final_metrics.json").read_text()) == final
