"""The JAX schedulers against diffusers' DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler.

Tolerances (fp32, relative error ||ours - ref|| / ||ref||):
* Noise schedules: diffusers builds betas with torch's float32 ``linspace``, which is 1-2 ulp
  off the correctly rounded value we use (float64 linspace -> float32); ``alphas_cumprod``
  then differs by up to ~4e-7 elementwise (measured).  We require <= 1e-6 elementwise; the
  cosine schedule is computed in python floats on both sides and must match exactly.
* One step: a few float32 operations on the inputs with coefficients that agree to ~5e-7,
  so <= 1e-6 (measured max 2.4e-7 for DDIM and DDPM).  DPM-Solver++ gets <= 2e-6 (measured max
  8.6e-7; still 7e-7 when both sides use bit-identical betas): at high noise its data prediction is
  several times larger than the result, so float32 roundings of the large terms show up amplified.
* Whole loops: errors compound over the steps through a toy model that amplifies nothing, so
  <= 1e-5 (measured ~1e-6).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from mema_jax.schedulers import (
    DDIMConfig,
    DDPMConfig,
    DPMSolverConfig,
    SchedulerConfigError,
    ddim,
    ddpm,
    dpm_solver,
    guidance,
    read_scheduler_config,
)

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SHAPE = (2, 4, 8, 8)


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def randn(rng, shape=SHAPE):
    return rng.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Noise schedules and timesteps


@pytest.mark.parametrize("schedule", [
    {"beta_schedule": "linear"},
    SD_BETAS,
    {"beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.03, "num_train_timesteps": 300},
])
def test_alphas_cumprod_match_diffusers_to_float32_rounding(schedule):
    ref = DDPMScheduler(**schedule)
    ours = ddpm.alphas_cumprod(DDPMConfig(**schedule))
    assert ours.dtype == np.float32 and ours.shape == tuple(ref.alphas_cumprod.shape)
    assert np.max(np.abs(ours / ref.alphas_cumprod.numpy() - 1)) <= 1e-6


def test_cosine_schedule_matches_diffusers_exactly():
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    np.testing.assert_array_equal(ddpm.alphas_cumprod(DDPMConfig(beta_schedule="squaredcos_cap_v2")),
                                  ref.alphas_cumprod.numpy())


def test_trained_betas_are_used_as_given():
    betas = np.linspace(1e-4, 2e-2, 50)
    ref = DDIMScheduler(num_train_timesteps=50, trained_betas=betas)
    ours = ddpm.alphas_cumprod(DDPMConfig(num_train_timesteps=50, trained_betas=tuple(betas)))
    np.testing.assert_array_equal(ours, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 3, 10, 25, 50, 999])
def test_ddim_and_ddpm_timesteps_match_diffusers(spacing, offset, steps):
    kwargs = dict(SD_BETAS, timestep_spacing=spacing, steps_offset=offset)
    ref = DDIMScheduler(**kwargs)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ddim.set_timesteps(DDIMConfig(**kwargs), steps).timesteps, ref.timesteps.numpy())
    ref = DDPMScheduler(**kwargs)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ddpm.set_timesteps(DDPMConfig(**kwargs), steps).timesteps, ref.timesteps.numpy())


def test_timesteps_beyond_the_training_range_are_an_error():
    """diffusers accepts 1000 steps with steps_offset=1 and then fails in step(); we fail at once."""
    with pytest.raises(ValueError, match="outside"):
        ddim.set_timesteps(DDIMConfig(steps_offset=1), 1000)


@pytest.mark.parametrize("kwargs", [
    {"timestep_spacing": "linspace"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing"},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 999])
def test_dpm_solver_timesteps_and_sigmas_match_diffusers(kwargs, steps):
    kwargs = {**SD_BETAS, **kwargs}
    ref = DPMSolverMultistepScheduler(**kwargs)
    ref.set_timesteps(steps)
    state = dpm_solver.set_timesteps(DPMSolverConfig(**kwargs), steps)
    np.testing.assert_array_equal(state.timesteps, ref.timesteps.numpy())
    ref_sigmas = ref.sigmas.numpy()[:-1]  # sigma_i of each step, as alpha_i and sigma_i * alpha_i
    ref_alpha = 1 / np.sqrt(ref_sigmas.astype(np.float64) ** 2 + 1)
    assert np.max(np.abs(state.alpha_s0 / ref_alpha - 1)) <= 1e-6
    assert np.max(np.abs(state.sigma_s0 / (ref_sigmas * ref_alpha) - 1)) <= 1e-6


def test_ddim_uses_final_alpha_cumprod_after_the_last_step():
    """set_alpha_to_one=False: the step after t=1 (SD's schedule) uses alphas_cumprod[0], not 1."""
    config = DDIMConfig(**SD_BETAS, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    state = ddim.set_timesteps(config, 10)
    ac = ddpm.alphas_cumprod(config)
    assert state.timesteps[-1] == 1
    assert state.alpha_prod_t_prev[-1] == ac[0]
    assert ddim.set_timesteps(DDIMConfig(**SD_BETAS), 10).alpha_prod_t_prev[-1] == 1.0


# ----------------------------------------------------------------------------------------------
# Training-side functions


@pytest.mark.parametrize("schedule", [{"beta_schedule": "linear"}, SD_BETAS, {"beta_schedule": "squaredcos_cap_v2"}])
def test_add_noise_get_velocity_and_targets_match_diffusers(schedule):
    rng = np.random.default_rng(0)
    x0, noise = randn(rng, (4, 8, 8, 3)), randn(rng, (4, 8, 8, 3))
    timesteps = np.array([0, 17, 500, 999])
    ref = DDPMScheduler(**schedule)
    ac = ddpm.alphas_cumprod(DDPMConfig(**schedule))
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps)
    assert rel_err(ddpm.add_noise(ac, jnp.asarray(x0), jnp.asarray(noise), timesteps), ref.add_noise(tx0, tnoise, tt)) <= 1e-6
    velocity = ref.get_velocity(tx0, tnoise, tt)
    assert rel_err(ddpm.get_velocity(ac, jnp.asarray(x0), jnp.asarray(noise), timesteps), velocity) <= 1e-6
    assert rel_err(ddpm.training_target("v_prediction", ac, x0, noise, timesteps), velocity) <= 1e-6
    np.testing.assert_array_equal(ddpm.training_target("epsilon", ac, x0, noise, timesteps), noise)
    np.testing.assert_array_equal(ddpm.training_target("sample", ac, x0, noise, timesteps), x0)


def test_add_noise_runs_under_jit_with_traced_timesteps():
    ac = ddpm.alphas_cumprod(DDPMConfig(**SD_BETAS))
    x0 = jnp.ones((2, 4, 4, 1))
    noisy = jax.jit(lambda t: ddpm.add_noise(ac, x0, jnp.zeros_like(x0), t))(jnp.array([0, 999]))
    np.testing.assert_allclose(np.asarray(noisy)[:, 0, 0, 0], np.sqrt(ac[[0, 999]]), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Single steps on random inputs, every step of a schedule


DDIM_CASES = [
    dict(SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),  # SD1.5
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "clip_sample": False},
    {"prediction_type": "sample", "timestep_spacing": "linspace"},
    dict(SD_BETAS, clip_sample=True, clip_sample_range=0.5),
]


@pytest.mark.parametrize("config", DDIM_CASES)
@pytest.mark.parametrize("eta,use_clipped", [(0.0, False), (0.7, False), (1.0, True)])
def test_ddim_step_matches_diffusers(config, eta, use_clipped):
    rng = np.random.default_rng(1)
    ref = DDIMScheduler(**config)
    ref.set_timesteps(10)
    state = ddim.set_timesteps(DDIMConfig(**config), 10)
    for i, t in enumerate(ref.timesteps):
        sample, model_output, noise = randn(rng), randn(rng), randn(rng)
        expected = ref.step(torch.from_numpy(model_output), t, torch.from_numpy(sample), eta=eta,
                            use_clipped_model_output=use_clipped, variance_noise=torch.from_numpy(noise))
        prev, x0 = ddim.step(state, jnp.asarray(model_output), i, jnp.asarray(sample), eta=eta, noise=jnp.asarray(noise),
                             use_clipped_model_output=use_clipped)
        assert rel_err(prev, expected.prev_sample) <= 1e-6, (i, int(t))
        assert rel_err(x0, expected.pred_original_sample) <= 1e-6, (i, int(t))


DDPM_CASES = [
    {},
    dict(SD_BETAS, variance_type="fixed_large", clip_sample=False, prediction_type="v_prediction"),
    {"variance_type": "fixed_small_log", "prediction_type": "sample", "timestep_spacing": "trailing"},
]


@pytest.mark.parametrize("config", DDPM_CASES)
def test_ddpm_sampling_step_matches_diffusers(config):
    rng = np.random.default_rng(2)
    ref = DDPMScheduler(**config)
    ref.set_timesteps(8)
    state = ddpm.set_timesteps(DDPMConfig(**config), 8)
    for i, t in enumerate(ref.timesteps):
        sample, model_output = randn(rng), randn(rng)
        seed = 100 + i
        # diffusers draws its noise with torch.randn(shape, generator) inside step(); draw the same here.
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).numpy()
        expected = ref.step(torch.from_numpy(model_output), t, torch.from_numpy(sample),
                            generator=torch.Generator().manual_seed(seed))
        prev, x0 = ddpm.step(state, jnp.asarray(model_output), i, jnp.asarray(sample), jnp.asarray(noise))
        assert rel_err(prev, expected.prev_sample) <= 1e-6, (i, int(t))
        assert rel_err(x0, expected.pred_original_sample) <= 1e-6, (i, int(t))
    # No noise is added at t == 0 (reached by leading/linspace spacing, not by trailing).
    assert (state.noise_std[-1] == 0.0) == (state.timesteps[-1] == 0)


