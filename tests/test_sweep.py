"""Sweeps (launch.sweep): runs from a Python sweep file, one workdir per run named by its overrides,
finished runs never started again, the submitit job-array path, and the collected table and plot."""
import csv
import json
import subprocess
import sys

import pytest
from conftest import REPO

from configs.sweeps import chain, product, zipped
from launch.sweep import apply_overrides, load_config, parse_config_flags, run_name


def test_product_zip_and_chain_build_the_runs_a_sweep_file_describes():
    assert product({"a": [1, 2], "b": ["x", "y"]}, fixed={"c": 0}) == [
        {"a": 1, "b": "x", "c": 0}, {"a": 1, "b": "y", "c": 0}, {"a": 2, "b": "x", "c": 0}, {"a": 2, "b": "y", "c": 0}]
    assert zipped({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(ValueError, match="equal lengths"):
        zipped({"a": [1, 2], "b": [3]})
    fig8 = chain(product({"loss.lambda_med": [1.0, 5.0]}, fixed={"loss.lambda_rev": 0.1}),
                 product({"loss.lambda_rev": [0.1, 1.0]}, fixed={"loss.lambda_med": 5.0}))
    assert len(fig8) == 3  # the shared point (5, 0.1) once
    assert run_name({"loss.lambda_med": 2.5, "loss.lambda_rev": 0.1}) == "lambda_med=2.5,lambda_rev=0.1"


def test_overrides_are_checked_against_the_config():
    base = load_config("configs/quickstart.py:tiny")
    changed = apply_overrides(base, {"optim.lr": 1, "total_steps": 3}, "here")
    assert changed.optim.lr == 1.0 and isinstance(changed.optim.lr, float) and base.total_steps != 3
    with pytest.raises(KeyError, match="no key 'optim.lrr'"):
        apply_overrides(base, {"optim.lrr": 1.0}, "here")
    with pytest.raises(TypeError, match="total_steps is int"):
        apply_overrides(base, {"total_steps": "many"}, "here")
    assert parse_config_flags("configs/quickstart.py:tiny", ["--config.optim.lr=1", "--config.model.widths=(4,8)"]) == {
        "optim.lr": 1.0, "model.widths": (4, 8)}  # typed by the config's fields, as launch.main parses them
    with pytest.raises(KeyError, match="--config.optim.lrr: the config has no key"):
        parse_config_flags("configs/quickstart.py:tiny", ["--config.optim.lrr=1"])


def sweep(*args, timeout=1200):
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "launch.sweep", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    return result


def test_a_sweep_runs_here_skips_finished_runs_and_collects_a_table_and_plot(tmp_path, synth_dataset_32):
    workdir = tmp_path / "sweep"
    data = f"--config.data.root={synth_dataset_32.root}"
    first = sweep("run", "--sweep=configs/sweeps/tiny.py", f"--workdir={workdir}", data)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    for name in ("lr=0.001", "lr=0.003"):
        final = json.loads((workdir / name / "final_metrics.json").read_text())
        assert final["step"] == 8 and "train/loss" in final["metrics"]
        assert (workdir / name / "checkpoints" / "8").is_dir()
        assert json.loads((workdir / name / "config.json").read_text())["optim"]["lr"] == float(name[3:])
    again = sweep("run", "--sweep=configs/sweeps/tiny.py", f"--workdir={workdir}", data)
    assert again.returncode == 0 and "0 of 2 runs to start" in again.stdout and "launch.main" not in again.stdout
    collected = sweep("collect", f"--workdir={workdir}", "--metric=train/loss")
    assert collected.returncode == 0, collected.stderr
    with open(workdir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["lr=0.001", "lr=0.003"] and all(float(r["train/loss"]) > 0 for r in rows)
    assert (workdir / "results.md").read_text().count("| lr=") == 2
    assert (workdir / "plot_optim.lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_submitit_job_array_path_runs_every_task(tmp_path, synth_dataset_32):
    workdir = tmp_path / "array"
    result = sweep("run", "--sweep=configs/sweeps/tiny.py:4", f"--workdir={workdir}", "--submit=local", "--wait",
                   f"--config.data.root={synth_dataset_32.root}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    states = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{") and "state" in line]
    assert sorted(s["run"] for s in states) == ["lr=0.001", "lr=0.003"] and {s["state"] for s in states} == {"finished"}
    for name in ("lr=0.001", "lr=0.003"):
        assert json.loads((workdir / name / "final_metrics.json").read_text())["step"] == 4


def test_a_bad_sweep_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from configs.sweeps import product\n"
                   "def get_sweep(arg=None):\n    return {'config': 'configs/quickstart.py:tiny', 'runs': product({'optim.lrr': [1.0]})}\n")
    result = sweep("run", f"--sweep={bad}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 1 and "no key 'optim.lrr'" in result.stderr and "Traceback" not in result.stderr
    missing = sweep("collect", f"--workdir={tmp_path / 'nothing'}")
    assert missing.returncode == 1 and "sweep.json: missing" in missing.stderr
