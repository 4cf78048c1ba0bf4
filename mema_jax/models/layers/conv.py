"""How a 2-D NHWC convolution is lowered: ``lax.conv_general_dilated`` or im2col + one matmul,
chosen separately for the forward pass and for the gradients.

XLA's CPU convolution (XLA's own Eigen kernel: ``mema_jax.core.compile`` keeps convolutions out of
YNNPACK) is slow in two places, where the same convolution as patches (pad + kh*kw strided slices
concatenated on the channel axis) times one (kh*kw*in, out) matmul is fast:

  * maps smaller than the kernel (2x2 with a 3x3 kernel): the simplifier swaps the operands
    (``window={size=2x2 rhs_reversal}``), reverses the whole kernel and runs a generic
    convolution: 3x3, 1280 channels at 2x2, one core: 227 ms vs 10 ms as im2col (PyTorch 7 ms).
    The SD1.5 UNet's 1280-channel levels run at 1/8 of the latent, 2x2 at 16x16 latents.
  * gradients at batch 1-2 with up to 320 channels: the kernel gradient is a convolution whose
    feature axis is the batch, and the input gradient of a strided convolution a convolution of
    a zero-dilated input; as im2col both are matmuls (1.2-3.6x faster at every map size measured);
  * gradients of large kernels on few output rows (the SD1.5 UNet's 1280-channel levels): the
    input gradient transposes the whole kernel in memory first (an SD1.5 LoRA step spent 1.7 s of
    3.9 in such copies); im2col's is one matmul with the kernel as it is (2.5-8x faster).

Elsewhere ``lax.conv`` is as fast or faster (large maps: im2col's patches cost kh*kw times the
input's memory traffic), and on GPU/TPU the convolution goes to cuDNN / the TPU convolution unit,
which im2col would only slow down, so there it is never used by default.

``conv_impl``:
  * ``"xla"``: always ``lax.conv_general_dilated``;
  * ``"im2col"``: always patches + matmul (any backend; for tests and measurements);
  * ``"auto"`` (default): on CPU, per direction (``choose_conv_impl``), for kernels larger than
    1x1 or strided (a 1x1 stride-1 convolution: ``lax.conv``, but im2col's gradients for a large
    kernel on few rows, as below):
      forward:   im2col if the output map (H_out * W_out per image) has at most
                 ``AUTO_TINY_MAP`` pixels, or at most ``AUTO_FORWARD_MAX_PIXELS`` with a kernel
                 of at most ``AUTO_SMALL_KERNEL`` elements and at most ``AUTO_FORWARD_MAX_ROWS``
                 output rows (batch * pixels);
      gradients: im2col if the output map has at most ``AUTO_TINY_MAP`` pixels, or a larger kernel
                 has at most ``AUTO_BACKWARD_LARGE_KERNEL_MAX_ROWS`` output rows, or the kernel has
                 at most ``AUTO_SMALL_KERNEL`` elements and either the batch is at most
                 ``AUTO_BACKWARD_MAX_BATCH`` with at most ``AUTO_BACKWARD_MAX_PATCHES`` patch
                 elements (rows * kh * kw * in), or the map has at most
                 ``AUTO_BACKWARD_SMALL_MAP`` pixels and the batch at most
                 ``AUTO_BACKWARD_SMALL_MAP_BATCH``;
    ``lax.conv_general_dilated`` otherwise.  When the two differ, the convolution is a
    ``jax.custom_vjp`` whose forward runs one lowering and whose gradients are those of the other
    (the same function: only the summation order differs).

A x2 nearest-neighbour upsample followed by a 3x3 convolution (``Conv(..., upsample=2)``, the
Upsample2D of the UNet, the VAE and MedSem-DeID's decoder) is, with ``impl="auto"`` on CPU and at
least ``AUTO_FOLD_MIN_ROWS`` input rows (batch * pixels of the map before the upsample), folded:
output pixel (2i + p, 2j + q) only sees input rows (i - 1, i) for p = 0 and (i, i + 1) for p = 1
(and the same for columns), so the four output phases are four 2x2 convolutions of the map before
the upsample, with kernels summed from the 3x3 one, interleaved.  16 multiply-adds per input pixel
and channel pair instead of 36, and no upsampled copy of the input (nor its transposed copy for the
kernel gradient); below that size, and on GPU/TPU (not measured there), the upsample is done first.

All lowerings give the same values up to fp32 summation order (tests/test_conv_lowering.py).
Dilated, grouped or non-NHWC convolutions, and paddings other than non-negative pairs / "SAME" /
"VALID", always use ``lax.conv_general_dilated``.

The backend is read when the function is traced (``mema_jax.core.compile.trace_platform``).  A
function already compiled keeps the lowering it was traced with, so change the default
(``set_default_conv_impl`` / ``default_conv_impl``) before tracing.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from mema_jax.core.compile import trace_platform

CONV_IMPLS = ("auto", "xla", "im2col")

# Thresholds measured on CPU: benchmarks/results/conv_lowering.md (python benchmarks/bench_unet.py --conv-shapes).
AUTO_TINY_MAP = 4
AUTO_SMALL_KERNEL = 9 * 320 * 320
AUTO_FORWARD_MAX_PIXELS = 64
AUTO_FORWARD_MAX_ROWS = 256
AUTO_BACKWARD_MAX_BATCH = 2
AUTO_BACKWARD_MAX_PATCHES = 1 << 22
AUTO_BACKWARD_SMALL_MAP = 16
AUTO_BACKWARD_SMALL_MAP_BATCH = 16
# Large kernels on few output rows: im2col's gradients (benchmarks/results/conv_lowering.md).
AUTO_BACKWARD_LARGE_KERNEL_MAX_ROWS = 256
# The fold pays from this many input rows on (benchmarks/results/conv_lowering.md).
AUTO_FOLD_MIN_ROWS = 512
DIRECTIONS = ("forward", "backward")

_default_impl = "auto"


def check_conv_impl(impl: str) -> str:
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    return impl


def get_default_conv_impl() -> str:
    """The lowering ``conv2d(..., conv_impl=None)`` layers use (module-wide, initially "auto")."""
    return _default_impl


def set_default_conv_impl(impl: str) -> None:
    """Sets the module-wide default lowering; affects functions traced afterwards."""
    global _default_impl
    _default_impl = check_conv_impl(impl)


@contextlib.contextmanager
def default_conv_impl(impl: str) -> Iterator[None]:
    """``with default_conv_impl("xla"): jax.jit(f)(...)``: the default while tracing inside."""
    previous = _default_impl
    set_default_conv_impl(impl)
    try:
        yield
    finally:
        set_default_conv_impl(previous)


def explicit_padding(padding, input_hw: Sequence[int], kernel_hw: Sequence[int],
                     strides: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
    """``padding`` as (lo, hi) pairs for the two spatial axes: explicit pairs as given, "VALID",
    "SAME" or "SAME_LOWER" as lax computes them; None for what im2col does not take (negative
    pairs, other strings)."""
    if isinstance(padding, str):
        if padding.upper() not in ("VALID", "SAME", "SAME_LOWER"):
            return None
        return tuple((int(lo), int(hi)) for lo, hi in
                     lax.padtype_to_pads(tuple(input_hw), tuple(kernel_hw), tuple(strides), padding.upper()))
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pairs) != 2 or any(lo < 0 or hi < 0 for lo, hi in pairs):
        return None
    return pairs


def output_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // stride + 1


def choose_conv_impl(impl: str, input_shape: Sequence[int], kernel_shape: Sequence[int],
                     strides: Sequence[int], padding, backend: str | None = None, direction: str = "forward") -> str:
    """"xla" or "im2col" for an NHWC input and HWIO kernel under ``impl``, for the forward pass or for
    the gradients (``direction="backward"``); see the module doc."""
    impl = check_conv_impl(impl)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if impl != "auto":
        return impl
    backend = trace_platform() if backend is None else backend
    if backend != "cpu":
        return "xla"
    kh, kw = kernel_shape[:2]
    pads = explicit_padding(padding, input_shape[1:3], (kh, kw), strides)
    if pads is None:
        return "xla"
    batch = input_shape[0]
    pixels = output_size(input_shape[1], kh, strides[0], pads[0]) * output_size(input_shape[2], kw, strides[1], pads[1])
    small_kernel = int(np.prod(kernel_shape)) <= AUTO_SMALL_KERNEL
    if kh == kw == 1 and tuple(strides) == (1, 1):
        # Already one matmul in XLA, but its input gradient transposes a large kernel in memory first.
        large_few = not small_kernel and batch * pixels <= AUTO_BACKWARD_LARGE_KERNEL_MAX_ROWS
        return "im2col" if direction == "backward" and large_few else "xla"
    if pixels <= AUTO_TINY_MAP:
        return "im2col"
    if direction == "forward":
        return "im2col" if (small_kernel and pixels <= AUTO_FORWARD_MAX_PIXELS
                            and batch * pixels <= AUTO_FORWARD_MAX_ROWS) else "xla"
    if not small_kernel:
        return "im2col" if batch * pixels <= AUTO_BACKWARD_LARGE_KERNEL_MAX_ROWS else "xla"
    patches = batch * pixels * kh * kw * kernel_shape[2]
    few = batch <= AUTO_BACKWARD_MAX_BATCH and patches <= AUTO_BACKWARD_MAX_PATCHES
    small_map = pixels <= AUTO_BACKWARD_SMALL_MAP and batch <= AUTO_BACKWARD_SMALL_MAP_BATCH
    return "im2col" if small_kernel and (few or small_map) else "xla"


def im2col_conv(x, kernel, strides: Sequence[int] = (1, 1), padding=((0, 0), (0, 0)), *,
                precision: Any = None, preferred_element_type: Any = None):
    """NHWC ``x`` (B, H, W, C) * HWIO ``kernel`` (kh, kw, C, O) as patches @ kernel.

    Equals ``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC",
    "HWIO", "NHWC"))`` for explicit non-negative ``padding`` pairs (or "VALID"): the patch of
    output pixel (i, j) is x_pad[s*i + a, s*j + b, :] for a < kh, b < kw, concatenated in (a, b, c)
    order, which is the row order of ``kernel.reshape(kh * kw * C, O)``.  String paddings
    ("SAME", "VALID", "SAME_LOWER") are turned into those pairs as lax does.
    """
    kh, kw, c_in, c_out = kernel.shape
    if x.shape[-1] != c_in:
        raise ValueError(f"input has {x.shape[-1]} channels, kernel expects {c_in}")
    pads = explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
    if pads is None:
        raise ValueError(f"im2col takes non-negative (lo, hi) padding pairs, 'VALID' or 'SAME', got {padding!r}")
    sh, sw = tuple(strides)
    if any(pads[0]) or any(pads[1]):
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    batch, height, width, _ = x.shape
    h_out, w_out = (height - kh) // sh + 1, (width - kw) // sw + 1
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"kernel {kh}x{kw} does not fit the padded {height}x{width} input")
    if kh == kw == 1:
        patches = x[:, : sh * (h_out - 1) + 1 : sh, : sw * (w_out - 1) + 1 : sw, :]
    else:
        patches = jnp.concatenate(
            [
                lax.slice(x, (0, a, b, 0), (batch, a + sh * (h_out - 1) + 1, b + sw * (w_out - 1) + 1, c_in),
                          (1, sh, sw, 1))
                for a in range(kh)
                for b in range(kw)
            ],
            axis=-1,
        )
    out = lax.dot_general(
        patches.reshape(batch * h_out * w_out, kh * kw * c_in),
        kernel.reshape(kh * kw * c_in, c_out),
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return out.reshape(batch, h_out, w_out, c_out)


# Folding a x2 nearest upsample into a 3x3 / padding-1 convolution: output row 2i + p reads upsampled
# rows 2i + p - 1 .. 2i + p + 1, i.e. input rows (i - 1, i, i) for p = 0 and (i, i, i + 1) for p = 1.
# FOLD_TAPS[p] maps the 3 kernel rows onto the 2 input rows a phase reads; FOLD_PADS[p] pads for them.
FOLD_TAPS = (np.array([[1, 0, 0], [0, 1, 1]], np.float32), np.array([[1, 1, 0], [0, 0, 1]], np.float32))
FOLD_PADS = ((1, 0), (0, 1))


def choose_upsample_fold(impl: str, input_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
                         padding, backend: str | None = None) -> bool:
    """Whether ``Conv(..., upsample=2)`` folds the upsample into the convolution (see the module doc)."""
    if check_conv_impl(impl) != "auto" or tuple(kernel_shape[:2]) != (3, 3) or tuple(strides) != (1, 1):
        return False
    if explicit_padding(padding, [2 * s for s in input_shape[1:3]], (3, 3), strides) != ((1, 1), (1, 1)):
        return False
    backend = trace_platform() if backend is None else backend
    return backend == "cpu" and input_shape[0] * input_shape[1] * input_shape[2] >= AUTO_FOLD_MIN_ROWS


def upsample2x_nearest(x):
    """NHWC ``x`` with every pixel repeated 2x2 (torch ``F.interpolate(scale_factor=2)``, nearest)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsample2x_conv_folded(x, kernel, *, impl: str = "auto", precision: Any = None):
    """``conv(upsample2x_nearest(x), kernel)`` for a 3x3 HWIO kernel with padding 1 on every side,
    as four 2x2 convolutions of ``x`` (one per output phase, each lowered per ``impl``) interleaved."""
    if tuple(kernel.shape[:2]) != (3, 3):
        raise ValueError(f"folding takes a 3x3 kernel, got {kernel.shape[:2]}")
    taps = [jnp.asarray(t, kernel.dtype) for t in FOLD_TAPS]
    rows = []
    for p in range(2):
        phases = [conv_nhwc(x, jnp.einsum("ab,cd,bdio->acio", taps[p], taps[q], kernel, precision=lax.Precision.HIGHEST),
                            (1, 1), (FOLD_PADS[p], FOLD_PADS[q]), impl=impl, precision=precision)
                  for q in range(2)]
        rows.append(jnp.stack(phases, axis=3))  # (B, H, W, q, O)
    y = jnp.stack(rows, axis=2)  # (B, H, p, W, q, O)
    batch, height, _, width, _, out = y.shape
    return y.reshape(batch, 2 * height, 2 * width, out)