DPM_CASES = [
    dict(SD_BETAS),  # the SD "DPM++ 2M" setting: midpoint, lower_order_final, final sigma 0
    dict(SD_BETAS, solver_type="heun", prediction_type="v_prediction", timestep_spacing="trailing"),
    {"final_sigmas_type": "sigma_min", "lower_order_final": False, "prediction_type": "sample"},
    dict(SD_BETAS, final_sigmas_type="sigma_min", euler_at_final=True, timestep_spacing="leading", steps_offset=1),
    dict(SD_BETAS, solver_order=1),
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
]


@pytest.mark.parametrize("config", DPM_CASES)
@pytest.mark.parametrize("steps", [1, 2, 6, 20])
def test_dpm_solver_step_matches_diffusers(config, steps):
    """Both get identical inputs at every step; the solver's history (previous x0) builds up alike."""
    rng = np.random.default_rng(3)
    ref = DPMSolverMultistepScheduler(**config)
    ref.set_timesteps(steps)
    state = dpm_solver.set_timesteps(DPMSolverConfig(**config), steps)
    carry = dpm_solver.init_carry(jnp.zeros(SHAPE))
    for i, t in enumerate(ref.timesteps):
        sample, model_output = randn(rng), randn(rng)
        expected = ref.step(torch.from_numpy(model_output), t, torch.from_numpy(sample)).prev_sample
        prev, carry = dpm_solver.step(state, carry, jnp.asarray(model_output), i, jnp.asarray(sample))
        assert rel_err(prev, expected) <= 2e-6, (i, int(t))


