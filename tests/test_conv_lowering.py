"""im2col + matmul equals lax.conv_general_dilated, and "auto" picks it only where it should.

Tolerance (fp32): max |im2col - lax.conv| <= 1e-5 * max |lax.conv| (and the same for gradients).
Both lowerings compute the same K = kh * kw * C_in products per output and differ only in the
order they are summed in fp32.  Rounding a sum of K terms in any order is off by at most
~K * 2**-24 * sum|x w| (worst case, and ~sqrt(K) * 2**-24 * sum|x w| for random signs), and with
the random data here sum|x w| is ~sqrt(K) times a typical |y|, so the expected difference is
~K * 6e-8 * typical |y| relative: 6e-6 at the largest K here (9 * 48 = 432) in the worst case,
measured ~1e-7.  1e-5 of max |y| holds for any summation order while a wrong tap, stride or
padding (an O(1) relative change) is far outside it.
"""
from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from mema_jax.models.layers import conv as conv_lib
from mema_jax.models.layers.conv import (
    AUTO_IM2COL_LARGE_KERNEL,
    AUTO_IM2COL_LARGE_MAX_ROWS,
    AUTO_IM2COL_MAX_PIXELS,
    choose_conv_impl,
    conv_nhwc,
    default_conv_impl,
    im2col_conv,
)
from mema_jax.models.layers.linear import conv2d

TOL = 1e-5
DN = ("NHWC", "HWIO", "NHWC")


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def data(seed, batch, height, width, c_in, c_out, kh, kw):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, height, width, c_in), np.float32))
    k = jnp.asarray(rng.standard_normal((kh, kw, c_in, c_out), np.float32) / np.sqrt(kh * kw * c_in))
    return x, k


CASES = [
    # batch, height, width, c_in, c_out, kernel, stride, padding
    (1, 8, 8, 16, 24, 3, 1, ((1, 1), (1, 1))),
    (3, 7, 9, 5, 6, 3, 1, ((1, 1), (1, 1))),  # odd sizes, batch > 1
    (2, 8, 8, 16, 8, 3, 2, ((1, 1), (1, 1))),  # the UNet downsampler
    (2, 9, 7, 8, 8, 3, 2, ((0, 1), (0, 1))),  # VAE-style asymmetric padding, odd sizes
    (2, 7, 5, 8, 12, 3, 1, "SAME"),
    (2, 7, 6, 8, 12, 3, 2, "SAME"),
    (2, 6, 7, 8, 4, 3, 1, "VALID"),
    (2, 9, 9, 8, 4, 3, 2, "VALID"),
    (2, 5, 6, 48, 16, 3, 1, ((2, 0), (1, 3))),  # uneven explicit padding
    (2, 5, 5, 12, 16, 1, 1, ((0, 0), (0, 0))),  # 1x1
    (2, 7, 7, 12, 16, 1, 2, "VALID"),  # 1x1 strided
    (1, 2, 2, 32, 32, 3, 1, ((1, 1), (1, 1))),  # 2x2 map: most taps in the padding
    (2, 6, 8, 4, 4, (3, 1), (1, 2), ((1, 1), (0, 0))),  # non-square kernel and strides
]


def _unpack(case):
    batch, height, width, c_in, c_out, kernel, stride, padding = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    strides = (stride, stride) if isinstance(stride, int) else stride
    return batch, height, width, c_in, c_out, kh, kw, strides, padding


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:7])) + f"-{c[7]}".replace(" ", ""))
def test_im2col_equals_lax_conv(case):
    batch, height, width, c_in, c_out, kh, kw, strides, padding = _unpack(case)
    x, k = data(0, batch, height, width, c_in, c_out, kh, kw)
    ref = lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)
    ours = jax.jit(lambda x, k: im2col_conv(x, k, strides, padding))(x, k)
    assert ours.shape == ref.shape
    assert max_rel(ours, ref) <= TOL
    # conv_nhwc with impl="im2col" is the same computation
    assert max_rel(conv_nhwc(x, k, strides, padding, impl="im2col"), ref) <= TOL


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 2, 3, 5, 8, 9, 11)],
                         ids=lambda c: "-".join(map(str, c[:7])) + f"-{c[7]}".replace(" ", ""))
