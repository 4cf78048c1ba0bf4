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
