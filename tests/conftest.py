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
