"""``jit``: ``jax.jit`` with the XLA compiler options this project compiles every function with.

On CPU, XLA (jax 0.10.2) hands some ops to YNNPACK as "library fusions"
(``xla_cpu_experimental_ynn_fusion_type``; by default individual dots, individual convolutions
and reductions), the rest to its own kernels (Eigen).  Measured on one core of a Xeon (AVX-512),
fp32, ms, YNNPACK / XLA's own (``benchmarks/profile_ops.py``, and single ops):

    3x3 conv, NHWC                       forward        kernel gradient
    8 x 64 x 64, 64 -> 32                               38.0 / 10.2
    8 x 32 x 32, 128 -> 64                              14.7 /  8.5
    1 x 128 x 128, 128 -> 128            26.8 / 25.0    186  / 72.7
    1 x 32 x 32, 512 -> 512              29.9 / 24.2    70.9 / 37.9
    matmul x @ w                         4096 x 512 @ 512 x 512: 11.5 / 9.95;  2048^3: 100 / 82
    matmul dy @ w^T (a layer's input     4 x 23040 @ (1280 x 23040)^T: 28 / 163 (PyTorch 15)
      gradient: w contracted on its      16 x 1280 @ (10240 x 1280)^T: 9.5 / 139 (PyTorch 6.1)
      minor axis)                        256 x 1280 @ (5120 x 1280)^T: 23 / 84 (PyTorch 21)

So: convolutions never go to YNNPACK (XLA's own is faster, most of all for kernel gradients,
which XLA writes as a convolution whose window is the whole image and whose feature axis is the
batch); reductions always do (1.5-2x faster on the norms' statistics); dots go to XLA's own GEMM
in functions that are only evaluated (``training=False``: sampling, de-identification,
evaluation; Eigen's GEMM reaches 216 GFLOP/s here against YNNPACK's 186) and to YNNPACK in
training steps (``training=True``), whose backward pass is full of dy @ w^T products, where
Eigen's GEMM with a small dy is 3.7-15x slower.  On GPU/TPU no option is added.

A user's own ``--xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` wins (nothing is added),
and ``MEMA_XLA_CPU_DEFAULTS=1`` compiles with XLA's defaults (for comparisons).  A jaxlib that
does not know the option (renamed in a later release) gets XLA's defaults, with one warning.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
CPU_TRAINING_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def trace_platform() -> str:
    """The platform the computation being traced will run on, as far as the config tells:
    ``jax.config.jax_default_device``'s if one is set, else ``jax.default_backend()``."""
    device = jax.config.jax_default_device
    if device is not None:
        return device if isinstance(device, str) else device.platform
    return jax.default_backend()


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple) -> bool:
    """Whether this jaxlib compiles with ``options`` (probed once on a trivial function)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
        return True
    except Exception as e:  # noqa: BLE001 - any refusal means: use XLA's defaults
        warnings.warn(f"XLA did not take the CPU compiler options {dict(options)} ({str(e)[:160]}); "
                      "compiling with its defaults", stacklevel=3)
        return False


def compiler_options(platform: str | None = None, training: bool = False) -> dict[str, Any]:
    """The options ``jit`` adds for ``platform`` (default: the platform being compiled for), for a
    function that is only evaluated or (``training``) a training step with its backward pass."""
    platform = trace_platform() if platform is None else platform
    if platform != "cpu" or os.environ.get("MEMA_XLA_CPU_DEFAULTS") == "1":
        return {}
    if "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return {}
    options = CPU_TRAINING_OPTIONS if training else CPU_OPTIONS
    return dict(options) if _accepted(tuple(options.items())) else {}


def jit(fun=None, *, training: bool = False, **kwargs):
    """``jax.jit(fun, **kwargs)`` compiled with ``compiler_options(training=training)`` (merged under
    the caller's own ``compiler_options``).  ``training=True`` for a function that takes gradients
    (a training step).  Usable as ``jit(f, ...)`` or ``@functools.partial(jit, ...)``."""
    if fun is None:
        return functools.partial(jit, training=training, **kwargs)
    options = dict(compiler_options(training=training), **(kwargs.pop("compiler_options", None) or {}))
    if not options:
        return jax.jit(fun, **kwargs)
    return _WithOptions(fun, jax.jit(fun, compiler_options=options, **kwargs), jax.jit(fun, **kwargs))


class _WithOptions:
    """A jitted function with compiler options that may also be called inside another jitted function:
    jax takes ``compiler_options`` only on the outermost jit, so a call whose arguments are tracers
    goes to the same function jitted without them (inlined into the caller, compiled with the
    caller's options).  Every other attribute (``lower``, ``trace``, ...) is the top-level one's;
    ``__wrapped__`` is the Python function."""

    def __init__(self, fun, top_level, nested):
        self._top_level, self._nested = top_level, nested
        functools.update_wrapper(self, fun)

    def __call__(self, *args, **kwargs):
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        return (self._nested if traced else self._top_level)(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._top_level, name)


def use_persistent_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process (entry points call it before
    compiling): a restarted or resumed run, and every later run of the same programs, loads them
    from disk instead of compiling them again.  ``$JAX_COMPILATION_CACHE_DIR`` wins (set it empty
    to turn the cache off); otherwise ``$XDG_CACHE_HOME/mema_jax/xla`` (``~/.cache/mema_jax/xla``).
    Returns the folder in use, or None when off."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        folder = os.environ["JAX_COMPILATION_CACHE_DIR"] or None
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "mema_jax", "xla")
        jax.config.update("jax_compilation_cache_dir", folder)
    return folder
