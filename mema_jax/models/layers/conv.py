"""How a 2-D NHWC convolution is lowered: ``lax.conv_general_dilated`` or im2col + one matmul.

XLA's CPU convolution is slow on small spatial maps with many channels: 3x3, 1280 channels at
2x2 takes 8-30x longer than PyTorch's conv2d on one core, and up to 16x16 it stays 1.5-4x slower
once the kernel has 640x640 channels or more (table below), while the same convolution as
patches (pad + kh*kw strided slices concatenated on the channel axis) times one
(kh*kw*in, out) matmul runs near PyTorch.  That is where the SD1.5 UNet spends its CPU time at
small latents (its 1280-channel levels run at 1/4 and 1/8 of the latent).  On GPU/TPU the
convolution goes to cuDNN / the TPU convolution unit, which im2col would only slow down (and
its patches cost kh*kw times the input's memory), so there it is never used by default.

Why XLA:CPU is slow there (jax 0.10.2, compiled HLO): when the map is smaller than the kernel
(2x2 with a 3x3 kernel) the simplifier swaps the operands (``window={size=2x2 rhs_reversal}``)
and adds a ``reverse`` of the whole kernel (~130-220 ms per 1280x1280 kernel), and the result
runs on the generic (Eigen) convolution, 0.4-0.9 s per 1280-channel conv; from 4x4 up it is a
YNNPACK convolution, which still re-reads large kernels while im2col's matmul streams them once.
SD1.5 UNet forward, 16x16 latents, one core, calls interleaved with diffusers: 9.2 s with
"xla", 1.6 s with "auto", diffusers 1.7 s.

``conv_impl``:
  * ``"xla"``: always ``lax.conv_general_dilated``;
  * ``"im2col"``: always patches + matmul (any backend; for tests and measurements);
  * ``"auto"`` (default): im2col when the computation is traced for the CPU backend, the kernel
    is larger than 1x1 or strided, and the output map (H_out * W_out per image) has at most
    ``AUTO_IM2COL_MAX_PIXELS`` pixels, or, when the conv is strided or its kernel has at least
    ``AUTO_IM2COL_LARGE_KERNEL`` elements, the whole output (batch * H_out * W_out, the rows of
    the matmul) has at most ``AUTO_IM2COL_LARGE_MAX_ROWS``; ``lax.conv_general_dilated``
    otherwise.

Both give the same values up to fp32 summation order (tests/test_conv_lowering.py), and both
differentiate (the im2col gradients are a matmul and the transposes of pad/slice/concatenate).
Dilated, grouped or non-NHWC convolutions, and paddings other than non-negative pairs / "SAME" /
"VALID", always use ``lax.conv_general_dilated``.

The backend is read when the function is traced: ``jax.config.jax_default_device``'s platform if
one is set, else ``jax.default_backend()``.  A function already compiled keeps the lowering it
was traced with, so change the default (``set_default_conv_impl`` / ``default_conv_impl``) before
tracing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

CONV_IMPLS = ("auto", "xla", "im2col")

# The "auto" thresholds (CPU only).  Measured with ``benchmarks/bench_unet.py --conv-shapes`` on
# one core of a shared 2-core Xeon (load 5-15, so absolute figures are contended; the lowerings
# and PyTorch take turns call by call, so their ratios much less), jax 0.10.2, torch 2.14, fp32,
# 3x3, padding 1, minimum of 5 calls; ms, lax.conv / im2col (x: lax.conv time / im2col time,
# > 1 im2col faster), forward and forward+backward (gradients w.r.t. input and kernel), and
# PyTorch conv2d.  Stride 1, batch 1, in = out channels unless IN:OUT or b=:
#
#   out map  channels         fwd xla / im2col      fwd+bwd xla / im2col    PyTorch fwd | fwd+bwd
#   2x2      320              8.2 / 0.62  (13x)     24   / 2.1   (11x)      0.96 | 4.1
#   2x2      640              50  / 3.5   (14x)     126  / 17    (7.3x)     3.0  | 22
#   2x2      1280             504 / 41    (12x)     1210 / 112   (11x)      15   | 113
#   2x2      32..128, b=2     2-14x                 3-15x                   (< 1.2 ms)
#   4x4      320              0.53 / 0.47 (1.1x)    8.2  / 2.0   (4.1x)     0.55 | 4.6
#   4x4      640              13  / 3.8   (3.4x)    30   / 7.4   (4.1x)     2.6  | 9.0
#   4x4      1280             55  / 24    (2.4x)    317  / 126   (2.5x)     9.6  | 111
#   4x4      32..128, b=2     0.7-1.0x              0.7-1.3x                (< 1.4 ms)
#   8x8      320              3.5 / 2.2   (1.6x)    19   / 10    (1.8x)     1.8  | 17
#   8x8      640              23  / 17    (1.35x)   119  / 38    (3.1x)     17   | 81
#   8x8      1280             161 / 73    (2.2x)    541  / 185   (2.9x)     136  | 429
#   8x8      2560:1280        193 / 86    (2.2x)    1544 / 406   (3.8x)     139  | 840
#   8x8      32..128, b=2     0.7-1.4x              0.7-1.2x                (< 2 ms)
#   16x16    320              10  / 11    (0.89x)   30   / 23    (1.3x)     8.8  | 24
#   16x16    640              42  / 38    (1.1x)    250  / 141   (1.8x)     30   | 169
#   16x16    960:640          105 / 88    (1.2x)    325  / 161   (2.0x)     70   | 180
#   16x16    1920:640         200 / 160   (1.25x)   628  / 378   (1.7x)     148  | 524
#   16x16    1280             274 / 176   (1.6x)    1111 / 580   (1.9x)     222  | 734
#   16x16    2560:1280        749 / 490   (1.5x)    2431 / 1019  (2.4x)     509  | 1325
#   16x16    640, b=2         104 / 92    (1.13x)   382  / 300   (1.3x)
#   16x16    1280, b=2        1308 / 932  (1.4x)    1869 / 1173  (1.6x)
#   16x16    640 / 1280, b=4  0.85x / 0.93x         1.14x / 1.4x
#   16x16    32..128, b=2     0.6-1.0x              0.4-0.5x
#   32x32    320              64  / 74    (0.87x)   127  / 123   (1.03x)    39   | 94
#   32x32    640              157 / 217   (0.72x)   770  / 627   (1.23x)    115  | 459
#   32x32    1280             729 / 598   (1.2x)    2485 / 1828  (1.4x)     492  | 2024
#   32x32    1920:640         304 / 354   (0.86x)   973  / 851   (1.14x)    192  | 656
#   32x32    32..128, b=2     0.3-0.5x              0.5-0.7x
#   4x4, 8x8 320..1280, b=4   1.1-3.1x              1.5-2.7x
#
# Stride 2 (out map = half the input): im2col is as fast or faster up to a 16x16 output at every
# channel count measured (32..1280), mostly in the backward pass (XLA's input gradient of a
# strided conv is a dilated conv): out 8x8 @ 1280 68 / 26 ms fwd, 321 / 114 fwd+bwd; out 16x16
# @ 1280 264 / 141, 830 / 467; @ 320 6.6 / 6.4, 26 / 17; @ 32..128 (b=2) 0.7-1.0x fwd, 1.2-4x
# fwd+bwd; out 32x32 @ 320 36 / 32, 169 / 123, but @ 640 0.83x fwd.
#
# Hence: im2col for any channel count up to 8x8 per image (the small-channel 4x4 / 8x8 losses
# are under 0.2 ms); for kernels of 3x3x640x640 and up, and for strided convs, up to 512 output
# rows (batch * pixels: 16x16 at batch 1-2, 8x8 at batch 4-8), where they gain forward and
# backward; lax.conv above (at 1024 rows the forward is even or slower, only the backward gains).
AUTO_IM2COL_MAX_PIXELS = 64
AUTO_IM2COL_LARGE_MAX_ROWS = 512
AUTO_IM2COL_LARGE_KERNEL = 9 * 640 * 640

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


def trace_backend() -> str:
    """The platform the computation being traced will run on, as far as the config tells."""
    device = jax.config.jax_default_device
    if device is not None and not isinstance(device, str):
        return device.platform
    if isinstance(device, str):
        return device
    return jax.default_backend()


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
                     strides: Sequence[int], padding, backend: str | None = None) -> str:
    """"xla" or "im2col" for an NHWC input and HWIO kernel under ``impl`` (see the module doc)."""
    impl = check_conv_impl(impl)
    if impl != "auto":
        return impl
    backend = trace_backend() if backend is None else backend
    if backend != "cpu":
        return "xla"
    kh, kw = kernel_shape[:2]
    if kh == kw == 1 and tuple(strides) == (1, 1):
        return "xla"  # already one matmul in XLA (and im2col would be the same matmul)
    pads = explicit_padding(padding, input_shape[1:3], (kh, kw), strides)
    if pads is None:
        return "xla"
    pixels = output_size(input_shape[1], kh, strides[0], pads[0]) * output_size(input_shape[2], kw, strides[1], pads[1])
    if pixels <= AUTO_IM2COL_MAX_PIXELS:
        return "im2col"
    large = tuple(strides) != (1, 1) or kh * kw * kernel_shape[2] * kernel_shape[3] >= AUTO_IM2COL_LARGE_KERNEL
    return "im2col" if large and input_shape[0] * pixels <= AUTO_IM2COL_LARGE_MAX_ROWS else "xla"


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


def conv_nhwc(x, kernel, strides: Sequence[int] = (1, 1), padding=((0, 0), (0, 0)), *, impl: str | None = None,
              precision: Any = None):
    """An NHWC / HWIO convolution lowered as ``impl`` says ("auto": ``choose_conv_impl``; None: the
    module-wide default)."""
    strides = tuple(strides)
    impl = get_default_conv_impl() if impl is None else impl
    if (choose_conv_impl(impl, x.shape, kernel.shape, strides, padding) == "im2col"
            and explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides) is not None):
        return im2col_conv(x, kernel, strides, padding, precision=precision)
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=precision)


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

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                 preferred_element_type=None):
        impl = get_default_conv_impl() if self.impl is None else self.impl
        simple = (
            lhs.ndim == 4
            and _is_nhwc(dimension_numbers)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and feature_group_count == 1
            and batch_group_count == 1
            and explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], window_strides) is not None
        )
        if simple and choose_conv_impl(impl, lhs.shape, rhs.shape, window_strides, padding) == "im2col":
            return im2col_conv(lhs, rhs, window_strides, padding, precision=precision,
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


def lowering_class(conv_impl: str | None) -> type[_Lowering]:
    """The ``conv_general_dilated_cls`` for ``conv_impl`` (None: the module-wide default at trace time)."""
    if conv_impl is not None:
        check_conv_impl(conv_impl)
    return LOWERINGS[conv_impl]


def Conv(features: int, kernel_size: Sequence[int], *, conv_impl: str | None = None, **kwargs) -> nn.Conv:  # noqa: N802
    """A flax ``nn.Conv`` (same fields, same parameters: ``kernel`` (kh, kw, in, out) and ``bias``
    (out,)) whose convolution is lowered per ``conv_impl`` ("auto" / "xla" / "im2col"; None, the
    default: the module-wide default when traced, see ``set_default_conv_impl``).

    It is an ``nn.Conv`` itself (only ``conv_general_dilated_cls`` is set), so parameter trees,
    names, converters and strict loaders see exactly what a plain ``nn.Conv`` gives."""
    if "conv_general_dilated" in kwargs or "conv_general_dilated_cls" in kwargs:
        raise TypeError("Conv sets conv_general_dilated_cls itself; pass conv_impl instead")
    return nn.Conv(features, kernel_size, conv_general_dilated_cls=lowering_class(conv_impl), **kwargs)
