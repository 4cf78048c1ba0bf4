"""A preemption signal may land at any instruction of a run; every one ends in a complete checkpoint
of a live step, and resuming from it continues the run bit for bit.

In one process (no SLURM): the quickstart classifier (``configs/quickstart.py:tiny``) is run once
uninterrupted, then stopped again and again by SIGTERM, SIGUSR1 and submitit's USR2 (through
submitit's real signal handler and job environment, which checkpoint-and-requeue), each sent at a
random moment of a random step, and resumed after each stop.  The stopped-and-resumed run must log
the same loss at every step and end with the same weights, bit for bit.  A second test sends the
signal at the exact point of the old race: right after the donating ``train_step`` call returns,
before the loop holds its result."""
from __future__ import annotations

import csv
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, JobPaths
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE, LocalJobEnvironment

from configs.quickstart import get_config
from launch import main as launch_main
from mema_jax.core import checkpoint as ckpt_lib
from mema_jax.core import preemption
from mema_jax.core import train_state as ts

STEPS = 32


@pytest.fixture
def signal_handlers():
    """The test process's own handlers come back afterwards (pytest's worker must not keep ours)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    preemption.install()  # from the first moment a signal may be sent, never the default (kill) action
    yield
    preemption.reset()
    for s, h in saved.items():
        signal.signal(s, h)


def tiny_config(data_root):
    c = get_config("tiny")
    c.data.root = str(data_root)
    c.total_steps = STEPS
    c.checkpoint_every = 1000  # only the signals' saves and the last step
    c.log_every = 1
    c.eval_every = 0
    return c


def losses(workdir: Path) -> dict[int, str]:
    """Step -> the logged training loss, as written (the text is the exact float)."""
    with open(workdir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["name"] == "train/loss"]
    by_step = {}
    for r in rows:
        assert int(r["step"]) not in by_step, f"step {r['step']} logged twice"
        by_step[int(r["step"])] = r["value"]
    return by_step


def final_params(workdir: Path, step: int):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data")) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


def submitit_job(tmp_path, monkeypatch, config, workdir) -> tuple[JobPaths, DelayedSubmission]:
    """submitit's real USR2 handler in this process, as a local submitit job has it."""
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    paths = JobPaths(tmp_path / "submitit", job_id="4242")
    paths.folder.mkdir(parents=True, exist_ok=True)
    delayed = DelayedSubmission(launch_main.SubmittedRun(), config, str(workdir))
    delayed.set_timeout(30, 3)
    handler = SignalHandler(LocalJobEnvironment(), paths, delayed)
    signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    return paths, delayed


def run_stopped(config, workdir, how: str, tmp_path, monkeypatch) -> int | None:
    """Runs until done or stopped; the step checkpointed on a stop, None when the run finished."""
    if how != "SIGUSR2":
        try:
            launch_main.run(config, str(workdir))
            return None
        except preemption.Preempted as e:
            assert e.signal_name == how
            return e.step
    paths, delayed = submitit_job(tmp_path, monkeypatch, config, workdir)
    try:
        delayed.result()  # launch.main.SubmittedRun()(config, workdir)
        return None
    except SystemExit as e:  # submitit requeued the job and exited, as it does on a cluster
        assert e.code == LOCAL_REQUEUE_RETURN_CODE
        requeued = DelayedSubmission.load(paths.submitted_pickle)
        assert isinstance(requeued.function, launch_main.SubmittedRun) and requeued.args[1] == str(workdir)
        return ckpt_lib.Checkpointer(workdir / "checkpoints", save_every=1000).latest_step()


def logged_step(workdir: Path) -> int:
    try:
        with open(workdir / "metrics.csv") as f:
            return max((int(line.split(",")[0]) for line in f.read().splitlines()[1:] if line[:1].isdigit()),
                       default=0)
    except FileNotFoundError:
        return 0


