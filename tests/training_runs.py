"""Plain helpers for tests that run training commands: the environment of a user's run (one CPU
device, or ``devices`` emulated ones), a run killed with SIGKILL at a given step, and what a
finished run left (its checkpointed state, its metrics table)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import orbax.checkpoint as ocp
from conftest import child_xla_flags

REPO = Path(__file__).resolve().parents[1]


def run_env(devices: int = 1, fast_compile: bool = False) -> dict:
    """The test process's environment for a child run: unbuffered output, one CPU device (a user's
    laptop run; the tests themselves see eight), or ``devices`` emulated ones; the suite's compile
    flags where ``fast_compile`` (conftest.child_xla_flags)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=child_xla_flags(devices, fast_compile))


def kill_at_step(command, step: int, env: dict | None = None) -> list[str]:
    """Starts ``command`` in the repo, SIGKILLs it when its console line for ``step`` appears
    ("step N/..."), and returns the lines it printed; fails if it did not die of that signal."""
    proc = subprocess.Popen(command, cwd=REPO, env=env or run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    return seen


def restored_state(workdir, step: int | None = None) -> dict:
    """The state saved at ``step`` (default: the latest) of ``workdir/checkpoints``, as saved."""
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    step = mngr.latest_step() if step is None else step
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return restored["state"]


def metric(workdir, name: str) -> dict[int, float]:
    """{step: value} of one scalar of ``workdir/metrics.csv``."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.csv")).read().splitlines()[1:]:
        step, key, value, _ = line.split(",")
        if key == name:
            out[int(step)] = float(value)
    return out
