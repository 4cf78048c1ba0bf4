"""A real SLURM (Debian's slurm-wlm + munge, one node: this machine, started by
tests/slurm/local_slurm.sh): a sweep goes in through the command a user types and comes out as a
finished job array; a job requeued mid-run, and one sent SLURM's preemption warning, resume from
their checkpoints and finish.  Skipped, with the reason, only where SLURM cannot be installed."""
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, skip_unless_required

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]

STATE = Path(f"/tmp/mema-local-slurm-{os.getuid()}")


@pytest.fixture(scope="module")
def slurm_env():
    """The environment a user's shell has on a SLURM login node: SLURM_CONF, no emulated devices."""
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "lock", "w") as lock:  # one start per machine, whichever worker comes first
        fcntl.flock(lock, fcntl.LOCK_EX)
        conf = STATE / "slurm.conf"
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(SLURM_CONF=str(conf), PYTHONUNBUFFERED="1")
        up = conf.exists() and subprocess.run(["sinfo", "-h"], env=env, capture_output=True).returncode == 0
        if not up:
            started = subprocess.run(["bash", str(REPO / "tests" / "slurm" / "local_slurm.sh"), "start", str(STATE)],
                                     capture_output=True, text=True, timeout=600)
            if started.returncode == 3:
                skip_unless_required(started.stderr.strip())
            assert started.returncode == 0, started.stdout + started.stderr
    return env


def scontrol_job(job_id: str, env) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    fields = {}
    for line in out.splitlines():
        for item in line.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
    return fields


def wait_for(predicate, timeout_s: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    tail = "" if log is None or not log.exists() else log.read_text()[-3000:]
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")


def test_a_two_run_sweep_goes_through_slurm_as_a_job_array_and_both_runs_finish(tmp_path, slurm_env,
                                                                                  synth_dataset_32):
    workdir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "run", "--sweep=configs/sweeps/tiny.py", f"--workdir={workdir}",
         "--submit=slurm", "--slurm_partition=debug", "--slurm_gpus_per_node=0", "--slurm_cpus_per_task=1",
         "--slurm_hours=0.5", "--wait", f"--config.data.root={synth_dataset_32.root}"],
        cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    submitted = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"run"')]
    job_ids = sorted({s["job_id"] for s in submitted})
    array_id = job_ids[0].split("_")[0]
    assert len(job_ids) == 2 and all(j.startswith(array_id + "_") for j in job_ids)  # one array, two tasks
    for job_id in job_ids:  # the result is written just before the task exits
        wait_for(lambda: scontrol_job(job_id, slurm_env)["JobState"] == "COMPLETED", 120, f"{job_id} COMPLETED")
    for name in ("lr=0.001", "lr=0.003"):
        final = json.loads((workdir / name / "final_metrics.json").read_text())
        assert final["step"] == 8 and final["metrics"]["train/loss"] > 0
        assert (workdir / name / "checkpoints" / "8").is_dir()

    again = subprocess.run([sys.executable, "-m", "launch.sweep", "run", "--sweep=configs/sweeps/tiny.py",
                            f"--workdir={workdir}", "--submit=slurm", "--slurm_gpus_per_node=0",
                            f"--config.data.root={synth_dataset_32.root}"],
                           cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 of 2 runs to start" in again.stdout and '"job_id"' not in again.stdout


STEPS = 300


def submit_long_run(workdir: Path, data_root, env) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny", f"--workdir={workdir}",
         f"--config.data.root={data_root}", f"--config.total_steps={STEPS}", "--config.checkpoint_every=1000",
         "--config.log_every=1", "--config.eval_every=0", "--slurm_partition=debug", "--slurm_gpus_per_node=0",
         "--slurm_cpus_per_task=1", "--slurm_hours=0.5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["job_id"]


@pytest.mark.parametrize("how", ["scontrol requeue", "scancel --signal=USR2"])
def test_a_job_stopped_mid_run_is_requeued_and_resumes_from_its_checkpoint(tmp_path, slurm_env, synth_dataset_32,
                                                                           how):
    """``scontrol requeue``: SLURM sends SIGTERM (the loop checkpoints the step it is at and exits),
    then runs the job again.  USR2 is SLURM's warning before the time limit / a preemption:
    submitit's handler calls the job's checkpoint(), which saves and requeues it itself."""
    workdir = tmp_path / "run"
    job_id = submit_long_run(workdir, synth_dataset_32.root, slurm_env)
    log = workdir / "submitit" / f"{job_id}_0_log.out"
    wait_for(lambda: log.exists() and "step 5/" in log.read_text(), 600, "the job's first steps", log)
    subprocess.run(how.split() + [job_id], env=slurm_env, check=True, timeout=60)
    wait_for(lambda: int(scontrol_job(job_id, slurm_env).get("Restarts", "0")) >= 1, 300, "the requeue", log)
    wait_for(lambda: (workdir / "final_metrics.json").exists(), 900, "the requeued job to finish", log)
    wait_for(lambda: scontrol_job(job_id, slurm_env).get("JobState") == "COMPLETED", 120, "COMPLETED", log)

    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    # Besides the last step (and orbax's first save), one at the step the signal came: checkpoint_every is 1000.
    at_signal = [s for s in saved if 5 <= s < STEPS]
    assert saved[-1] == STEPS and len(at_signal) == 1, saved
    assert json.loads((workdir / "final_metrics.json").read_text())["step"] == STEPS
    output = log.read_text()  # the requeued attempt's console
    assert f"resumed from step {at_signal[0]} in" in output, output[-3000:]