def _lowered(impl: str, x, kernel, strides, padding, precision, preferred_element_type=None):
    if impl == "im2col":
        return im2col_conv(x, kernel, strides, padding, precision=precision,
                           preferred_element_type=preferred_element_type)
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=precision, preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _split_conv(x, kernel, strides, padding, forward: str, backward: str, precision):
    """The convolution lowered as ``forward``, with the gradients of its ``backward`` lowering."""
    return _lowered(forward, x, kernel, strides, padding, precision)


def _split_conv_fwd(x, kernel, strides, padding, forward, backward, precision):
    return _lowered(forward, x, kernel, strides, padding, precision), (x, kernel)


def _split_conv_bwd(strides, padding, forward, backward, precision, residuals, d_out):
    x, kernel = residuals
    # The backward lowering's own forward output is unused here, so XLA drops it.
    _, vjp = jax.vjp(lambda x, k: _lowered(backward, x, k, strides, padding, precision), x, kernel)
    return vjp(d_out)


_split_conv.defvjp(_split_conv_fwd, _split_conv_bwd)


def conv_nhwc(x, kernel, strides: Sequence[int] = (1, 1), padding=((0, 0), (0, 0)), *, impl: str | None = None,
              precision: Any = None, preferred_element_type: Any = None):
    """An NHWC / HWIO convolution lowered as ``impl`` says ("auto": ``choose_conv_impl`` for the forward
    pass and for the gradients; None: the module-wide default)."""
    strides = tuple(strides)
    impl = get_default_conv_impl() if impl is None else impl
    pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    if pads is None:
        return _lowered("xla", x, kernel, strides, padding, precision, preferred_element_type)
    forward, backward = (choose_conv_impl(impl, x.shape, kernel.shape, strides, pads, direction=d) for d in DIRECTIONS)
    if forward == backward or preferred_element_type is not None:
        return _lowered(forward, x, kernel, strides, pads, precision, preferred_element_type)
    return _split_conv(x, kernel, strides, pads, forward, backward, precision)


