"""The machine a benchmark runs on: CPU model and SIMD width, peak FLOP/s (the table for GPUs,
the formula or a measured GEMM for CPUs), and pinning both frameworks to the same cores."""
from __future__ import annotations

import os
import platform
import time


# Dense peaks (TFLOP/s) by GPU name fragment and precision.
GPU_PEAKS = {"H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}, "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
             "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}}


def cpu_info() -> dict:
    model, mhz, flags = platform.processor() or "unknown CPU", [], set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                model = value
            elif key == "cpu MHz":
                mhz.append(float(value))
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if "avx512f" in flags and "fma" in flags:
        simd, per_cycle = "AVX-512 FMA", 64
    elif "avx2" in flags and "fma" in flags:
        simd, per_cycle = "AVX2 FMA", 32
    else:
        simd, per_cycle = "SSE", 8
    return {"model": model, "ghz": (max(mhz) / 1000.0) if mhz else 2.0, "simd": simd, "flop_per_cycle": per_cycle,
            "cores_total": os.cpu_count()}


def cpu_peak(cores: int, info: dict) -> tuple[float, str]:
    peak = cores * info["ghz"] * info["flop_per_cycle"] / 1000.0
    return peak, (f"CPU peak = {cores} cores x {info['ghz']:.2f} GHz x {info['flop_per_cycle']} fp32 FLOP/cycle "
                  f"({info['simd']}) = {peak * 1000:.1f} GFLOP/s")


def measured_gemm_peak(size: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """(XLA, PyTorch) best fp32 GFLOP/s of one size^3 matmul on the pinned cores: what the cores
    really reach (a VM's ``cpu MHz`` is its nominal clock; turbo runs above it)."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from mema_jax.core.compile import jit

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), np.float32) for _ in range(2))
    xa, xb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    matmul = jit(jnp.matmul)
    best = {}
    for name, fn in (("xla", lambda: matmul(xa, xb).block_until_ready()), ("torch", lambda: ta @ tb)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best[name] = 2 * size**3 / min(times) / 1e9
    return best["xla"], best["torch"]


def cpu_peak_measured(cores: int, info: dict) -> tuple[float, str]:
    """The larger of the nominal peak and the measured fp32 GEMM peak (TFLOP/s, with its formula)."""
    nominal, formula = cpu_peak(cores, info)
    xla, torch_ = measured_gemm_peak()
    measured = max(xla, torch_) / 1000.0
    if measured <= nominal:
        return nominal, formula + f" (measured 2048^3 fp32 GEMM: XLA {xla:.0f}, PyTorch {torch_:.0f} GFLOP/s)"
    return measured, (f"measured fp32 GEMM peak on {cores} core(s) = max(XLA {xla:.0f}, PyTorch {torch_:.0f}) = "
                      f"{measured * 1000:.0f} GFLOP/s, above the nominal {formula} (the VM reports its base "
                      "clock; the cores run faster)")


def gpu_peak(name: str, precision: str) -> tuple[float, str]:
    if name.startswith("the GPU"):  # dry run
        return GPU_PEAKS["H100"][precision], (f"{precision}: by {name} from " + ", ".join(
            f"{k} {t[precision]}" for k, t in GPU_PEAKS.items()) + " TFLOP/s (dense, SXM)")
    for key, table in GPU_PEAKS.items():
        if key in name:
            return table[precision], f"{name}: dense {precision} peak {table[precision]} TFLOP/s (table, {key} SXM)"
    table = GPU_PEAKS["H100"]
    return table[precision], f"{name}: unknown GPU, assuming H100 SXM dense {precision} {table[precision]} TFLOP/s"


def pin_threads(threads: int | None) -> int:
    """Pins the process to ``threads`` cores (before jax/torch load) and sets the OpenMP/MKL env."""
    cores = sorted(os.sched_getaffinity(0))
    n = min(threads or len(cores), len(cores))
    os.sched_setaffinity(0, cores[:n])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    return n
