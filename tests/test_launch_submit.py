"""launch.main submits through submitit: the same code path a SLURM submission takes, run locally."""
import json
import subprocess
import sys

from conftest import REPO


def test_submitit_local_job_trains_and_writes_checkpoints(tmp_path, synth_dataset_32):
    workdir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny", f"--workdir={workdir}",
         f"--config.data.root={synth_dataset_32.root}", "--config.total_steps=4", "--config.tensorboard=True", "--submit=local", "--wait"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["cluster"] == "local" and "result" in lines[1]
    assert (workdir / "checkpoints" / "4").is_dir()
    assert (workdir / "submitit").is_dir() and any((workdir / "submitit").glob("*_result.pkl"))
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
