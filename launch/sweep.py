r"""Sweeps: one base config, a list / product / zip of overrides, one workdir per run.

  python -m launch.sweep run --sweep=configs/sweeps/fig8.py --workdir=runs/fig8            # here, one after another
  python -m launch.sweep run --sweep=configs/sweeps/fig8.py --workdir=runs/fig8 --submit=slurm \
      --slurm_partition=gpu --slurm_gpus_per_node=1 --slurm_nodes=1 --slurm_hours=4 [--slurm_array_parallelism=8]
  python -m launch.sweep collect --workdir=runs/fig8 [--metric=eval/med_accuracy]       # table (md, csv) + plots

A sweep file is Python, like a config: ``get_sweep(arg=None)`` returns plain data, a base config
and a list of override dicts (``configs/sweeps/__init__.py``'s ``product``, ``zipped`` and
``chain`` build them; a sweep file imports nothing from ``launch``); e.g. Fig. 8's two
one-at-a-time sweeps::

    def get_sweep(arg=None):
        return {"config": "configs/medsem_deid.py:synth",
                "runs": chain(product({"loss.lambda_med": [1.0, 2.5, 5.0, 7.5, 10.0]}, fixed={"loss.lambda_rev": 0.1}),
                              product({"loss.lambda_rev": [0.01, 0.05, 0.1, 0.5, 1.0]}, fixed={"loss.lambda_med": 5.0})),
                "fixed": {"total_steps": 300}}

Each run's workdir is ``<workdir>/<name>``, the name made of its overrides (``lambda_med=2.5,lambda_rev=0.1``,
the last key component; the full keys are in ``<workdir>/sweep.json``).  A run whose workdir
holds ``final_metrics.json`` (written by the training loop at total_steps) is finished: it is not
started again.  ``--submit=slurm`` sends the unfinished runs as one SLURM job array through
submitit (one array task per run; each task is a ``launch.main`` run, checkpointed and requeued on
preemption); ``--submit=local`` goes through submitit's local executor (the same code path,
no cluster); without ``--submit`` the runs go here, one after another.  Extra ``--config.k=v``
flags apply to every run (parsed by ml_collections' config flags against the base config, as
``launch.main`` parses them); the SLURM flags are ``launch.main``'s (``launch/slurm.py``).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from launch import slurm
from mema_jax.core.run_files import FINAL_METRICS_FILE as FINAL_METRICS

SWEEP_FILE = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Sweep:
    config: str  # configs/NAME.py[:ARG]
    runs: tuple[dict, ...]
    fixed: dict = dataclasses.field(default_factory=dict)  # applied to every run

    def __init__(self, config: str, runs: Iterable[Mapping[str, Any]], fixed: Mapping[str, Any] | None = None):
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "runs", tuple(_unique([dict(r) for r in runs])))
        object.__setattr__(self, "fixed", dict(fixed or {}))
        if not self.runs:
            raise ValueError("a sweep needs at least one run")

    @classmethod
    def from_data(cls, data: Mapping[str, Any], where: str) -> Sweep:
        """From a sweep file's plain data: {"config": ..., "runs": [...], "fixed": {...} (optional)}."""
        if not isinstance(data, Mapping) or not {"config", "runs"} <= set(data) or set(data) - {"config", "runs", "fixed"}:
            raise ValueError(f"{where}: get_sweep must return {{'config': 'configs/NAME.py[:ARG]', 'runs': [{{...}}, ...], "
                             f"'fixed': {{...}} (optional)}}, got {data!r:.200}")
        return cls(data["config"], data["runs"], data.get("fixed"))