def send_when_logged(workdir: Path, target: int, jitter_s: float, how: str) -> Callable[[], None]:
    """Sends ``how`` to this process ``jitter_s`` after the run logged step ``target`` (0: at once,
    during set-up); the returned function calls it off (if not sent yet) and waits for the sender."""
    cancelled = threading.Event()

    def send():
        while logged_step(workdir) < target and not cancelled.is_set():
            time.sleep(0.001)
        time.sleep(jitter_s)
        if not cancelled.is_set():
            os.kill(os.getpid(), getattr(signal, how))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()

    def call_off():
        cancelled.set()
        thread.join()

    return call_off


def assert_same_run(workdir: Path, reference: Path, what):
    assert losses(workdir) == losses(reference), what
    got, want = final_params(workdir, STEPS), final_params(reference, STEPS)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{jax.tree_util.keystr(path)}: {what}")


def test_random_signals_each_end_in_a_checkpoint_that_resumes_bit_exactly(tmp_path, synth_dataset_32,
                                                                          signal_handlers, monkeypatch):
    config = tiny_config(synth_dataset_32.root)
    reference = tmp_path / "reference"
    launch_main.run(config, str(reference))
    assert sorted(losses(reference)) == list(range(1, STEPS + 1))

    rng = random.Random(0)
    kinds = ("SIGTERM", "SIGUSR1", "SIGUSR2")
    stops: list[tuple[str, int]] = []
    for attempt in range(4):  # a signal that lands after the last step ends a run: start another
        workdir = tmp_path / f"stopped{attempt}"
        while len(stops) < 9 and logged_step(workdir) < STEPS - 4:
            how, start = kinds[len(stops) % 3], logged_step(workdir)
            call_off = send_when_logged(workdir, rng.randint(start, start + 2), rng.uniform(0.0, 0.03), how)
            stopped_at = run_stopped(config, workdir, how, tmp_path, monkeypatch)
            call_off()
            preemption.clear()  # a signal that came after the run's last check
            if stopped_at is None:
                break
            stops.append((how, stopped_at))
            assert start <= stopped_at < STEPS, stops
            assert (workdir / "checkpoints" / str(stopped_at)).is_dir()
            assert logged_step(workdir) == stopped_at  # the checkpoint is the last step the run logged
        else:
            assert run_stopped(config, workdir, "SIGTERM", tmp_path, monkeypatch) is None
        assert_same_run(workdir, reference, stops)
        if len(stops) == 9:
            break
    assert [how for how, _ in stops] == list(kinds) * 3, stops


@pytest.mark.parametrize("how", ["SIGUSR2", "SIGTERM"])
def test_a_signal_right_after_the_donating_step_returns_saves_that_step(tmp_path, synth_dataset_32, signal_handlers,
                                                                        monkeypatch, how):
    """The old race: submitit's USR2 handler saved the loop's state between the ``train_step`` call,
    which donates (deletes) the previous state, and the line that keeps the new one."""
    config = tiny_config(synth_dataset_32.root)
    config.total_steps = 8
    fire_after = 5
    make_train_step = ts.make_train_step

    def make_signalling_step(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def signalling_step(state, batch, frozen):
            new_state, metrics = step(state, batch, frozen)
            assert any(x.is_deleted() for x in jax.tree.leaves(state))  # donated: saving it would fail
            if int(new_state.step) == fire_after:
                os.kill(os.getpid(), getattr(signal, how))  # its handler runs before this function returns
            return new_state, metrics

        return signalling_step

    monkeypatch.setattr(ts, "make_train_step", make_signalling_step)
    workdir = tmp_path / "run"
    assert run_stopped(config, workdir, how, tmp_path, monkeypatch) == fire_after
    assert logged_step(workdir) == fire_after
    monkeypatch.setattr(ts, "make_train_step", make_train_step)
    preemption.clear()
    assert run_stopped(config, workdir, how, tmp_path, monkeypatch) is None
    assert sorted(losses(workdir)) == list(range(1, 9))