def test_im2col_gradients_equal_lax_conv(case):
    batch, height, width, c_in, c_out, kh, kw, strides, padding = _unpack(case)
    x, k = data(1, batch, height, width, c_in, c_out, kh, kw)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(
        lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN).shape, np.float32))

    def grads(conv):
        return jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) * cotangent), argnums=(0, 1)))(x, k)

    ref = grads(lambda x, k: lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN))
    ours = grads(lambda x, k: im2col_conv(x, k, strides, padding))
    for name, a, b in zip(("input", "kernel"), ours, ref):
        assert max_rel(a, b) <= TOL, name


def test_im2col_rejects_what_it_does_not_lower():
    x, k = data(0, 1, 4, 4, 3, 3, 3, 3)
    with pytest.raises(ValueError, match="channels"):
        im2col_conv(x, k[:, :, :2], (1, 1), "SAME")
    with pytest.raises(ValueError, match="padding"):
        im2col_conv(x, k, (1, 1), ((-1, 0), (0, 0)))
    with pytest.raises(ValueError, match="conv_impl"):
        choose_conv_impl("fast", x.shape, k.shape, (1, 1), "SAME")


def test_auto_picks_im2col_on_cpu_only_at_or_under_the_thresholds():
    side = int(np.sqrt(AUTO_IM2COL_MAX_PIXELS))
    assert side * side == AUTO_IM2COL_MAX_PIXELS  # the threshold is a square map
    pad = ((1, 1), (1, 1))
    small = (3, 3, 320, 320)  # under AUTO_IM2COL_LARGE_KERNEL
    large = (3, 3, 640, 640)
    assert np.prod(small) < AUTO_IM2COL_LARGE_KERNEL <= np.prod(large)

    def pick(h, w=None, kernel=small, strides=(1, 1), padding=pad, batch=1, backend="cpu"):
        shape = (batch, h, w or h, kernel[2])
        return choose_conv_impl("auto", shape, kernel, strides, padding, backend=backend)

    # any kernel: up to AUTO_IM2COL_MAX_PIXELS output pixels per image, whatever the batch
    for kernel in ((3, 3, 8, 8), small, large):
        assert pick(2, kernel=kernel) == pick(side, kernel=kernel) == "im2col"
        assert pick(side, kernel=kernel, batch=64) == "im2col"
    assert pick(side + 1) == pick(2 * side) == "xla"
    assert pick(side, side + 1) == "xla"  # the pixel count decides, not one side
    # large kernels and strided convs: up to AUTO_IM2COL_LARGE_MAX_ROWS output rows (batch * pixels)
    rows = AUTO_IM2COL_LARGE_MAX_ROWS
    big = int(np.sqrt(rows))  # 22: 484 rows, 23: 529
    assert pick(big, kernel=large) == "im2col" and pick(big + 1, kernel=large) == "xla"
    assert pick(16, kernel=large, batch=rows // 256) == "im2col"
    assert pick(16, kernel=large, batch=rows // 256 + 1) == "xla"
    assert pick(2 * big, strides=(2, 2)) == "im2col"  # stride 2: the output map counts
    assert pick(2 * big + 2, strides=(2, 2)) == "xla"
    assert pick(32, kernel=(3, 3, 32, 32), strides=(2, 2), batch=rows // 256) == "im2col"
    assert pick(32, kernel=(3, 3, 32, 32), strides=(2, 2), batch=rows // 256 + 1) == "xla"
    assert pick(2 * big, strides=(2, 2), padding=((0, 1), (0, 1))) == "im2col"
    # a 1x1 stride-1 conv is already one matmul in XLA
    assert pick(2, kernel=(1, 1, 1280, 1280), padding=((0, 0), (0, 0))) == "xla"
    # paddings im2col does not take
    assert pick(2, padding=((-1, 0), (0, 0))) == "xla"
    # never on other backends
    for backend in ("gpu", "cuda", "rocm", "tpu"):
        assert pick(2, backend=backend) == pick(16, kernel=large, backend=backend) == "xla"
    # the fixed choices ignore the backend and the shape
    for impl in ("xla", "im2col"):
        assert choose_conv_impl(impl, (1, 64, 64, 3), small, (1, 1), pad, backend="gpu") == impl
    # the backend the tests run on (conftest: emulated CPU devices) is read when not given
    assert jax.default_backend() == "cpu"
    assert choose_conv_impl("auto", (1, 2, 2, 320), small, (1, 1), pad) == "im2col"


def _primitive_names(jaxpr) -> list[str]:
    """Every primitive of ``jaxpr`` and of the jaxprs nested in its equations (jit, remat, scan...)."""
    names = []

    def inner(value):
        if isinstance(value, jax.extend.core.ClosedJaxpr):
            names.extend(_primitive_names(value.jaxpr))
        elif isinstance(value, jax.extend.core.Jaxpr):
            names.extend(_primitive_names(value))
        elif isinstance(value, (tuple, list)):
            for v in value:
                inner(v)

    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for value in eqn.params.values():
            inner(value)
    return names


def _lowerings(module, x):
    params = module.init(jax.random.PRNGKey(0), x)
    names = _primitive_names(jax.make_jaxpr(lambda p: module.apply(p, x))(params).jaxpr)
    return names.count("conv_general_dilated"), names.count("dot_general"), params


@pytest.mark.parametrize("conv_impl,size,expected", [
    ("auto", 2, "im2col"),
    ("auto", int(np.sqrt(AUTO_IM2COL_MAX_PIXELS)), "im2col"),
    ("auto", int(np.sqrt(AUTO_IM2COL_MAX_PIXELS)) + 1, "xla"),
    ("xla", 2, "xla"),
    ("im2col", 32, "im2col"),
    (None, 2, "im2col"),  # the module-wide default, "auto"
])
def test_conv2d_layer_lowers_as_chosen_with_plain_conv_parameters(conv_impl, size, expected):
    x = jnp.ones((2, size, size, 8))
    module = conv2d(16, conv_impl=conv_impl)
    n_conv, n_dot, params = _lowerings(module, x)
    assert (n_conv, n_dot) == ((0, 1) if expected == "im2col" else (1, 0))
    # the parameter tree of a plain nn.Conv with the same fields
    plain = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1))).init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(params)) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), plain)
    assert isinstance(module, nn.Conv)


