r"""The one entry point: run the trainer a config names, here or on a SLURM cluster.

  python -m launch.main --config=configs/NAME.py[:VARIANT] --workdir=DIR [--config.x.y=V ...]
  python -m launch.main --config=... --workdir=DIR --slurm_partition=gpu --slurm_nodes=2 --slurm_gpus_per_node=4
  python -m launch.main --config=... --workdir=DIR --submit=local --wait   # the submitit path, without a cluster

``config.trainer`` is the module path of the trainer (e.g. ``mema_jax.trainers.classifier``); it
must define ``train_and_evaluate(config, workdir)``.  Overrides are checked against the config:
an unknown key or a value of the wrong type stops the run with a message naming the flag.
With ``--slurm_*`` flags the same command is submitted through submitit, one task per GPU; each
task calls ``jax.distributed.initialize()``, which reads the SLURM environment.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mema_jax.errors import InputError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py:local.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_SUBMIT = flags.DEFINE_enum("submit", None, ["slurm", "local"],
                            "Submit through submitit instead of running here: 'slurm', or 'local' (a submitit job "
                            "on this machine, same code path, for trying a submission without a cluster).")
_WAIT = flags.DEFINE_bool("wait", False, "With --submit: wait for the job and print its result.")
_SLURM_PARTITION = flags.DEFINE_string("slurm_partition", None, "SLURM partition (implies --submit=slurm).")
_SLURM_NODES = flags.DEFINE_integer("slurm_nodes", 1, "SLURM nodes.")
_SLURM_GPUS = flags.DEFINE_integer("slurm_gpus_per_node", 1, "GPUs (= tasks) per node.")
_SLURM_HOURS = flags.DEFINE_float("slurm_hours", 24.0, "SLURM time limit in hours.")
_SLURM_CPUS = flags.DEFINE_integer("slurm_cpus_per_task", 8, "CPUs per task (data loading workers).")
_SLURM_ACCOUNT = flags.DEFINE_string("slurm_account", None, "SLURM account.")


def run(config, workdir: str):
    """Runs ``config.trainer`` in this process (used directly by tests and by SLURM tasks)."""
    if _is_multiprocess():
        import jax

        jax.distributed.initialize()
    module = importlib.import_module(config.trainer)
    if not hasattr(module, "train_and_evaluate"):
        raise SystemExit(f"trainer module {config.trainer!r} has no train_and_evaluate(config, workdir)")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json.tmp"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(os.path.join(workdir, "config.json.tmp"), os.path.join(workdir, "config.json"))
    return module.train_and_evaluate(config, workdir)


def _is_multiprocess() -> bool:
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ


def submit(config, workdir: str, cluster: str):
    """Submits ``run(config, workdir)`` through submitit: one task per GPU on SLURM."""
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(workdir, "submitit"), cluster=cluster)
    common = dict(timeout_min=int(_SLURM_HOURS.value * 60), name=os.path.basename(os.path.abspath(workdir)))
    if cluster == "slurm":
        executor.update_parameters(
            slurm_partition=_SLURM_PARTITION.value,
            nodes=_SLURM_NODES.value,
            tasks_per_node=_SLURM_GPUS.value,
            gpus_per_node=_SLURM_GPUS.value,
            cpus_per_task=_SLURM_CPUS.value,
            **({"slurm_account": _SLURM_ACCOUNT.value} if _SLURM_ACCOUNT.value else {}),
            **common,
        )
    else:
        executor.update_parameters(tasks_per_node=1, nodes=1, gpus_per_node=0, **common)
    job = executor.submit(run, config, workdir)
    print(json.dumps({"job_id": job.job_id, "cluster": cluster, "workdir": workdir, "logs": str(executor.folder)}),
          flush=True)
    if _WAIT.value:
        print(json.dumps({"job_id": job.job_id, "result": job.result()}, default=str), flush=True)
    return job


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax, grain) hides the progress lines
    config = _CONFIG.value
    if "trainer" not in config:
        raise app.UsageError(f"{flags.FLAGS['config'].config_filename}: the config has no 'trainer' entry")
    logging.info("config:\n%s", config)
    cluster = _SUBMIT.value or ("slurm" if _SLURM_PARTITION.value else None)
    if cluster:
        submit(config, _WORKDIR.value, cluster)
        return
    try:
        run(config, _WORKDIR.value)
    except InputError as e:  # its message names the file and the problem: no traceback
        print(f"launch.main: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def parse_flags(argv):
    """absl's parser, with unknown config keys and bad values turned into one clear message."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (KeyError, AttributeError) as e:  # config_flags: --config.<key> that the config does not have
        key = str(e).strip("\"'")
        culprit = next((a.split("=")[0] for a in argv[1:]
                        if a.startswith("--config.") and key in a.split("=")[0].split(".")), f"--config...{key}")
        message = f"{culprit}: the config has no key {key!r}"
    print(f"launch.main: bad flag: {message}", file=sys.stderr)
    raise SystemExit(2)


def entry():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    entry()
