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
    AUTO_BACKWARD_MAX_BATCH,
    AUTO_BACKWARD_LARGE_KERNEL_MAX_ROWS,
    AUTO_BACKWARD_MAX_PATCHES,
    AUTO_BACKWARD_SMALL_MAP,
    AUTO_BACKWARD_SMALL_MAP_BATCH,
    AUTO_FOLD_MIN_ROWS,
    AUTO_FORWARD_MAX_PIXELS,
    AUTO_FORWARD_MAX_ROWS,
    AUTO_SMALL_KERNEL,
    AUTO_TINY_MAP,
    choose_conv_impl,
    choose_upsample_fold,
    conv_nhwc,
    default_conv_impl,
    im2col_conv,
    upsample2x_conv_folded,
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


def test_auto_picks_im2col_on_cpu_only_where_it_was_measured_faster():
    pad = ((1, 1), (1, 1))
    small = (3, 3, 320, 320)  # at AUTO_SMALL_KERNEL
    large = (3, 3, 640, 640)
    assert np.prod(small) == AUTO_SMALL_KERNEL < np.prod(large)
    assert AUTO_TINY_MAP == 4 and AUTO_FORWARD_MAX_PIXELS == 64 and AUTO_BACKWARD_SMALL_MAP == 16
    assert AUTO_BACKWARD_LARGE_KERNEL_MAX_ROWS == 256

    def pick(h, w=None, kernel=small, strides=(1, 1), padding=pad, batch=1, backend="cpu", direction="forward"):
        shape = (batch, h, w or h, kernel[2])
        return choose_conv_impl("auto", shape, kernel, strides, padding, backend=backend, direction=direction)

    def both(*args, **kw):
        return pick(*args, **kw), pick(*args, direction="backward", **kw)

    # maps of 2x2 and less (smaller than the kernel): im2col both ways, any kernel, any batch
    for kernel in ((3, 3, 8, 8), small, large, (3, 3, 1280, 1280)):
        assert both(2, kernel=kernel, batch=64) == ("im2col", "im2col")
        assert both(1, 4, kernel=kernel) == ("im2col", "im2col")
    # forward: small kernels up to 8x8 maps and AUTO_FORWARD_MAX_ROWS output rows
    rows = AUTO_FORWARD_MAX_ROWS // AUTO_FORWARD_MAX_PIXELS
    assert pick(8, batch=rows) == "im2col" and pick(8, batch=rows + 1) == "xla"
    assert pick(4, batch=AUTO_FORWARD_MAX_ROWS // 16) == "im2col"
    assert pick(8, 9) == "xla"  # the pixel count decides, not one side
    assert pick(4, kernel=large) == "xla"
    # gradients: small kernels at batch <= AUTO_BACKWARD_MAX_BATCH within AUTO_BACKWARD_MAX_PATCHES ...
    b = AUTO_BACKWARD_MAX_BATCH
    assert both(64, kernel=(3, 3, 64, 64)) == ("xla", "im2col")  # 4096 * 576 patch elements
    assert both(32, kernel=(3, 3, 64, 64), batch=b) == ("xla", "im2col")
    assert 4096 * 576 <= AUTO_BACKWARD_MAX_PATCHES < 4096 * 1152  # 64x64 @ 128: both lowerings even
    assert pick(64, direction="backward") == "xla"  # 320 channels at 64x64: 4096 * 2880
    assert pick(32, kernel=(3, 3, 32, 32), batch=b + 1, direction="backward") == "xla"
    # ... or maps of at most AUTO_BACKWARD_SMALL_MAP pixels at batch <= AUTO_BACKWARD_SMALL_MAP_BATCH
    assert pick(4, batch=AUTO_BACKWARD_SMALL_MAP_BATCH, direction="backward") == "im2col"
    assert pick(4, batch=AUTO_BACKWARD_SMALL_MAP_BATCH + 1, direction="backward") == "xla"
    # ... and larger kernels on at most AUTO_BACKWARD_LARGE_KERNEL_MAX_ROWS output rows
    assert pick(4, kernel=large, direction="backward") == "im2col"
    assert pick(16, kernel=large, direction="backward") == "im2col"  # 256 rows
    assert pick(16, kernel=large, batch=2, direction="backward") == "xla"
    assert pick(8, kernel=large, batch=8, direction="backward") == "xla"
    # stride 2: the output map counts
    assert both(64, kernel=(3, 3, 128, 128), strides=(2, 2)) == ("xla", "im2col")
    assert both(4, kernel=large, strides=(2, 2), padding=((0, 1), (0, 1))) == ("im2col", "im2col")
    assert both(64, kernel=(3, 3, 32, 64), strides=(2, 2), batch=8) == ("xla", "xla")
    assert both(32, kernel=large, strides=(2, 2)) == ("xla", "im2col")
    # a 1x1 stride-1 conv is already one matmul in XLA; its gradients for a large kernel on few rows are im2col's
    one = ((0, 0), (0, 0))
    assert both(2, kernel=(1, 1, 1280, 1280), padding=one) == ("xla", "im2col")
    assert both(32, kernel=(1, 1, 1280, 1280), padding=one) == ("xla", "xla")
    assert both(2, kernel=(1, 1, 320, 320), padding=one) == ("xla", "xla")
    # paddings im2col does not take
    assert both(2, padding=((-1, 0), (0, 0))) == ("xla", "xla")
    # never on other backends
    for backend in ("gpu", "cuda", "rocm", "tpu"):
        assert both(2, backend=backend) == both(64, kernel=(3, 3, 64, 64), backend=backend) == ("xla", "xla")
    # the fixed choices ignore the backend, the shape and the direction
    for impl in ("xla", "im2col"):
        for direction in ("forward", "backward"):
            assert choose_conv_impl(impl, (1, 64, 64, 3), small, (1, 1), pad, backend="gpu", direction=direction) == impl
    with pytest.raises(ValueError, match="direction"):
        pick(2, direction="sideways")
    # the backend the tests run on (conftest: emulated CPU devices) is read when not given
    assert jax.default_backend() == "cpu"
    assert choose_conv_impl("auto", (1, 2, 2, 320), small, (1, 1), pad) == "im2col"


@pytest.mark.parametrize("case", [(1, 32, 32, 16, 24, 3, 1, ((1, 1), (1, 1))),  # forward xla, gradients im2col
                                  (2, 32, 32, 8, 8, 3, 2, ((0, 1), (0, 1)))],
                         ids=["stride1", "stride2"])
def test_split_lowering_has_lax_values_and_lax_gradients_to_second_order(case):
    batch, height, width, c_in, c_out, kh, kw, strides, padding = _unpack(case)
    x, k = data(3, batch, height, width, c_in, c_out, kh, kw)
    shape = x.shape
    assert choose_conv_impl("auto", shape, k.shape, strides, padding, backend="cpu") == "xla"
    assert choose_conv_impl("auto", shape, k.shape, strides, padding, backend="cpu", direction="backward") == "im2col"

    def ref(x, k):
        return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)

    def ours(x, k):
        return conv_nhwc(x, k, strides, padding, impl="auto")

    cotangent = jnp.asarray(np.random.default_rng(4).standard_normal(ref(x, k).shape, np.float32))

    def first(conv):  # tanh: the gradients depend on x and k, so the second order is not zero
        return jax.grad(lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * cotangent), argnums=(0, 1))

    def second(conv):  # an R1-like penalty: the squared input gradient, differentiated again
        return jax.grad(lambda x, k: jnp.sum(jnp.square(first(conv)(x, k)[0])), argnums=(0, 1))

    assert max_rel(jax.jit(ours)(x, k), ref(x, k)) <= TOL
    for order in (first, second):
        for name, a, b in zip(("input", "kernel"), jax.jit(order(ours))(x, k), order(ref)(x, k)):
            assert max_rel(a, b) <= TOL, (order.__name__, name)
    # the forward pass is lax.conv, the gradients im2col's matmuls
    fwd_names = _primitive_names(jax.make_jaxpr(ours)(x, k).jaxpr)
    assert "conv_general_dilated" in fwd_names and "dot_general" not in fwd_names
    grad_names = _primitive_names(jax.make_jaxpr(first(ours))(x, k).jaxpr)
    assert "dot_general" in grad_names


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations (jit, remat, scan...)."""

    def nested(value):
        if isinstance(value, jax.extend.core.ClosedJaxpr):
            yield from _equations(value.jaxpr)
        elif isinstance(value, jax.extend.core.Jaxpr):
            yield from _equations(value)
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from nested(v)

    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            yield from nested(value)


def _primitive_names(jaxpr) -> list[str]:
    return [eqn.primitive.name for eqn in _equations(jaxpr)]


def _output_shapes(jaxpr) -> set[tuple[int, ...]]:
    """The shape of every value ``jaxpr`` (and the jaxprs nested in it) computes."""
    return {tuple(v.aval.shape) for eqn in _equations(jaxpr) for v in eqn.outvars if hasattr(v.aval, "shape")}


def _lowerings(module, x):
    params = module.init(jax.random.PRNGKey(0), x)
    names = _primitive_names(jax.make_jaxpr(lambda p: module.apply(p, x))(params).jaxpr)
    return names.count("conv_general_dilated"), names.count("dot_general"), params


@pytest.mark.parametrize("conv_impl,size,expected", [
    ("auto", 2, "im2col"),
    ("auto", int(np.sqrt(AUTO_FORWARD_MAX_PIXELS)), "im2col"),
    ("auto", int(np.sqrt(AUTO_FORWARD_MAX_PIXELS)) + 1, "xla"),
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


# x2 nearest upsample + 3x3 convolution folded into four 2x2 convolutions of the map before the
# upsample.  Each output sums 4 * C_in products of kernel taps summed first (in fp32, <= 4 terms)
# instead of 9 * C_in products: the same sums in another order, so the same tolerance holds.
FOLD_CASES = [
    # batch, height, width, c_in, c_out (of the map before the upsample)
    (1, 4, 4, 8, 8),
    (3, 5, 7, 6, 4),  # odd, non-square, batch > 1, c_in != c_out
]


def upsample_then_lax_conv(x, k):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # written out: the reference shares no code
    return lax.conv_general_dilated(up, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("impl", ["xla", "im2col"])
def test_folded_upsample_conv_equals_upsample_then_conv_to_second_order(case, impl):
    batch, height, width, c_in, c_out = case
    x, k = data(5, batch, height, width, c_in, c_out, 3, 3)
    ref = upsample_then_lax_conv(x, k)
    ours = jax.jit(lambda x, k: upsample2x_conv_folded(x, k, impl=impl))(x, k)
    assert ours.shape == (batch, 2 * height, 2 * width, c_out)
    assert max_rel(ours, ref) <= TOL
    cotangent = jnp.asarray(np.random.default_rng(6).standard_normal(ref.shape, np.float32))

    def first(conv):
        return jax.grad(lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * cotangent), argnums=(0, 1))

    def second(conv):
        return jax.grad(lambda x, k: jnp.sum(jnp.square(first(conv)(x, k)[0])), argnums=(0, 1))

    folded = lambda x, k: upsample2x_conv_folded(x, k, impl=impl)  # noqa: E731
    for order in (first, second):
        for name, a, b in zip(("input", "kernel"), jax.jit(order(folded))(x, k), order(upsample_then_lax_conv)(x, k)):
            assert max_rel(a, b) <= TOL, (order.__name__, name)


def test_upsample_fold_is_chosen_on_cpu_auto_from_the_measured_size_only():
    pad, k = ((1, 1), (1, 1)), (3, 3, 64, 32)
    side = int(np.sqrt(AUTO_FOLD_MIN_ROWS))
    assert side * side == AUTO_FOLD_MIN_ROWS or 2 * (side // 2) ** 2 < AUTO_FOLD_MIN_ROWS
    assert choose_upsample_fold("auto", (1, 32, 32, 64), k, (1, 1), pad, backend="cpu")
    assert choose_upsample_fold("auto", (24, 16, 16, 64), k, (1, 1), pad, backend="cpu")
    rows_below = AUTO_FOLD_MIN_ROWS // (8 * 8) - 1  # batch of 8x8 maps just under the threshold
    assert not choose_upsample_fold("auto", (rows_below, 8, 8, 64), k, (1, 1), pad, backend="cpu")
    assert choose_upsample_fold("auto", (rows_below + 1, 8, 8, 64), k, (1, 1), pad, backend="cpu")
    assert not choose_upsample_fold("auto", (1, 16, 16, 1280), (3, 3, 1280, 1280), (1, 1), pad, backend="cpu")
    assert not choose_upsample_fold("auto", (1, 32, 32, 64), k, (1, 1), pad, backend="gpu")
    for impl in ("xla", "im2col"):
        assert not choose_upsample_fold(impl, (1, 32, 32, 64), k, (1, 1), pad, backend="cpu")
    assert not choose_upsample_fold("auto", (1, 32, 32, 64), (1, 1, 64, 32), (1, 1), ((0, 0), (0, 0)), backend="cpu")
    assert not choose_upsample_fold("auto", (1, 32, 32, 64), k, (2, 2), pad, backend="cpu")
    assert not choose_upsample_fold("auto", (1, 32, 32, 64), k, (1, 1), ((0, 1), (0, 1)), backend="cpu")


@pytest.mark.parametrize("impl,side,folded", [("auto", 32, True), ("auto", 8, False), ("xla", 32, False)])
def test_upsample2d_folds_as_chosen_with_plain_conv_parameters_and_the_same_values(impl, side, folded):
    from mema_jax.models.layers.resnet_block import Upsample2D, upsample_nearest

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((1, side, side, 8), np.float32))
    module = Upsample2D(12)
    with default_conv_impl(impl):
        params = module.init(jax.random.PRNGKey(0), x)
        params = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), nn.meta.unbox(params))
        traced = jax.jit(lambda p: module.apply(p, x)).trace(params)
        ours = np.asarray(traced.lower().compile()(params))
    # folded: never an upsampled copy of the input (8 channels at 2x the side)
    assert ((1, 2 * side, 2 * side, 8) in _output_shapes(traced.jaxpr.jaxpr)) != folded
    plain = nn.Conv(12, (3, 3), padding=((1, 1), (1, 1)))
    up = upsample_nearest(x, (2 * side, 2 * side))
    assert jax.tree.map(jnp.shape, params["params"]["conv"]) == jax.tree.map(jnp.shape, plain.init(jax.random.PRNGKey(0), up)["params"])
    ref = plain.apply({"params": params["params"]["conv"]}, up)
    assert max_rel(ours, ref) <= TOL
    # a resize to another size than x2 upsamples first, whatever the lowering
    odd = module.apply(params, x, size=(2 * side + 1, 2 * side))
    assert max_rel(odd, plain.apply({"params": params["params"]["conv"]}, upsample_nearest(x, (2 * side + 1, 2 * side)))) <= TOL