def test_dpm_solver_takes_second_order_steps_between_first_order_ends():
    """With 6 steps and final sigma 0: first order at step 0 (no history) and at the last step."""
    state = dpm_solver.set_timesteps(DPMSolverConfig(**SD_BETAS), 6)
    assert state.first_order_only.tolist() == [False] * 5 + [True]
    sample = jnp.ones((1, 2, 2, 1))
    carry = dpm_solver.init_carry(sample)
    _, carry = dpm_solver.step(state, carry, sample, 0, sample)
    first, _ = dpm_solver.step(state, dpm_solver.init_carry(sample), 2 * sample, 1, sample)
    second, _ = dpm_solver.step(state, carry, 2 * sample, 1, sample)
    assert not np.allclose(first, second)


# ----------------------------------------------------------------------------------------------
# Whole sampling loops: ours jitted in lax.scan vs diffusers' python loop


def toy_model_torch(sample, t, direction):
    return 0.3 * sample + (t.float() / 1000.0) * direction


def toy_model_jax(sample, t, direction):
    return 0.3 * sample + (t.astype(jnp.float32) / 1000.0) * direction


def reference_loop(scheduler, sample, direction, noises=None):
    x = torch.from_numpy(sample)
    for i, t in enumerate(scheduler.timesteps):
        kwargs = {}
        if isinstance(scheduler, DDPMScheduler):
            kwargs["generator"] = torch.Generator().manual_seed(int(noises[i]))
        x = scheduler.step(toy_model_torch(x, t, torch.from_numpy(direction)), t, x, **kwargs).prev_sample
    return x.numpy()


@pytest.mark.parametrize("kind", ["ddim", "dpm_solver", "ddpm"])
def test_jitted_sampling_loop_matches_diffusers_loop(kind):
    rng = np.random.default_rng(4)
    sample, direction = randn(rng), randn(rng)
    steps = 12
    if kind == "ddim":
        config = dict(SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        ref, state = DDIMScheduler(**config), ddim.set_timesteps(DDIMConfig(**config), steps)
    elif kind == "dpm_solver":
        ref, state = DPMSolverMultistepScheduler(**SD_BETAS), dpm_solver.set_timesteps(DPMSolverConfig(**SD_BETAS), steps)
    else:
        ref, state = DDPMScheduler(**SD_BETAS), ddpm.set_timesteps(DDPMConfig(**SD_BETAS), steps)
    ref.set_timesteps(steps)
    seeds = np.arange(steps) + 7
    noises = np.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(s))).numpy() for s in seeds])
    expected = reference_loop(ref, sample, direction, seeds)

    @jax.jit
    def loop(state, x, direction, noises):
        def body(carry, i):
            x, solver_carry = carry
            t = state.timesteps[i]
            model_output = toy_model_jax(x, t, direction)
            if kind == "ddim":
                x, _ = ddim.step(state, model_output, i, x)
            elif kind == "dpm_solver":
                x, solver_carry = dpm_solver.step(state, solver_carry, model_output, i, x)
            else:
                x, _ = ddpm.step(state, model_output, i, x, noises[i])
            return (x, solver_carry), None

        (x, _), _ = jax.lax.scan(body, (x, dpm_solver.init_carry(x)), jnp.arange(state.timesteps.shape[0]))
        return x

    ours = loop(state, jnp.asarray(sample), jnp.asarray(direction), jnp.asarray(noises))
    assert rel_err(ours, expected) <= 1e-5


