"""The SLURM options of ``launch.main`` and ``launch.sweep`` (one set, defined once) and the submitit
executor they build: on SLURM one task per GPU (one task per node on CPU-only nodes), with SLURM's
warning signal (USR2) some time before the time limit; ``local`` runs one task on this machine
through the same code path."""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

# name, type, default, help.  Both commands take every one (launch.main ignores the array's parallelism).
OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("slurm_partition", str, None, "SLURM partition (implies --submit=slurm)."),
    ("slurm_nodes", int, 1, "SLURM nodes."),
    ("slurm_gpus_per_node", int, 1, "GPUs (= tasks) per node; 0 on CPU-only nodes (one task per node)."),
    ("slurm_cpus_per_task", int, 8, "CPUs per task (data loading workers)."),
    ("slurm_hours", float, 24.0, "SLURM time limit in hours."),
    ("slurm_account", str, None, "SLURM account."),
    ("slurm_array_parallelism", int, 256, "Sweeps: how many array tasks run at once."),
)


def define_absl_flags() -> dict[str, Any]:
    """The options as absl flags (launch.main); returns {name: FlagHolder}."""
    from absl import flags

    define = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float}
    return {name: define[kind](name, default, help_text) for name, kind, default, help_text in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options as argparse arguments (launch.sweep)."""
    for name, kind, default, help_text in OPTIONS:
        parser.add_argument(f"--{name}", type=kind, default=default, help=help_text)


def make_executor(folder: str, cluster: str, *, name: str, options: Mapping[str, Any], array: bool = False,
                  signal_delay_s: int = 120):
    """A submitit executor for ``cluster`` ("slurm" or "local") from the option values ``options``
    (keys of :data:`OPTIONS`; missing ones take their defaults)."""
    import submitit

    values = {n: options.get(n, default) for n, _, default, _ in OPTIONS}
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    common = {"timeout_min": max(1, int(values["slurm_hours"] * 60)), "name": name}
    if cluster == "slurm":
        gpus = values["slurm_gpus_per_node"]
        executor.update_parameters(
            slurm_partition=values["slurm_partition"], nodes=values["slurm_nodes"], tasks_per_node=max(1, gpus),
            gpus_per_node=gpus, cpus_per_task=values["slurm_cpus_per_task"], slurm_signal_delay_s=signal_delay_s,
            **({"slurm_array_parallelism": values["slurm_array_parallelism"]} if array else {}),
            **({"slurm_account": values["slurm_account"]} if values["slurm_account"] else {}), **common)
    else:
        executor.update_parameters(tasks_per_node=1, nodes=1, gpus_per_node=0, **common)
    return executor