def _unique(runs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in runs:
        key = json.dumps(r, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _value_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def run_name(overrides: Mapping[str, Any], fixed: Mapping[str, Any] = ()) -> str:
    """The run's folder name: its own overrides (not the sweep-wide ``fixed`` ones), sorted by key."""
    items = [(k, v) for k, v in sorted(overrides.items()) if k not in dict(fixed)]
    if not items:
        return "base"
    name = ",".join(f"{k.rsplit('.', 1)[-1]}={_value_text(v)}" for k, v in items)
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def load_sweep(spec: str) -> Sweep:
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: sweep file not found")
    module_spec = importlib.util.spec_from_file_location(f"sweep_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path}: a sweep file defines get_sweep(arg=None) returning "
                         "{'config': ..., 'runs': [...], 'fixed': {...}}")
    return Sweep.from_data(module.get_sweep(arg or None), path)


def load_config(spec: str):
    """``configs/NAME.py[:ARG]`` -> its ConfigDict (as ``--config=`` would build it)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None) if arg else module.get_config()


def apply_overrides(config, overrides: Mapping[str, Any], where: str):
    """``config`` with ``key.path = value`` set; ml_collections checks that each key exists and
    that the value has (or converts to) the field's type."""
    config = config.copy_and_resolve_references()
    config.lock()
    for key, value in overrides.items():
        try:
            config.update_from_flattened_dict({key: value})
        except (KeyError, AttributeError):
            raise KeyError(f"{where}: the config has no key {key!r}") from None
        except TypeError as error:
            old = type(_get(config, key)).__name__
            raise TypeError(f"{where}: {key} is {old} in the config, got {value!r} ({error})") from None
    return config


def _has(config, key: str) -> bool:
    try:
        _get(config, key)
    except (KeyError, AttributeError, TypeError):
        return False
    return True


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def parse_config_flags(config_spec: str, argv: Sequence[str]) -> dict[str, Any]:
    """``--config.KEY=VALUE`` flags -> {KEY: value}, each parsed by ml_collections' config flags
    against the config ``config_spec`` (its type; an unknown key is a KeyError naming the flag)."""
    from absl import flags
    from ml_collections import config_flags

    keys = []
    for item in argv:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unexpected argument {item!r} (only --config.KEY=VALUE overrides may follow)")
        keys.append(item[len("--config."):].split("=", 1)[0])
    values, full_argv = flags.FlagValues(), ["launch.sweep", f"--config={config_spec}", *argv]
    config_flags.DEFINE_config_file("config", None, "the sweep's base config", flag_values=values, lock_config=True,
                                    sys_argv=full_argv)
    try:
        values(full_argv)
    except (KeyError, AttributeError) as error:  # a key the config does not have: name its flag
        base = load_config(config_spec)
        missing = [k for k in keys if not _has(base, k)]
        raise KeyError(f"--config.{missing[0]}: the config has no key {missing[0]!r}" if missing else str(error)) from None
    except flags.Error as error:
        raise ValueError(str(error)) from None
    return {key: _get(values.config, key) for key in keys}


def plan(sweep: Sweep, workdir: Path, extra: Mapping[str, Any] | None = None) -> list[dict]:
    """Every run: name, workdir, overrides (fixed + own + extra), finished or not."""
    out = []
    for own in sweep.runs:
        overrides = {**sweep.fixed, **own, **dict(extra or {})}
        name = run_name(own)
        run_dir = workdir / name
        out.append({"name": name, "workdir": str(run_dir), "overrides": overrides, "varied": own,
                    "finished": (run_dir / FINAL_METRICS).exists()})
    names = [r["name"] for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs get the same folder name: {sorted(n for n in names if names.count(n) > 1)}")
    return out


def write_manifest(sweep: Sweep, workdir: Path, runs: list[dict], sweep_spec: str) -> Path:
    from mema_jax.fileio import atomic_write_bytes

    workdir.mkdir(parents=True, exist_ok=True)
    manifest = {"sweep": sweep_spec, "config": sweep.config, "fixed": sweep.fixed,
                "runs": [{k: r[k] for k in ("name", "workdir", "overrides", "varied")} for r in runs]}
    path = workdir / SWEEP_FILE
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    return path


def submit_array(configs: list, workdirs: list[str], folder: Path, cluster: str, options: Mapping[str, Any]):
    """One submitit job array (one task per run), each a checkpointed, requeueable launch.main run;
    ``options``: the SLURM option values (``launch.slurm.OPTIONS``)."""
    from launch.main import SubmittedRun

    executor = slurm.make_executor(str(folder / "submitit" / "%j"), cluster, name=folder.name, options=options,
                                   array=True)
    return executor.map_array(SubmittedRun(), configs, workdirs)


# ----------------------------------------------------------------------------- collect


def collect(workdir: Path, metric: str | None = None) -> tuple[Path, Path, list[Path]]:
    """Every run's final metrics in one table (``results.md``, ``results.csv``) and, per swept key, a
    PNG of each metric (or ``metric``) against that key's value, the other keys held."""
    from mema_jax.fileio import atomic_file, atomic_write_bytes

    manifest_path = workdir / SWEEP_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: missing; not a sweep folder (launch.sweep run writes it)")
    manifest = json.loads(manifest_path.read_text())
    rows, metric_names, varied_keys = [], set(), []
    for r in manifest["runs"]:
        final = Path(r["workdir"]) / FINAL_METRICS
        metrics = json.loads(final.read_text())["metrics"] if final.exists() else {}
        metric_names |= set(metrics)
        for k in r["varied"]:
            if k not in varied_keys:
                varied_keys.append(k)
        rows.append({"run": r["name"], "finished": final.exists(), **r["varied"], "metrics": metrics})
    names = sorted(metric_names) if metric is None else [metric]
    columns = ["run", *varied_keys, "finished", *names]
    table = [[row["run"], *[row.get(k, "") for k in varied_keys], row["finished"],
              *[row["metrics"].get(n, float("nan")) for n in names]] for row in rows]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([columns, *table])
    csv_path, md_path = workdir / "results.csv", workdir / "results.md"
    atomic_write_bytes(csv_path, buf.getvalue().encode())

    def cell(v):
        return "n/a" if isinstance(v, float) and math.isnan(v) else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = [f"# Sweep {manifest['sweep']} (base {manifest['config']})", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table]
    unfinished = [row["run"] for row in rows if not row["finished"]]
    if unfinished:
        lines += ["", f"Not finished (no {FINAL_METRICS}): {', '.join(unfinished)}."]
    atomic_write_bytes(md_path, ("\n".join(lines) + "\n").encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    for key in varied_keys:
        runs = [row for row in rows if key in row and row["finished"]]
        # One line per setting of the other swept keys (Fig. 8: lambda_med varied, lambda_rev held).
        groups: dict[tuple, list] = {}
        for row in runs:
            others = tuple((k, row[k]) for k in varied_keys if k != key and k in row)
            groups.setdefault(others, []).append(row)
        if not any(len(g) > 1 for g in groups.values()):
            continue
        plot_names = [n for n in names if any(n in row["metrics"] for row in runs)]
        fig, axes = plt.subplots(1, len(plot_names), figsize=(4 * len(plot_names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], plot_names):
            for others, group in groups.items():
                if len(group) < 2:
                    continue
                group = sorted(group, key=lambda row: row[key])
                label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_value_text(v)}" for k, v in others) or None
                ax.plot([row[key] for row in group], [row["metrics"].get(name, float("nan")) for row in group],
                        marker="o", label=label)
            ax.set_xlabel(key)
            ax.set_title(name, fontsize=9)
            if any(others for others in groups):
                ax.legend(fontsize=7)
        fig.tight_layout()
        out = workdir / f"plot_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
        with atomic_file(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        plots.append(out)
    return md_path, csv_path, plots


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run or submit every unfinished run of a sweep")
    r.add_argument("--sweep", required=True, help="configs/sweeps/NAME.py[:ARG]")
    r.add_argument("--workdir", required=True)
    r.add_argument("--submit", choices=("slurm", "local"), default=None)
    r.add_argument("--wait", action="store_true", help="with --submit: wait for every task")
    r.add_argument("--dry_run", action="store_true", help="print the runs, start nothing")
    slurm.add_arguments(r)
    c = sub.add_parser("collect", help="tabulate and plot the final metrics of a sweep's runs")
    c.add_argument("--workdir", required=True)
    c.add_argument("--metric", default=None, help="only this metric (default: all)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "collect":
        if rest:
            parser.error(f"unexpected arguments {rest}")
        try:
            md, csv_path, plots = collect(Path(args.workdir), args.metric)
        except FileNotFoundError as e:
            print(f"launch.sweep: {e}", file=sys.stderr)
            return 1
        print(md.read_text(), end="")
        print(f"wrote {md}, {csv_path}" + "".join(f", {p}" for p in plots))
        return 0
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unexpected argument {item!r} (only --config.KEY=VALUE overrides may follow)")
    try:
        sweep = load_sweep(args.sweep)
        extra = parse_config_flags(sweep.config, rest)
        workdir = Path(args.workdir)
        runs = plan(sweep, workdir, extra)
        base = load_config(sweep.config)
        configs = {rr["name"]: apply_overrides(base, rr["overrides"], f"{args.sweep} run {rr['name']}") for rr in runs}
    except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
        print(f"launch.sweep: {e}", file=sys.stderr)
        return 1
    write_manifest(sweep, workdir, runs, args.sweep)
    todo = [rr for rr in runs if not rr["finished"]]
    for rr in runs:
        print(f"{'finished' if rr['finished'] else 'to run  '}  {rr['name']}  {rr['workdir']}")
    if args.dry_run or not todo:
        print(f"launch.sweep: {len(todo)} of {len(runs)} runs to start" + (" (dry run)" if args.dry_run else ""))
        return 0
    if args.submit or args.slurm_partition:
        cluster = args.submit or "slurm"
        options = {name: getattr(args, name) for name, *_ in slurm.OPTIONS}
        jobs = submit_array([configs[rr["name"]] for rr in todo], [rr["workdir"] for rr in todo], workdir, cluster,
                            options)
        for rr, job in zip(todo, jobs):
            print(json.dumps({"run": rr["name"], "job_id": job.job_id, "cluster": cluster, "workdir": rr["workdir"]}),
                  flush=True)
        if args.wait:
            failed = 0
            for rr, job in zip(todo, jobs):
                try:
                    job.result()
                    print(json.dumps({"run": rr["name"], "job_id": job.job_id, "state": "finished"}), flush=True)
                except Exception as e:  # noqa: BLE001 - report every task, then fail
                    failed += 1
                    print(json.dumps({"run": rr["name"], "job_id": job.job_id, "state": "failed",
                                      "error": str(e)[-500:]}), flush=True)
            return 1 if failed else 0
        return 0
    import subprocess

    failed = []
    for rr in todo:  # here, one after another, each through the one entry point
        command = [sys.executable, "-m", "launch.main", f"--config={sweep.config}", f"--workdir={rr['workdir']}",
                   *(f"--config.{k}={_flag_value(v)}" for k, v in rr["overrides"].items())]
        print(f"[{rr['name']}] {' '.join(command)}", flush=True)
        if subprocess.run(command, env=dict(os.environ)).returncode != 0:
            failed.append(rr["name"])
    if failed:
        print(f"launch.sweep: runs failed: {', '.join(failed)} (rerun to resume them)", file=sys.stderr)
        return 1
    return 0


def _flag_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return repr(tuple(v))
    return str(v)


if __name__ == "__main__":
    raise SystemExit(main())
