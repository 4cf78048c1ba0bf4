"""Error measure and tolerance rules shared by the parity tests (a plain module, not a test module).

Two rules, one per kind of check:

* Tiny models, fp32 against PyTorch fp32: ``rel_err(ours, torch) <= FP32_TOL`` (1e-5).  A few
  layers of width <= 64 round far less than that (measured 1e-7 .. 3e-6), so the fixed bound
  holds on any CPU while still catching a wrong weight, order or constant.

* Full-size models, and every reduced-precision (bf16) check: the reference is the PyTorch model
  run in float64 (``model.double()``, inputs in double), and our error against it must be at most
  ``FACTOR`` (2) times PyTorch's own error against it at the same precision, or a stated floor:

      rel_err(ours, ref64) <= max(FACTOR * rel_err(torch, ref64), floor)

  A fixed bound such as 1e-5 for a deep fp32 model sits inside fp32's own noise (PyTorch's fp32
  error on the SD1.5 VAE decoder is 6e-6), so whether it passes depends on the CPU's kernels.
  PyTorch's error, measured on the same machine, moves with those kernels; the factor 2 allows
  for a different summation order without letting a real bug (errors of 1e-3 and up) through.
"""
from __future__ import annotations

import numpy as np

FP32_TOL = 1e-5
FACTOR = 2.0
# The floor applies only where PyTorch's own error is unusually small.  fp32's unit roundoff is
# 2**-24 = 6e-8; the full-size models chain a few hundred rounded ops (the UNet ~300, the VAE ~100,
# the 12-layer text tower ~100), and independent roundings add up like a random walk,
# ~sqrt(300) * 6e-8 = 1e-6.  Below that a difference between two fp32 implementations is noise.
FP32_FLOOR = 1e-6
# bf16 keeps 8 significant bits: unit roundoff 2**-8 = 3.9e-3, the error of rounding the output
# alone.  A bf16 network cannot be expected to do better than that, whatever PyTorch manages.
BF16_FLOOR = 2.0**-8


def as_float64(x) -> np.ndarray:
    """numpy / jax (any float dtype, bf16 included) / torch -> float64 numpy."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x).astype(np.float64)


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| over all elements, in float64."""
    ours, ref = as_float64(ours), as_float64(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def assert_float64_parity(name: str, ours, torch_out, ref64, *, floor: float = FP32_FLOOR) -> tuple[float, float]:
    """The float64 rule: asserts rel_err(ours, ref64) <= max(FACTOR * rel_err(torch_out, ref64), floor).

    ``torch_out`` is PyTorch's output at the precision under test (fp32, or bf16 with
    ``floor=BF16_FLOOR``), ``ref64`` the same PyTorch model's float64 output.  Prints and returns
    (err_ours, err_torch).
    """
    err_ours, err_torch = rel_err(ours, ref64), rel_err(torch_out, ref64)
    bound = max(FACTOR * err_torch, floor)
    summary = (f"{name}: ours vs float64 {err_ours:.2e}, torch vs float64 {err_torch:.2e}; "
               f"bound max({FACTOR:g} x {err_torch:.2e}, floor {floor:.1e}) = {bound:.2e}")
    print(summary)
    assert err_ours <= bound, summary
    return err_ours, err_torch
