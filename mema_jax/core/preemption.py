"""Preemption: a signal asks the training loop to checkpoint at the next step boundary and stop.

SIGTERM (what ``scancel``, SLURM's preemption with GraceTime and most schedulers send first) and
SIGUSR1 (``sbatch --signal=USR1@120``) set a flag; :func:`mema_jax.core.loop.run` checks it after
every step, saves a checkpoint of the state it has (whatever the step), waits for the write, and
raises :class:`Preempted`.  ``launch.main`` turns that into exit status ``PREEMPTED_EXIT`` (a
requeued job then resumes from that checkpoint).  Under submitit, SLURM's warning signal
(USR2) goes to submitit's handler, which calls the job's ``checkpoint()``: ``launch.main``'s job
object then calls :func:`save_now` (the loop's registered saver, synchronously) before asking
submitit to requeue it.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again" -- the run is not finished, its checkpoint is current
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested = threading.Event()
_saver: Callable[[], int | None] | None = None


class Preempted(RuntimeError):
    """The run stopped on a preemption signal after checkpointing step ``step``."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"preempted by {signal_name}: checkpointed step {step}; rerun (or requeue) to resume")
        self.step = step
        self.signal_name = signal_name


def _handler(signum, frame):  # noqa: ARG001
    _requested.set()
    _requested.signal_name = signal.Signals(signum).name


def install() -> None:
    """Route SIGTERM / SIGUSR1 to the flag (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def requested() -> str | None:
    """The signal's name once one arrived, else None."""
    return getattr(_requested, "signal_name", "signal") if _requested.is_set() else None


def clear() -> None:
    _requested.clear()


def register_saver(saver: Callable[[], int | None] | None) -> None:
    """The loop's "checkpoint the current state now" (None: no run in progress)."""
    global _saver
    _saver = saver


def save_now() -> int | None:
    """Checkpoints the running loop's current state now; the step saved, or None without a run."""
    return _saver() if _saver is not None else None