def test_module_default_is_read_when_traced():
    x = jnp.ones((1, 4, 4, 8))
    module = conv2d(8)
    assert conv_lib.get_default_conv_impl() == "auto"
    with default_conv_impl("xla"):
        assert _lowerings(module, x)[:2] == (1, 0)
    assert conv_lib.get_default_conv_impl() == "auto"
    assert _lowerings(module, x)[:2] == (0, 1)
    with pytest.raises(ValueError, match="conv_impl"):
        conv_lib.set_default_conv_impl("cudnn")


def test_jitted_tiny_unet_is_the_same_with_xla_and_auto_convs():
    from tiny_models import TINY_UNET_SD1

    from mema_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params

    module = UNet2DConditionModel(UNetConfig.from_dict(TINY_UNET_SD1))
    params = nn.meta.unbox(init_params(module, jax.random.PRNGKey(0), sample_shape=(1, 16, 16)))
    rng = np.random.default_rng(0)
    # perturb: flax zero-initialises biases, and a zero bias would hide a bias bug
    params = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), params)
    sample = jnp.asarray(rng.standard_normal((2, 16, 16, 4), np.float32))
    context = jnp.asarray(rng.standard_normal((2, 7, 24), np.float32))
    timesteps = jnp.asarray([3, 500])

    def run(impl):
        with default_conv_impl(impl):
            traced = jax.jit(lambda p: module.apply({"params": p}, sample, timesteps, context)).trace(params)
            names = _primitive_names(traced.jaxpr.jaxpr)
            return np.asarray(traced.lower().compile()(params)), names.count("conv_general_dilated")

    ref, n_xla = run("xla")
    ours, n_auto = run("auto")
    assert n_auto < n_xla  # the 8x8 level (and the downsampler into it) went to im2col
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= TOL
    assert max_rel(ours, ref) <= TOL
