"""Output folders of the filter and Tab. 1: checked before anything slow, written into a temp folder
beside the target and renamed into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path


from eval.leakage.embedding import LeakageFilterError

# ---------------------------------------------------------------------------------------- outputs

def check_out(out: Path, overwrite: bool, inputs: Sequence[Path], flag: str = "--out") -> None:
    out = Path(out)
    resolved = out.resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if resolved == folder or resolved.is_relative_to(folder) or folder.is_relative_to(resolved):
            raise LeakageFilterError(f"{flag} {out}: overlaps the input folder {folder}; inputs are never written")
    if out.exists():
        if not out.is_dir():
            raise LeakageFilterError(f"{flag} {out}: exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise LeakageFilterError(f"{flag} {out}: exists and is not empty; remove it, choose another path or "
                                     "pass --overwrite")


def publish(out: Path, overwrite: bool, fill) -> None:
    """``fill(tmp)`` writes into a temp folder beside ``out``, which then replaces ``out`` (absent,
    empty, or with ``overwrite`` any folder) by rename; on any error nothing of it is left."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        fill(tmp)
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise LeakageFilterError(f"--out {out}: appeared while writing; not replaced")
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)   # rename(2) replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



