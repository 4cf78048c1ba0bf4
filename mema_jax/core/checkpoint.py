"""Orbax checkpointing of the train state together with the grain data-iterator state.

Saves are asynchronous (training continues while a checkpoint is written), happen every
``save_every`` steps, and keep the newest ``keep``.  Orbax writes each checkpoint to a temporary
folder and renames it when complete, so a run killed mid-save resumes from the last *complete*
checkpoint.  Restores go straight into the sharded layout given by the abstract state.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain.python as grain
import orbax.checkpoint as ocp


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
        """Restores ``step`` (default: latest) into the layout of ``abstract_state``.

        The data iterator is restored in place.  Returns the state, or None if there is no checkpoint.
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        logging.info("restored checkpoint %s from %s", step, self.directory)
        return restored["state"]

    def save(self, step: int, state: Any, data_iterator: grain.DataLoaderIterator | None, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.PyGrainCheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
