"""``python -m eval.report --config=CONFIG[:ARG] --out=DIR [--config.x.y=V ...]`` (see eval/report/__init__.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from eval.inputs import InputMismatchError
from eval.report import ReportConfigError, run
from mema_jax.data import layout

_CONFIG = config_flags.DEFINE_config_file("config", None, "Eval config file, e.g. configs/eval_real_photos.py.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder for the tables, grids and generated reference methods.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or _OUT.value is None:
        raise app.UsageError("--config and --out are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        run(_CONFIG.value, _OUT.value)
    except (ReportConfigError, InputMismatchError, layout.MeMaFormatError, FileNotFoundError) as e:
        # Problems of the user's config, folders or weight files: the message says it all.
        print(f"eval.report: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {Path(_OUT.value) / 'tables.md'}")


def entry():
    try:
        app.run(main)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if flags.FLAGS.is_parsed():
            raise
        # An unknown key or a wrong type in --config.x=V: ml_collections raises these while parsing.
        print(f"eval.report: bad flag: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    entry()
