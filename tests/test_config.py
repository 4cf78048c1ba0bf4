"""Config files and the launch entry point's overrides."""
import importlib
import subprocess
import sys

import pytest
from absl import flags
from conftest import REPO
from ml_collections import config_flags

CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if p.name not in ("__init__.py", "common.py"))


def parse(argv):
    fv = flags.FlagValues()
    # sys_argv: config_flags declares the --config.* override flags from the command line it is given.
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=["prog"] + argv)
    fv(["prog"] + argv)
    return fv.config


def test_overrides_round_trip_into_the_config():
    c = parse(["--config=configs/quickstart.py:tiny", "--config.batch_size=16", "--config.model.widths=(4, 8)",
               "--config.precision.compute_dtype=bfloat16", "--config.mesh.fsdp=2"])
    assert c.batch_size == 16
    assert tuple(c.model.widths) == (4, 8)
    assert c.precision.compute_dtype == "bfloat16"
    assert c.mesh.fsdp == 2
    assert c.total_steps == 24  # untouched values keep the variant's


@pytest.mark.parametrize("override, error, match", [
    # ml_collections: a key the (locked) config does not have, at any depth, is an AttributeError naming it.
    ("--config.no_such_key=1", AttributeError, "no_such_key"),
    ("--config.model.no_such=2", AttributeError, "no_such"),
    # absl: a value that does not parse as the field's type.
    ("--config.batch_size=many", flags.IllegalFlagValueError, "batch_size=many"),
])
def test_bad_override_is_rejected_by_the_parser(override, error, match):
    with pytest.raises(error, match=match):
        parse(["--config=configs/quickstart.py:tiny", override])


@pytest.mark.parametrize("override, named", [("--config.no_such_key=1", "no_such_key"),
                                             ("--config.batch_size=many", "batch_size")])
def test_launch_fails_clearly_on_a_bad_override(tmp_path, override, named):
    r = subprocess.run([sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny",
                        f"--workdir={tmp_path}", override], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert named in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_states_its_run_command_and_builds_each_variant(path):
    module = importlib.import_module(f"configs.{path.stem}")
    doc = module.__doc__ or ""
    assert f"--config=configs/{path.name}" in doc, f"{path.name}: docstring must give the run command"
    variants = [None] + [line.split()[0][1:] for line in doc.splitlines() if line.strip().startswith(":")]
    for v in variants:
        c = module.get_config(v.strip() if v else None)
        assert "trainer" in c or "methods" in c


def test_unknown_variant_is_an_error():
    from configs import quickstart

    with pytest.raises(ValueError, match="unknown variant"):
        quickstart.get_config("huge")