def _is_nhwc(dimension_numbers) -> bool:
    """flax passes ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))."""
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(map(tuple, dimension_numbers)) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


class _Lowering:
    """A ``conv_general_dilated`` stand-in for flax ``nn.Conv(conv_general_dilated_cls=...)``.

    flax calls ``conv_general_dilated_cls()`` and then the instance with lax's arguments; one class
    per ``conv_impl`` keeps the module's fields hashable and comparable (a class is both).  ``impl``
    None: the module-wide default (``get_default_conv_impl``) when the call is traced."""

    impl: str | None = None
    upsample: int = 1  # 2: lhs is the map before a x2 nearest upsample (Conv(..., upsample=2))

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                 preferred_element_type=None):
        impl = get_default_conv_impl() if self.impl is None else self.impl
        if self.upsample == 2:
            if not _is_nhwc(dimension_numbers) or lhs.ndim != 4:
                raise ValueError("Conv(upsample=2) takes NHWC inputs")
            if (choose_upsample_fold(impl, lhs.shape, rhs.shape, window_strides, padding)
                    and preferred_element_type is None and feature_group_count == batch_group_count == 1
                    and all(d == 1 for d in (lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1)))):
                return upsample2x_conv_folded(lhs, rhs, impl=impl, precision=precision)
            lhs = upsample2x_nearest(lhs)
        simple = (
            lhs.ndim == 4
            and _is_nhwc(dimension_numbers)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and feature_group_count == 1
            and batch_group_count == 1
        )
        if simple:
            return conv_nhwc(lhs, rhs, window_strides, padding, impl=impl, precision=precision,
                             preferred_element_type=preferred_element_type)
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count,
                                        batch_group_count=batch_group_count, precision=precision,
                                        preferred_element_type=preferred_element_type)


