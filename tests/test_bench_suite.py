"""The benchmark suite (benchmarks/suite.py) and the PyTorch twin of MedSem-DeID it times against
(benchmarks/torch_medsem_deid.py).

* the twin has exactly our parameter count, network by network (generator, discriminator, ArcFace,
  the kept Enc_med UNet part), at the :tiny config and in every password mode / recovery path;
* the analytic FLOP count of a convolution is XLA's exactly (2 per multiply-add, padded taps
  excluded);
* ``suite.py --profile cpu --quick`` runs end to end and writes a table with every workload's row
  and finite numbers, and its cross-check of the analytic UNet forward count against XLA's cost
  analysis for bench_unet's small UNet (b2, 16x16) is within ``FLOP_CHECK_TOLERANCE`` (20 %:
  analytic counts the conv/dense/attention matmuls only, XLA also the elementwise ops -- GroupNorm,
  SiLU, softmax, residual and bias adds -- measured 0.848).
"""
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import suite  # noqa: E402
from workloads import common as workload_common  # noqa: E402


@pytest.mark.parametrize("variant,overrides", [
    ("tiny", {}),
    ("tiny", {"password_mode": "cross_attention", "recover_from": "image"}),
    ("tiny", {"password_mode": "modulation", "password_key": "none", "med_channels": 0}),
    ("synth", {}),
])
def test_twin_parameter_counts_equal_ours(variant, overrides):
    setup = suite.deid_setup(variant, {"tiny": 32, "synth": 64}[variant])
    setup["config"].model.update(overrides)
    ours, theirs = suite.deid_parameter_counts(setup)
    assert set(ours) == {"generator", "discriminator", "identity", "medical_unet"}
    assert ours == theirs
    assert all(n > 0 for n in ours.values())


def test_conv_flops_are_xlas_exactly():
    import jax
    import jax.numpy as jnp

    for h, k, s, p in ((4, 3, 1, 1), (7, 3, 2, 1), (2, 3, 1, 1), (9, 4, 2, 1), (5, 1, 1, 0)):
        x = jax.ShapeDtypeStruct((2, 5, h, h), jnp.float32)
        w = jax.ShapeDtypeStruct((6, 5, k, k), jnp.float32)
        conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (s, s), [(p, p), (p, p)]))  # noqa: B023
        xla = workload_common._cost(conv.lower(x, w).cost_analysis())
        assert workload_common.conv_flops(2, h, h, 5, 6, k=k, s=s, p=p)[0] == xla, (h, k, s, p)


def _table_rows(text):
    """{workload: [cells]} of the first table (the one with the JAX/PyTorch columns)."""
    table = text.split("| workload | size |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def _numbers(cell):
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", cell)]


def test_quick_suite_writes_every_workload_row_with_finite_numbers(tmp_path):
    out = tmp_path / "suite.md"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # one CPU device, not the tests' eight
    # One timed call after the first: the smoke test checks the rows, not the timings (14 s less CPU).
    cmd = [sys.executable, "benchmarks/suite.py", "--profile", "cpu", "--quick", "--threads", "1", "--warmup", "0",
           "--repeats", "1", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = out.read_text()
    assert "- machine:" in text and "torch " in text and "jax " in text and "CPU peak = 1 cores x" in text
    rows = _table_rows(text)
    assert sorted(rows) == sorted(suite.WORKLOADS)
    for name, cells in rows.items():
        # workload | size | JAX ms | PyTorch ms | JAX/PyTorch | JAX img/s | PyTorch img/s | TFLOP/s | MFU
        assert len(cells) == 9, cells
        values = [v for cell in cells[2:] for v in _numbers(cell)]
        assert len(values) == 9, (name, cells)  # TFLOP/s and MFU hold one value per framework
        assert all(math.isfinite(v) and v > 0 for v in values), (name, cells)
    check = re.search(r"small UNet b2 16x16: analytic ([\d.]+) GFLOP, XLA ([\d.]+) GFLOP .*analytic/XLA = ([\d.]+)", text)
    assert check, text
    assert 1 - suite.FLOP_CHECK_TOLERANCE <= float(check[3]) <= 1.0
