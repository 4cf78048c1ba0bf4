"""Test-wide setup: 8 emulated CPU devices (set before jax is imported), one XLA compilation cache
for the whole run, and trained fixtures made once per run and shared by every xdist worker."""
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# The tests in this process compile far more than they compute (tiny models, a step or two), so
# they compile with XLA's backend at optimisation level 0 and without LLVM's expensive passes: the
# same programs, ~40% less wall time (measured on 2 cores: test_conv_lowering + test_vae_parity
# 216 -> 138 s, test_sharding + test_iresnet_parity 226 -> 140 s).  Results may differ from an
# optimised build in the last bits; every comparison in the suite is between runs of one setting or
# has a stated tolerance.  Child processes (``child_xla_flags``) get them where they too are mostly
# compilation: the shared trained fixtures and the MedSem-DeID trainer's runs (measured: the DeID
# 2-step 8-device run 135 -> 81 s, its 12-step run 87 -> 65 s, the tiny UNet stage 73 -> 63 s);
# other training runs keep a user's optimised build, where the flags cost more than they save
# (measured: test_resume + the MAE kill test 184 -> 234 s).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def child_xla_flags(devices: int = 1, fast_compile: bool = False) -> str:
    """XLA_FLAGS for a child process of a test: ``devices`` emulated CPU devices, and the suite's
    compile flags where ``fast_compile`` (a run that is mostly compilation), else a user's build."""
    flags = [TEST_XLA_FLAGS] if fast_compile else []
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS, child_xla_flags(8)) if f)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent XLA compilation cache for the whole test run, shared by both xdist workers and by
# every subprocess they start (they inherit the variables): a program compiled once (the tiny
# classifier's step, run by a dozen launch.main tests) is loaded from disk afterwards.  The process
# that starts the run makes a fresh one and removes it at the end, so no run depends on an earlier one.
_OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_XLA_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mema-jax-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The CUDA build of torch brings triton, whose native library crashes (SIGSEGV) when it is loaded
# after tensorflow (clu's metric writers import it): `import tensorflow; import torch._dynamo` dies.
# xdist workers import every test module, so load triton first, before anything imports tensorflow.
try:
    import triton  # noqa: E402,F401
except ImportError:
    pass

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
# tests/ itself (last, after the repo's packages), for the plain helper modules the tests import
# (tiny_models, parity): pytest's default import mode adds it too, this makes it hold in any mode.
if str(REPO / "tests") not in sys.path:
    sys.path.append(str(REPO / "tests"))


def skip_unless_required(reason: str) -> None:
    """Skips a test whose environment cannot be had here (SLURM not installable, a wheel not
    downloadable), with ``reason``; fails instead where MEMA_REQUIRE_ALL=1 (.ci/run sets it: CI has
    everything, so there a skip would hide a broken install step)."""
    if os.environ.get("MEMA_REQUIRE_ALL") == "1":
        pytest.fail(f"required here (MEMA_REQUIRE_ALL=1): {reason}")
    pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size checks (minutes); still run in CI")


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
    if _OWN_XLA_CACHE:  # the process that made it (the xdist controller: workers inherit it)
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def made_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``<shared>/<name>``, built by ``build(folder)`` once per test run: the first xdist worker to
    ask builds it, the others wait for it and reuse it.  A build that fails leaves nothing behind,
    so the next request tries again.  (Built in place, not renamed: runs record their paths.)"""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "made-once"
    folder, complete = shared / name, shared / f"{name}.complete"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            complete.touch()
    return folder


@pytest.fixture(scope="session")
def synth_dataset_32(tmp_path_factory):
    """A small MeMa-Synth dataset at 32 px, rendered once per test run (read-only for tests)."""
    from mema_jax.data import layout, synth

    spec = synth.SynthSpec(num_images=160, images_per_identity=4, resolution=32, seed=0)
    root = made_once(tmp_path_factory, "mema_synth_32", lambda folder: synth.generate(folder, spec))
    return layout.read_dataset(root, verify_images=False)


@pytest.fixture
def synth_folder_copy(tmp_path, synth_dataset_32):
    """A writable copy of the shared MeMa-Synth folder (tests that break a folder on purpose)."""
    dst = tmp_path / "mema"
    shutil.copytree(synth_dataset_32.root, dst)
    return dst


def rewrite_csv(path: Path, change: Callable[[list[dict]], None]) -> list[dict]:
    """Reads the CSV ``path`` as dict rows, lets ``change`` edit them in place, writes them back."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    change(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return rows


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny diffusers SD pipeline saved with save_pretrained (tiny_models.save_tiny_sd_pipeline),
    and initial latents for two prompts, (2, 4, 16, 16) NCHW torch."""
    import torch
    from tiny_models import TINY_SD_SIZE, save_tiny_sd_pipeline

    folder = save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"), tmp_path_factory.mktemp("tokenizer"))
    size = TINY_SD_SIZE // 2
    latents = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0))
    return folder, latents


def _run_command(command: list[str], workdir: Path) -> Path:
    """Runs a training command on one CPU device, compiled fast (``child_xla_flags``); its stdout
    goes to ``workdir/launch.stdout``."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=child_xla_flags(fast_compile=True))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (workdir / "launch.stdout").write_text(result.stdout)
    return workdir


