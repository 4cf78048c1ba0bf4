"""The stage runner of the offline pipelines (``launch.pipeline``, ``launch.mema_pipeline``,
``benchmarks/deid_tables.py``): a pipeline is a list of :class:`Stage`, each a command a user can
also run alone, cached by the output that its success leaves.

- planning: a pipeline's ``plan(...)`` returns its stages in order (a name may repeat: two
  commands of one stage);
- ``--only a,b``: :func:`select` keeps those stages; an unknown name is an error listing the names;
- caching: :func:`run` skips a stage whose ``done`` path exists (a rerun resumes at the first
  missing one and rewrites nothing), prints each command before it runs, and stops at the first
  failure;
- helper commands: ``python -m launch.<pipeline> NAME ...`` runs a pipeline's own small steps
  (:func:`run_helper`).
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

# Exit status 3 of a command that finished but listed some inputs in failures.csv (deid_jax.deidentify).
SOME_INPUTS_FAILED = 3


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step: ``command`` (argv) makes ``done`` (a file or folder whose existence means done)."""

    name: str
    command: tuple[str, ...]
    done: Path

    def __post_init__(self):
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "done", Path(self.done))


def python(module: str, *args: str) -> tuple[str, ...]:
    """``python -m module args...`` with this interpreter."""
    return (sys.executable, "-m", module, *args)


def names(stages: Iterable[Stage]) -> list[str]:
    """The stage names, in order, each once."""
    return list(dict.fromkeys(s.name for s in stages))


def select(stages: Sequence[Stage], only: str | Sequence[str]) -> list[Stage]:
    """The stages named in ``only`` (comma-separated or a list; empty = all); ValueError on an unknown name."""
    wanted = [s for s in only.split(",") if s] if isinstance(only, str) else list(only)
    unknown = sorted(set(wanted) - set(names(stages)))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {', '.join(names(stages))}")
    return [s for s in stages if not wanted or s.name in wanted]


def run(stages: Iterable[Stage], env: Mapping[str, str]) -> bool:
    """Runs each stage whose ``done`` is missing, in order; False at the first that fails (its exit
    status is neither 0 nor 3, or it left no ``done``)."""
    for stage in stages:
        if stage.done.exists():
            print(f"[{stage.name}] cached: {stage.done}")
            continue
        print(f"[{stage.name}] {shlex.join(stage.command)}", flush=True)
        t0 = time.time()
        result = subprocess.run(stage.command, env=dict(env))
        if result.returncode not in (0, SOME_INPUTS_FAILED) or not stage.done.exists():
            print(f"pipeline: stage {stage.name} failed (exit {result.returncode}); rerun to resume from it",
                  file=sys.stderr)
            return False
        print(f"[{stage.name}] done in {time.time() - t0:.0f} s", flush=True)
    return True


def parser(prog: str, doc: str, presets: Iterable[str], stage_names: Sequence[str], *, default_runs: str,
           default_preset: str = "quick") -> argparse.ArgumentParser:
    """A pipeline's command line: --preset, --runs, --only (the pipeline adds its own options)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets), default=default_preset)
    p.add_argument("--runs", default=default_runs, help="where every stage writes")
    p.add_argument("--only", default="", help=f"comma-separated stages to run (of {', '.join(stage_names)})")
    return p


def select_or_exit(arg_parser: argparse.ArgumentParser, stages: Sequence[Stage], only: str) -> list[Stage]:
    """:func:`select`, an unknown name reported as a command-line error (exit status 2)."""
    try:
        return select(stages, only)
    except ValueError as error:
        arg_parser.error(str(error))


def run_helper(argv: Sequence[str], helpers: Mapping[str, Callable[[list[str]], int]]) -> int | None:
    """When ``argv`` starts with a helper's name, its exit status after running it; else None."""
    if argv[:1] and argv[0] in helpers:
        return helpers[argv[0]](list(argv[1:]))
    return None