class DefaultLowering(_Lowering):
    impl = None


class AutoLowering(_Lowering):
    impl = "auto"


class XlaLowering(_Lowering):
    impl = "xla"


class Im2colLowering(_Lowering):
    impl = "im2col"


LOWERINGS = {None: DefaultLowering, "auto": AutoLowering, "xla": XlaLowering, "im2col": Im2colLowering}
# The same, for a convolution of the x2 nearest-upsampled input (one class each: flax compares them).
UPSAMPLE2X_LOWERINGS = {impl: type(cls.__name__.replace("Lowering", "Upsample2xLowering"), (cls,), {"upsample": 2})
                        for impl, cls in LOWERINGS.items()}


def lowering_class(conv_impl: str | None, upsample: int = 1) -> type[_Lowering]:
    """The ``conv_general_dilated_cls`` for ``conv_impl`` (None: the module-wide default at trace time),
    of the input as it is (``upsample=1``) or upsampled x2 nearest first (``upsample=2``)."""
    if conv_impl is not None:
        check_conv_impl(conv_impl)
    if upsample not in (1, 2):
        raise ValueError(f"upsample must be 1 or 2, got {upsample!r}")
    return (LOWERINGS if upsample == 1 else UPSAMPLE2X_LOWERINGS)[conv_impl]


def Conv(features: int, kernel_size: Sequence[int], *, conv_impl: str | None = None, upsample: int = 1,  # noqa: N802
         **kwargs) -> nn.Conv:
    """A flax ``nn.Conv`` (same fields, same parameters: ``kernel`` (kh, kw, in, out) and ``bias``
    (out,)) whose convolution is lowered per ``conv_impl`` ("auto" / "xla" / "im2col"; None, the
    default: the module-wide default when traced, see ``set_default_conv_impl``).  ``upsample=2``:
    the convolution of the input upsampled x2 (nearest, torch ``F.interpolate(scale_factor=2)``),
    folded into it where that pays (module doc).

    It is an ``nn.Conv`` itself (only ``conv_general_dilated_cls`` is set), so parameter trees,
    names, converters and strict loaders see exactly what a plain ``nn.Conv`` gives."""
    if "conv_general_dilated" in kwargs or "conv_general_dilated_cls" in kwargs:
        raise TypeError("Conv sets conv_general_dilated_cls itself; pass conv_impl instead")
    return nn.Conv(features, kernel_size, conv_general_dilated_cls=lowering_class(conv_impl, upsample), **kwargs)