QUICKSTART_TRAINED_STAGES = ("unet", "identity", "deid")


def _quickstart_stage(tmp_path_factory, stage: str, data_root: Path) -> Path:
    """``<shared>/quickstart/<stage>``: the quickstart's tiny preset's ``stage`` (launch.pipeline.plan),
    run by its own command once per test run.  These are the trained models the tests share, and
    the quickstart test links them in as its cached stages."""
    from launch.pipeline import plan

    def build(folder: Path) -> None:
        [command] = [s.command for s in plan("tiny", folder.parent, str(data_root)) if s.name == stage]
        _run_command(list(command), folder)

    return made_once(tmp_path_factory, f"quickstart/{stage}", build)


@pytest.fixture(scope="session")
def tiny_diffusion_model(tmp_path_factory, synth_dataset_32):
    """A tiny pixel-space diffusion model trained in full on MeMa-Synth (configs/mema_lora.py:tiny,
    evaluated at steps 0, 12, 24, a sample grid at 24): the quickstart tiny preset's unet stage, its
    exported pipeline folder.  The medical encoder's source and the LoRA / IP-Adapter tests' base."""
    return _quickstart_stage(tmp_path_factory, "unet", synth_dataset_32.root) / "model"


@pytest.fixture(scope="session")
def tiny_identity_backbone(tmp_path_factory, synth_dataset_32):
    """A tiny ArcFace (configs/identity.py:tiny) trained on MeMa-Synth identities (the quickstart tiny
    preset's identity stage): backbone.pth."""
    return _quickstart_stage(tmp_path_factory, "identity", synth_dataset_32.root) / "backbone.pth"


TINY_DEID_STEPS = 40  # launch/pipeline.py's tiny preset


@pytest.fixture(scope="session")
def _tiny_deid_inputs_in_parallel(tmp_path_factory, synth_dataset_32):
    """Starts the two independent models MedSem-DeID needs (the UNet and the ArcFace) at once, in
    threads of this worker, instead of one after the other (the chain was the suite's only setup over
    150 s).  The fixtures below then wait for them on made_once's lock; a build that failed here is
    tried again there and its error raised there."""
    import threading

    def build(stage):
        try:
            _quickstart_stage(tmp_path_factory, stage, synth_dataset_32.root)
        except Exception:  # noqa: BLE001 -- reported by the fixture that needs it
            pass

    threads = [threading.Thread(target=build, args=(stage,), daemon=True) for stage in ("unet", "identity")]
    for t in threads:
        t.start()
    return threads


@pytest.fixture(scope="session")
def tiny_deid_run(_tiny_deid_inputs_in_parallel, tmp_path_factory, tiny_diffusion_model, tiny_identity_backbone,
                  synth_dataset_32):
    """A tiny MedSem-DeID (configs/medsem_deid.py:tiny) trained TINY_DEID_STEPS steps on MeMa-Synth
    with the two models above, evaluated at the start and the end (the quickstart tiny preset's deid
    stage): its workdir (metrics.csv, model/).  Tests only read it."""
    return _quickstart_stage(tmp_path_factory, "deid", synth_dataset_32.root)
