r"""The one entry point: run the trainer a config names, here or on a SLURM cluster.

  python -m launch.main --config=configs/NAME.py[:VARIANT] --workdir=DIR [--config.x.y=V ...]
  python -m launch.main --config=... --workdir=DIR --slurm_partition=gpu --slurm_nodes=2 --slurm_gpus_per_node=4
  python -m launch.main --config=... --workdir=DIR --submit=local --wait   # the submitit path, without a cluster
  python -m launch.main --config=... --workdir=DIR --coordinator_address=host:1234 --num_processes=2 --process_id=0

``config.trainer`` is the module path of the trainer (e.g. ``mema_jax.trainers.classifier``); it
must define ``train_and_evaluate(config, workdir)``.  Overrides are checked against the config:
an unknown key or a value of the wrong type stops the run with a message naming the flag.
With ``--slurm_*`` flags the same command is submitted through submitit, one task per GPU; each
task calls ``jax.distributed.initialize()``, which reads the SLURM environment.  Other launchers
(torchrun-style, MPI, a shell loop) pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (on CPU the processes exchange data through gloo).  Sweeps: ``launch/sweep.py``.

Preemption: SIGTERM / SIGUSR1 make the loop checkpoint the step it is at and exit with status 75
(``mema_jax.core.preemption``); a submitit job is checkpointed the same way on SLURM's warning
signal and requeued.  Rerunning the same command resumes; a finished run exits at once.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import slurm
from mema_jax.core import run_files
from mema_jax.errors import InputError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py:local.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_SUBMIT = flags.DEFINE_enum("submit", None, ["slurm", "local"],
                            "Submit through submitit instead of running here: 'slurm', or 'local' (a submitit job "
                            "on this machine, same code path, for trying a submission without a cluster).")
_WAIT = flags.DEFINE_bool("wait", False, "With --submit: wait for the job and print its result.")
_SLURM = slurm.define_absl_flags()
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs outside SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """jax.distributed from explicit flags, or from SLURM's environment when it holds several tasks."""
    import jax

    if coordinator:
        if num_processes is None or process_id is None:
            raise SystemExit("--coordinator_address needs --num_processes and --process_id")
        # CPU devices of different processes talk through gloo (this touches only the CPU client,
        # and must be set before any backend exists, so it is not made conditional on one).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if _is_multiprocess():
        jax.distributed.initialize()
        return True
    return False


def run(config, workdir: str, distributed: dict | None = None):
    """Runs ``config.trainer`` in this process (used directly by tests and by SLURM tasks)."""
    from mema_jax.core.compile import use_persistent_cache

    use_persistent_cache()  # a restarted or requeued run loads its programs instead of compiling them
    initialize_distributed(**(distributed or {}))
    module = importlib.import_module(config.trainer)
    if not hasattr(module, "train_and_evaluate"):
        raise SystemExit(f"trainer module {config.trainer!r} has no train_and_evaluate(config, workdir)")
    os.makedirs(workdir, exist_ok=True)
    import jax

    if hasattr(module, "resolve_config"):  # derived settings (steps from epochs) before the config is saved
        config = module.resolve_config(config)
    saved = config.to_json_best_effort(indent=2)
    if jax.process_index() == 0:
        tmp = os.path.join(workdir, run_files.CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(saved)
        os.replace(tmp, os.path.join(workdir, run_files.CONFIG_FILE))
    result = module.train_and_evaluate(config, workdir)
    check_config_unchanged(config, saved, os.path.join(workdir, run_files.CONFIG_FILE))
    return result


def check_config_unchanged(config, saved: str, path: str) -> None:
    """config.json is the run's config: a trainer that changed it during the run is a bug, named here."""
    now = json.loads(config.to_json_best_effort())
    before = json.loads(saved)

    def changed(a, b, prefix=""):
        keys = sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else None
        if keys is None:
            return [] if a == b else [prefix.rstrip(".")]
        return [k for key in keys for k in changed(a.get(key), b.get(key), f"{prefix}{key}.")]

    keys = changed(now, before)
    if keys:
        raise RuntimeError(f"{config.trainer}.train_and_evaluate changed config {', '.join(keys)} after {path} was "
                           "written; derive settings in its resolve_config(config) instead")


class SubmittedRun:
    """What submitit runs: ``run(config, workdir)``, checkpointed and requeued on preemption.

    submitit's signal (USR2: SLURM's warning before the time limit or a preemption) is deferred to
    the loop, which saves at the end of the step it is in and raises ``Preempted``; then submitit's
    own handler runs: it calls ``checkpoint`` (the checkpoint is already written) and requeues the
    job, which resumes from that step."""

    def __call__(self, config, workdir: str):
        from mema_jax.core import preemption

        preemption.defer(preemption.submitit_signal())
        try:
            return run(config, workdir)
        except preemption.Preempted as e:
            print(f"launch.main: {e}", flush=True)
            preemption.run_deferred(e)  # submitit: checkpoint() + requeue + exit, for its own signal
            raise

    def checkpoint(self, config, workdir: str):
        import submitit

        print(f"launch.main: requeueing; the run resumes from its last checkpoint in {workdir}", flush=True)
        return submitit.helpers.DelayedSubmission(SubmittedRun(), config, workdir)


def _is_multiprocess() -> bool:
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ


def submit(config, workdir: str, cluster: str):
    """Submits ``run(config, workdir)`` through submitit: one task per GPU on SLURM."""
    executor = slurm.make_executor(os.path.join(workdir, "submitit"), cluster,
                                   name=os.path.basename(os.path.abspath(workdir)),
                                   options={name: flag.value for name, flag in _SLURM.items()})
    job = executor.submit(SubmittedRun(), config, workdir)
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
    cluster = _SUBMIT.value or ("slurm" if _SLURM["slurm_partition"].value else None)
    if cluster:
        submit(config, _WORKDIR.value, cluster)
        return
    from mema_jax.core import preemption

    distributed = {"coordinator": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
                   "process_id": _PROCESS_ID.value}
    try:
        run(config, _WORKDIR.value, distributed)
    except InputError as e:  # its message names the file and the problem: no traceback
        print(f"launch.main: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except preemption.Preempted as e:
        print(f"launch.main: {e}", file=sys.stderr, flush=True)
        raise SystemExit(preemption.PREEMPTED_EXIT) from None


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
