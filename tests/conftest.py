"""Test-wide setup: 8 emulated CPU devices (set before jax is imported) and shared fixtures."""
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size checks (minutes); still run in CI")


@pytest.fixture(scope="session")
def synth_dataset_32(tmp_path_factory):
    """A small MeMa-Synth dataset at 32 px, rendered once per session."""
    from mema_jax.data import synth

    root = tmp_path_factory.mktemp("mema_synth_32")
    return synth.generate(root, synth.SynthSpec(num_images=160, images_per_identity=4, resolution=32, seed=0))
