"""The console line's steps/s counts only the lines it prints: scalars other writers log in between
(clu's ReportProgress logs when a step is dispatched, long before it finishes) do not move it."""
from mema_jax.core import metrics


def test_steps_per_second_ignores_scalars_the_console_does_not_show(capsys, monkeypatch):
    clock = iter([0.0, 100.0])  # perf_counter at the two printed lines: 50 steps in 100 s
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    writer = metrics.ConsoleWriter(total_steps=300, keys=("loss",))
    writer.write_scalars(50, {"train/loss": 1.0})
    writer.write_scalars(99, {"steps_per_sec": 9.0, "uptime": 99.0})  # not shown: no clock read, no rate change
    writer.write_scalars(100, {"train/loss": 0.5})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == "step 50/300 | train/loss 1"
    assert lines[1] == "step 100/300 | train/loss 0.5 | 0.50 steps/s ETA 6m40s"


def test_without_tensorboard_a_run_writes_csv_and_console_and_never_imports_tensorflow(tmp_path):
    """config.tensorboard=False (the tests' :tiny runs): metrics.csv and the console line, no event
    files, and neither clu's writers nor TensorFlow loaded (6-7 s of CPU at every start)."""
    import subprocess
    import sys

    from conftest import REPO

    script = (
        "import sys\n"
        "from mema_jax.core import loop, metrics\n"
        f"w = metrics.make_writer({str(tmp_path)!r}, 10, tensorboard=False)\n"
        "assert metrics.make_periodic_actions('.', 10, w, tensorboard=False) == []\n"
        "w.write_hparams({'lr': 0.1}); w.write_scalars(10, {'train/loss': 0.25}); w.flush(); w.close()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'clu')))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["hparams: lr=0.1", "step 10/10 | train/loss 0.25", "[]"]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("10,train/loss,0.25,")
    assert not (tmp_path / "tensorboard").exists()
