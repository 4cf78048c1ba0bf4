"""The stage runner of the offline pipelines (launch/stages.py): each stage runs unless its output
exists, in order, stopping at the first failure; ``--only`` keeps some stages and refuses an unknown
name; both pipelines (launch.pipeline and launch.mema_pipeline) are lists of such stages."""
import sys

import pytest

from launch import mema_pipeline, pipeline, stages
from launch.stages import Stage


def writes(path, status=0):
    """A stage command that creates ``path`` and exits with ``status``."""
    return (sys.executable, "-c", f"import pathlib, sys; pathlib.Path({str(path)!r}).write_text('x'); sys.exit({status})")


def test_runs_missing_stages_in_order_skips_cached_ones_and_stops_at_the_first_failure(tmp_path, capsys):
    cached = tmp_path / "cached"
    cached.write_text("made before")
    plan = [Stage("first", writes(tmp_path / "first"), tmp_path / "first"),
            Stage("cached", (sys.executable, "-c", "raise SystemExit(1)"), cached),  # would fail if it ran
            Stage("some-inputs-failed", writes(tmp_path / "partial", status=3), tmp_path / "partial"),
            Stage("broken", (sys.executable, "-c", "raise SystemExit(1)"), tmp_path / "broken"),
            Stage("after", writes(tmp_path / "after"), tmp_path / "after")]
    assert stages.run(plan, {}) is False
    out = capsys.readouterr()
    assert (tmp_path / "first").exists() and (tmp_path / "partial").exists()
    assert not (tmp_path / "after").exists()          # nothing runs after a failed stage
    assert cached.read_text() == "made before" and f"[cached] cached: {cached}" in out.out
    assert "stage broken failed (exit 1)" in out.err
    assert "[first] " + sys.executable in out.out     # each command is printed before it runs


def test_a_stage_that_exits_0_without_its_output_failed(tmp_path):
    assert stages.run([Stage("silent", (sys.executable, "-c", "pass"), tmp_path / "never")], {}) is False


def test_only_keeps_the_named_stages_in_plan_order_and_refuses_unknown_names(tmp_path):
    plan = [Stage(n, ("true",), tmp_path / n) for n in ("a", "b", "b", "c")]
    assert [s.name for s in stages.select(plan, "c,b")] == ["b", "b", "c"]
    assert stages.select(plan, "") == plan
    with pytest.raises(ValueError, match=r"unknown stages \['x'\]; choose from a, b, c"):
        stages.select(plan, "a,x")


@pytest.mark.parametrize("module", [pipeline, mema_pipeline], ids=["launch.pipeline", "launch.mema_pipeline"])
def test_both_pipelines_are_stage_lists_cached_and_filtered_by_the_runner(module, tmp_path, capsys):
    runs = tmp_path / "runs"
    plan = module.plan("tiny", runs) if module is pipeline else module.plan(runs, "tiny")
    assert stages.names(plan) == list(module.STAGES)
    assert all(isinstance(s, Stage) and s.command[:2] == (sys.executable, "-m") for s in plan)
    grids = [s for s in plan if s.name == "grid"]  # launch.pipeline: the shipped model's and this run's
    for grid in grids:
        grid.done.parent.mkdir(parents=True, exist_ok=True)
        grid.done.write_bytes(b"a grid made before")
    assert module.main(["--preset=tiny", f"--runs={runs}", "--only=grid"]) == 0
    out = capsys.readouterr().out
    assert all(f"[grid] cached: {grid.done}" in out for grid in grids) and grids
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--preset=tiny", f"--runs={runs}", "--only=grid,nope"])
    assert exit_info.value.code == 2
    assert f"unknown stages ['nope']; choose from {', '.join(module.STAGES)}" in capsys.readouterr().err
