"""Metric writers and periodic actions (clu): TensorBoard, a CSV table, and a console line.

``make_writer`` returns one writer (clu's ``MetricWriter`` interface) that writes TensorBoard event
files (clu's default writer), appends scalars to ``<workdir>/metrics.csv``, and prints a console
line with steps/s and ETA.  Only process 0 writes files; other processes only log.

clu's writers import TensorFlow (6-7 s of CPU at every start, measured on 2 cores), so clu is
imported only when TensorBoard is asked for (``config.tensorboard``, on by default; the tests'
``:tiny`` runs turn it off): without it a run writes metrics.csv and the console line alone.
"""
from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np


class _ScalarWriter:
    """A writer of clu's ``MetricWriter`` interface (duck-typed, so that defining it imports no
    TensorFlow) that keeps scalars only; other summary kinds go to TensorBoard alone."""

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass


class CsvWriter(_ScalarWriter):
    """Appends scalars to a CSV file, one row per (step, name).  Resumed runs append."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "name", "value", "time"])

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        now = f"{time.time():.3f}"
        for name, value in scalars.items():
            self._csv.writerow([step, name, float(np.asarray(value)), now])
        self._file.flush()  # rows reach the file as they are logged (a run is watched, or killed)


    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class ConsoleWriter(_ScalarWriter):
    """One line per write: step, chosen scalars, steps/s and ETA."""

    def __init__(self, total_steps: int, keys=("loss",)):
        self.total_steps = total_steps
        self.keys = keys
        self._last: tuple[int, float] | None = None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        shown = [f"{k} {float(np.asarray(v)):.4g}" for k, v in scalars.items() if k.rsplit("/", 1)[-1] in self.keys]
        if not shown:
            # Other writers' scalars (clu's ReportProgress, written when a step is dispatched, not finished)
            # would make the rate a dispatch-to-completion time: only this writer's own lines count.
            return
        now = time.perf_counter()
        rate = None
        if self._last is not None and step > self._last[0]:
            rate = (step - self._last[0]) / max(now - self._last[1], 1e-9)
        self._last = (step, now)
        parts = [f"step {step}/{self.total_steps}"] + shown
        if rate:
            eta = (self.total_steps - step) / rate
            parts.append(f"{rate:.2f} steps/s ETA {_fmt_seconds(eta)}")
        print(" | ".join(parts), flush=True)


    def write_hparams(self, hparams):
        print("hparams: " + ", ".join(f"{k}={v}" for k, v in sorted(hparams.items())), flush=True)

    def flush(self):
        pass

    def close(self):
        pass


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Writers(_ScalarWriter):
    """Every call to each of ``writers`` (clu's MultiWriter, for runs that do not load clu)."""

    def __init__(self, writers):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams):
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def make_writer(workdir, total_steps: int, console_keys=("loss",), tensorboard: bool = True):
    """The run's writer: TensorBoard (when ``tensorboard``), metrics.csv and the console line."""
    if jax.process_index() != 0:
        if not tensorboard:
            return _Writers([])
        from clu import metric_writers  # TensorFlow

        return metric_writers.create_default_writer(None, just_logging=True)
    os.makedirs(workdir, exist_ok=True)
    own = [CsvWriter(os.path.join(workdir, "metrics.csv")), ConsoleWriter(total_steps, console_keys)]
    if not tensorboard:
        return _Writers(own)
    from clu import metric_writers  # TensorFlow

    events = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"), asynchronous=True)
    return metric_writers.MultiWriter([events, *own])


def make_periodic_actions(workdir, total_steps: int, writer, *, profile_steps: int = 0, first_profile: int = 10,
                          tensorboard: bool = True):
    """clu periodic actions: progress (steps/s and uptime to the writer; with TensorBoard, which
    loads clu anyway), and a profile when asked for."""
    if not tensorboard and not profile_steps:
        return []  # the console line shows steps/s
    from clu import periodic_actions  # TensorFlow

    actions = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_secs=30.0)]
    if profile_steps > 0 and jax.process_index() == 0:
        actions.append(periodic_actions.Profile(logdir=os.path.join(workdir, "profile"), num_profile_steps=profile_steps,
                                                first_profile=first_profile, every_secs=None, every_steps=None))
    return actions
