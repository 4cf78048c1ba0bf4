"""mema_jax.core.compile.jit: on CPU every project function compiles its convolutions with XLA's own
(Eigen) kernel instead of YNNPACK's and keeps YNNPACK reductions; dots go to XLA's own GEMM in
evaluated functions and to YNNPACK in training steps; values equal jax.jit's; a user's own XLA flag
or MEMA_XLA_CPU_DEFAULTS=1 turns it off.

Tolerance for equal values: relative 1e-5 of the largest output (fp32; both programs compute the
same sums, in an order that depends on the convolution library: ~K * 2**-24 relative for K = 288
products per output, ~2e-5 in the worst case, ~1e-7 measured)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mema_jax.core import compile as compile_lib
from mema_jax.core.compile import CPU_OPTIONS, CPU_TRAINING_OPTIONS, compiler_options, jit


def conv_then_dense(x, kernel, dense):
    y = lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y).reshape(-1, y.shape[-1]) @ dense


def ynn_fusions(hlo: str) -> list[str]:
    """The called computations of the YNNPACK library fusions, as text."""
    called = re.findall(r'calls=%([\w.\-]+), [^\n]*"kind":"__ynn_fusion"', hlo)
    bodies = []
    for name in called:
        m = re.search(rf"^%{re.escape(name)} .*?^}}", hlo, re.M | re.S)
        bodies.append(m.group(0) if m else "")
    return bodies


def _inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((2, 16, 16, 32), np.float32)),
            jnp.asarray(rng.standard_normal((3, 3, 32, 32), np.float32)),
            jnp.asarray(rng.standard_normal((32, 64), np.float32)))


def test_cpu_compiles_convolutions_and_dots_outside_ynnpack_and_keeps_its_reductions():
    args = _inputs()
    ours = jit(conv_then_dense).lower(*args).compile().as_text()
    xla_default = jax.jit(conv_then_dense).lower(*args).compile().as_text()
    assert not any("convolution(" in body or " dot(" in body for body in ynn_fusions(ours)), \
        "a convolution or dot went to YNNPACK"
    assert re.search(r"= f32\[2,16,16,32\]\{[^}]*\} convolution\(", ours), "XLA's own convolution not in the program"
    assert re.search(r"= f32\[512,64\]\{[^}]*\} dot\(", ours), "XLA's own dot not in the program"
    # What the option changes: this jaxlib's default sends both to YNNPACK.
    assert any("convolution(" in body for body in ynn_fusions(xla_default))
    assert any(" dot(" in body for body in ynn_fusions(xla_default))
    # Reductions (the norms' statistics) stay with YNNPACK.
    statistics = jit(lambda x: jnp.sum(jnp.square(x), axis=(1, 2))).lower(args[0]).compile().as_text()
    assert any("reduce(" in body for body in ynn_fusions(statistics))


def test_training_steps_keep_ynnpack_dots_and_never_its_convolutions():
    args = _inputs()

    def loss(x, kernel, dense):
        return jnp.sum(jnp.square(conv_then_dense(x, kernel, dense)))

    hlo = jit(jax.grad(loss, argnums=(1, 2)), training=True).lower(*args).compile().as_text()
    bodies = ynn_fusions(hlo)
    assert any(" dot(" in body for body in bodies), "the training step's dots left YNNPACK"
    assert not any("convolution(" in body for body in bodies), "a convolution went to YNNPACK"
    assert "convolution(" in hlo


def test_same_values_as_jax_jit_forward_and_gradient():
    args = _inputs()

    def loss(x, kernel, dense):
        return jnp.sum(jnp.square(conv_then_dense(x, kernel, dense)))

    for fn, training in ((conv_then_dense, False), (jax.grad(loss, argnums=(0, 1)), True)):
        ours, theirs = jit(fn, training=training)(*args), jax.jit(fn)(*args)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


def test_options_only_on_cpu_and_not_over_the_users_own(monkeypatch):
    assert compiler_options("cpu") == CPU_OPTIONS
    assert compiler_options("cpu", training=True) == CPU_TRAINING_OPTIONS
    assert compiler_options("gpu") == compiler_options("gpu", training=True) == {}
    assert compiler_options("tpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-reduce")
    assert compiler_options("cpu") == compiler_options("cpu", training=True) == {}
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("MEMA_XLA_CPU_DEFAULTS", "1")
    assert compiler_options("cpu") == {}


def test_callers_options_are_merged_and_win():
    args = _inputs()
    jitted = jit(conv_then_dense, compiler_options={"xla_cpu_experimental_ynn_fusion_type":
                                                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"})
    hlo = jitted.lower(*args).compile().as_text()
    assert any("convolution(" in body for body in ynn_fusions(hlo))


def test_an_option_this_jaxlib_refuses_falls_back_with_one_warning(monkeypatch):
    compile_lib._accepted.cache_clear()
    monkeypatch.setattr(compile_lib, "CPU_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compiler_options("cpu") == {}
        assert compiler_options("cpu") == {}
    assert len([w for w in caught if "did not take" in str(w.message)]) == 1
    compile_lib._accepted.cache_clear()


def test_the_training_step_is_compiled_with_the_training_options():
    """core.train_state.make_train_step (every trainer's step) goes through jit(training=True)."""
    import optax

    from mema_jax.core import sharding as shd
    from mema_jax.core import train_state as ts

    mesh, rules = shd.make_mesh({"data": 1}, devices=jax.devices()[:1]), shd.DEFAULT_RULES
    x, kernel, dense = _inputs()
    tx = optax.sgd(0.1)

    def loss_fn(params, frozen, batch, rng):
        return jnp.mean(jnp.square(conv_then_dense(batch["x"], params["kernel"], params["dense"]))), {}

    state_spec = ts.sharded_state(lambda r: {"kernel": kernel, "dense": dense}, tx, mesh, rules, seed=0)
    batch_shardings = {"x": shd.batch_sharding(mesh, rules, 4, x.shape)}
    step = ts.make_train_step(loss_fn, tx, mesh=mesh, rules=rules, state_shardings=state_spec.shardings,
                              batch_shardings=batch_shardings, seed=0)
    state = state_spec.init()
    with jax.set_mesh(mesh):
        hlo = step.jitted.lower(state, {"x": x}, None).compile().as_text()
    assert "convolution(" in hlo
    assert not any("convolution(" in body for body in ynn_fusions(hlo))
    assert any(" dot(" in body for body in ynn_fusions(hlo))


def test_a_project_jit_called_inside_another_jit_is_inlined_and_keeps_its_attributes():
    """jax takes compiler_options only on the outermost jit: our jitted helpers (the sampler's
    denoising loop, say) are also called from inside other jitted functions."""
    x, kernel, dense = _inputs()
    inner = jit(conv_then_dense)
    assert compiler_options()  # CPU: the wrapped form is the one under test

    @jit
    def outer(x, kernel, dense):
        return 2.0 * inner(x, kernel, dense)

    expected = 2.0 * jax.jit(conv_then_dense)(x, kernel, dense)
    assert np.max(np.abs(outer(x, kernel, dense) - expected)) <= 1e-5 * np.max(np.abs(expected))
    assert np.max(np.abs(jax.grad(lambda k: jnp.sum(outer(x, k, dense)))(kernel)
                         - jax.grad(lambda k: jnp.sum(2.0 * conv_then_dense(x, k, dense)))(kernel))) <= \
        1e-5 * np.max(np.abs(jax.grad(lambda k: jnp.sum(2.0 * conv_then_dense(x, k, dense)))(kernel)))
    # called at the top level it is still the compiled function with the options, lower() and all
    assert "convolution(" in inner.lower(x, kernel, dense).compile().as_text()
    assert inner.__wrapped__ is conv_then_dense and inner.__name__ == "conv_then_dense"
