"""Preemption: a signal asks the training loop to checkpoint at the end of the step it is in, and stop.

A signal can arrive at any instruction: between the donated ``train_step`` call and the line that
keeps its result, halfway through fetching a batch, inside a save.  So no handler here saves
anything: each one only records the request, and :func:`mema_jax.core.loop.run` acts on it at the
next step boundary (before the first step and after every step), where the state it holds is a
live, complete step and the data iterator is at that step's position.  There it saves that step,
waits for the write, and raises :class:`Preempted`.

* SIGTERM (``scancel``, ``scontrol requeue``, SLURM's preemption with GraceTime, most schedulers)
  and SIGUSR1 (``sbatch --signal=USR1@120``): ``launch.main`` turns :class:`Preempted` into exit
  status ``PREEMPTED_EXIT``; a requeued job resumes from that checkpoint.
* submitit's signal (USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise; SLURM sends it before
  the time limit, ``scancel --signal=USR2`` by hand): submitit's own handler would call the job's
  ``checkpoint()`` in the middle of whatever the loop was doing.  :func:`defer` routes the signal
  to the same request instead, and keeps submitit's handler; once the loop has saved and raised
  :class:`Preempted`, :func:`run_deferred` calls it (checkpoint, requeue, exit), so submitit's
  requeue happens on a checkpoint that is already complete.

With several processes the loop agrees on the step first (:func:`requested_anywhere`): one
process's save is a collective the others must join.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again" -- the run is not finished, its checkpoint is current
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested: signal.Signals | None = None
_deferred: dict[int, Callable] = {}


class Preempted(RuntimeError):
    """The run stopped on a preemption signal after checkpointing step ``step``."""

    def __init__(self, step: int, signum: int):
        self.step = step
        self.signum = signal.Signals(signum)
        self.signal_name = self.signum.name
        super().__init__(f"preempted by {self.signal_name}: checkpointed step {step}; rerun (or requeue) to resume")


def _handler(signum, frame):  # noqa: ARG001
    global _requested
    # The first signal names the request; later ones (SLURM repeats SIGTERM) change nothing.  No lock:
    # a handler runs on the main thread, between two bytecodes of code that may hold it.
    if _requested is None:
        _requested = signal.Signals(signum)


def install() -> None:
    """Route SIGTERM / SIGUSR1 (and deferred signals) to the request (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (*SIGNALS, *_deferred):
        signal.signal(sig, _handler)


def submitit_signal() -> signal.Signals:
    """The signal submitit's job environment checkpoints and requeues on (its ``SUBMITIT_PREEMPT_SIGNAL``)."""
    return signal.Signals(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")))


def defer(sig: int) -> None:
    """Route ``sig`` to the request; its current handler (e.g. submitit's) runs later, through
    :func:`run_deferred`, once the loop has saved the step it was in.  Main thread only."""
    previous = signal.getsignal(sig)
    if previous is _handler:
        return
    if callable(previous):
        _deferred[int(sig)] = previous
    signal.signal(sig, _handler)


def run_deferred(preempted: Preempted) -> None:
    """Calls the handler :func:`defer` kept for the signal that stopped the run (submitit's
    checkpoint-and-requeue, which usually exits); nothing for other signals."""
    handler = _deferred.get(int(preempted.signum))
    if handler is not None:
        handler(int(preempted.signum), None)


def requested() -> str | None:
    """The name of the signal that asked for a stop in this process, else None."""
    return None if _requested is None else _requested.name


def requested_signal() -> signal.Signals | None:
    return _requested


def requested_anywhere() -> signal.Signals | None:
    """The request of any process (the first process's signal, or any other's), agreed by all:
    every process must call it at the same step.  One process: :func:`requested_signal`."""
    import jax

    if jax.process_count() == 1:
        return _requested
    import numpy as np
    from jax.experimental import multihost_utils

    mine = np.int32(0 if _requested is None else int(_requested))
    everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
    asked = [int(s) for s in everyone if s]
    return signal.Signals(asked[0]) if asked else None


def clear() -> None:
    """Forgets the request (the loop calls it once it acted on one)."""
    global _requested
    _requested = None


def reset() -> None:
    """Forgets the request and the deferred handlers (for a process that runs several jobs)."""
    clear()
    _deferred.clear()
