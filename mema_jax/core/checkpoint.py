"""Orbax checkpointing of the train state together with the grain data-iterator state.

Saves are asynchronous (training continues while a checkpoint is written), happen every
``save_every`` steps, and keep the newest ``keep``.  Orbax writes each checkpoint to a temporary
folder and renames it when complete, so a run killed mid-save resumes from the last *complete*
checkpoint (half-written temporary folders are ignored and cleaned up).  Restores go straight
into the sharded layout given by the abstract state.

A complete checkpoint can still be unreadable (a disk that filled up, files truncated by a copy):
``restore`` then says which step failed and why, falls back to the previous checkpoint, and keeps
the bad one for inspection under ``<step>.unreadable``; if none can be read it stops with one
``CheckpointError`` naming the directory and every step's reason, and renames nothing.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import grain.python as grain
import orbax.checkpoint as ocp

from mema_jax.errors import InputError

UNREADABLE_SUFFIX = ".unreadable"


class CheckpointError(InputError, RuntimeError):
    """No checkpoint in a directory that holds some could be read."""


class Checkpointer:
    def __init__(self, directory, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: Any, data_iterator: grain.DataLoaderIterator | None, step: int | None = None):
        """Restores ``step`` (default: the newest readable one) into the layout of ``abstract_state``.

        The data iterator is restored in place.  Returns the state, or None if there is no checkpoint.
        """
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            return None
        failures: list[tuple[int, str]] = []
        for candidate in steps:
            try:
                state = self._restore_step(candidate, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 - any reading failure means "try the previous one"
                reason = _one_line(e)
                failures.append((candidate, reason))
                print(f"checkpoint step {candidate} in {self.directory} is unreadable ({reason})"
                      + ("; trying the previous one" if candidate != steps[-1] else ""), file=sys.stderr, flush=True)
                continue
            if failures:
                for bad, _ in failures:
                    kept = self._set_aside(bad)
                    print(f"kept unreadable checkpoint step {bad} as {kept}; resuming from step {candidate}",
                          file=sys.stderr, flush=True)
                self.manager.reload()
            logging.info("restored checkpoint %s from %s", candidate, self.directory)
            return state
        listing = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise CheckpointError(f"{self.directory}: no readable checkpoint ({listing}). Move the directory away to "
                              "start from scratch, or restore its files.")

    def _restore_step(self, step: int, abstract_state: Any, data_iterator):
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

    def _set_aside(self, step: int) -> Path:
        source = self.directory / str(step)
        target = self.directory / f"{step}{UNREADABLE_SUFFIX}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}{UNREADABLE_SUFFIX}{n}"
        source.rename(target)
        return target

    def save(self, step: int, state: Any, data_iterator: grain.DataLoaderIterator | None, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.PyGrainCheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _one_line(error: Exception, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