def test_guided_prediction_is_uncond_plus_scale_times_difference():
    rng = np.random.default_rng(5)
    uncond, text = randn(rng), randn(rng)
    both = jnp.concatenate([jnp.asarray(uncond), jnp.asarray(text)])
    expected = uncond + 7.5 * (text - uncond)  # diffusers' StableDiffusionPipeline formula
    np.testing.assert_allclose(guidance.guided_prediction(both, 7.5), expected, rtol=1e-6, atol=1e-6)
    assert guidance.uses_guidance(1.5) and not guidance.uses_guidance(1.0)


# ----------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("ref_class,our_class", [
    (DDIMScheduler, DDIMConfig), (DDPMScheduler, DDPMConfig), (DPMSolverMultistepScheduler, DPMSolverConfig),
])
def test_from_saved_diffusers_config(tmp_path, ref_class, our_class):
    ref = ref_class(**SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing")
    ref.save_config(tmp_path)
    config = our_class.from_config(read_scheduler_config(tmp_path))
    assert (config.beta_schedule, config.beta_start, config.prediction_type, config.timestep_spacing) == (
        "scaled_linear", 0.00085, "v_prediction", "trailing")


# The scheduler_config.json of the SD1.5 release (a PNDMScheduler config written by diffusers 0.6.0).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}


@pytest.mark.parametrize("saved_by", ["sd15_release", "diffusers_now"])
def test_pndm_config_converts_to_ddim_and_dpm_like_diffusers(tmp_path, saved_by):
    """SD1.5 ships a PNDMScheduler config; switching class keeps the shared options, as diffusers does."""
    if saved_by == "sd15_release":
        (tmp_path / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG))
    else:
        PNDMScheduler(**SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1).save_config(tmp_path)
    saved = read_scheduler_config(tmp_path)
    for ref_class, our_class, module in ((DDIMScheduler, DDIMConfig, ddim),
                                         (DPMSolverMultistepScheduler, DPMSolverConfig, dpm_solver)):
        ref = ref_class.from_pretrained(tmp_path)
        ref.set_timesteps(20)
        state = module.set_timesteps(our_class.from_config(saved), 20)
        np.testing.assert_array_equal(state.timesteps, ref.timesteps.numpy())
    ddim_config = DDIMConfig.from_config(saved)
    ref = DDIMScheduler.from_pretrained(tmp_path).config
    assert (ddim_config.set_alpha_to_one, ddim_config.clip_sample, ddim_config.steps_offset) == (
        ref.set_alpha_to_one, ref.clip_sample, ref.steps_offset)


def test_unknown_scheduler_option_is_an_error_naming_it():
    with pytest.raises(SchedulerConfigError, match="no_such_option"):
        DDIMConfig.from_config({"_class_name": "DDIMScheduler", "no_such_option": 3})
    with pytest.raises(SchedulerConfigError, match="no_such_option"):
        DPMSolverConfig.from_config({"no_such_option": 3})


@pytest.mark.parametrize("our_class,options", [
    (DDIMConfig, {"thresholding": True}),
    (DDPMConfig, {"variance_type": "learned_range"}),
    (DPMSolverConfig, {"algorithm_type": "sde-dpmsolver++"}),
    (DPMSolverConfig, {"use_karras_sigmas": True}),
    (DPMSolverConfig, {"solver_order": 3}),
    (DDIMConfig, {"beta_schedule": "sigmoid"}),
])
def test_unsupported_scheduler_value_is_an_error_naming_it(our_class, options):
    (key, _), = options.items()
    with pytest.raises(SchedulerConfigError, match=key):
        our_class.from_config(options)


def test_unreadable_scheduler_config_names_the_file(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text("{not json")
    with pytest.raises(SchedulerConfigError, match="scheduler_config.json"):
        read_scheduler_config(tmp_path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(SchedulerConfigError, match="JSON object"):
        read_scheduler_config(path)
