"""Test-wide setup: 8 emulated CPU devices (set before jax is imported) and shared fixtures."""
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size checks (minutes); still run in CI")


@pytest.fixture(scope="session")
def synth_dataset_32(tmp_path_factory):
    """A small MeMa-Synth dataset at 32 px, rendered once per session."""
    from mema_jax.data import synth

    root = tmp_path_factory.mktemp("mema_synth_32")
    return synth.generate(root, synth.SynthSpec(num_images=160, images_per_identity=4, resolution=32, seed=0))


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


def _launch_tiny(config: str, workdir: Path, data_root: Path, *overrides: str) -> Path:
    """Runs ``launch.main`` on one emulated device (a user's laptop run) and returns the workdir."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "launch.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.data.root={data_root}", *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def tiny_diffusion_model(tmp_path_factory, synth_dataset_32):
    """A tiny pixel-space diffusion model trained in full on MeMa-Synth (configs/mema_lora.py:tiny),
    its exported pipeline folder: the medical encoder's source."""
    workdir = _launch_tiny("configs/mema_lora.py:tiny", tmp_path_factory.mktemp("diffusion"), synth_dataset_32.root,
                           "--config.mode=full", "--config.eval_every=0")
    return workdir / "model"


@pytest.fixture(scope="session")
def tiny_identity_backbone(tmp_path_factory, synth_dataset_32):
    """A tiny ArcFace (configs/identity.py:tiny) trained on MeMa-Synth identities: backbone.pth."""
    workdir = _launch_tiny("configs/identity.py:tiny", tmp_path_factory.mktemp("identity"), synth_dataset_32.root)
    return workdir / "backbone.pth"


TINY_DEID_STEPS = 300


@pytest.fixture(scope="session")
def tiny_deid_run(tmp_path_factory, tiny_diffusion_model, tiny_identity_backbone, synth_dataset_32):
    """A tiny MedSem-DeID (configs/medsem_deid.py:tiny) trained TINY_DEID_STEPS steps on MeMa-Synth
    with the tiny medical encoder and ArcFace, evaluated at the start and the end: its workdir
    (metrics.csv, model/)."""
    return _launch_tiny("configs/medsem_deid.py:tiny", tmp_path_factory.mktemp("deid"), synth_dataset_32.root,
                        f"--config.medical_encoder.source={tiny_diffusion_model}",
                        f"--config.identity.weights={tiny_identity_backbone}",
                        f"--config.total_steps={TINY_DEID_STEPS}", f"--config.eval_every={TINY_DEID_STEPS}",
                        "--config.eval_at_start=true", f"--config.checkpoint_every={TINY_DEID_STEPS}",
                        "--config.log_every=50")
