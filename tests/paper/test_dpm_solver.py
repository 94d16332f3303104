"""DPM-Solver++ (Lu et al. 2022) and the step spacings: against diffusers' trajectories (golden numbers),
against DDIM at order 1, and against the exact ODE solution (its order of convergence).

The model is the exact noise prediction of a Gaussian data distribution, x_0 ~ N(mu, s^2) per pixel, whose
probability-flow ODE has a closed-form solution: the standardized x_t, (x_t - sqrt(abar_t) mu) /
sqrt(abar_t s^2 + 1 - abar_t), stays constant along it.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.diffusion.samplers import (
    dpm_solver_coefficients,
    dpm_solver_orders,
    make_ddim_sampler,
    make_dpm_solver_decoder,
    make_dpm_solver_sampler,
)
from ddpm_jax.diffusion.schedules import SPACINGS, DiffusionSchedule, betas_for, respace_betas, spaced_timesteps

GOLDEN = json.loads((Path(__file__).parent / "golden" / "dpm_solver_diffusers.json").read_text())


def gaussian_eps_fn(training_betas, mu, s):
    """The exact eps(x_t, t) of data x_0 ~ N(mu, s^2), at training timesteps t."""
    alpha_bars = jnp.asarray(np.cumprod(1.0 - np.asarray(training_betas, np.float64)), jnp.float32)

    def eps_fn(variables, x, t):
        ab = alpha_bars[t].reshape((-1,) + (1,) * (x.ndim - 1))
        x0 = mu + s**2 * jnp.sqrt(ab) * (x - jnp.sqrt(ab) * mu) / (ab * s**2 + 1 - ab)
        return (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)

    return eps_fn


def _respaced(betas, timesteps):
    return DiffusionSchedule.from_betas(respace_betas(betas, timesteps))


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: (f"{c['schedule']}{c['T']}-{c['spacing']}-"
                                                                   f"order{c['order']}-K{c['steps']}"
                                                                   + ("-clip" if c["clip"] else "")))
def test_the_trajectory_matches_diffusers_dpm_solver_multistep_scheduler(case):
    betas = betas_for(case["schedule"], case["T"])
    timesteps = spaced_timesteps(case["T"], case["steps"], case["spacing"])
    assert [int(t) for t in timesteps[::-1]] == case["timesteps"]  # the network is called where theirs is
    shape = tuple(GOLDEN["shape"])
    mu = jnp.asarray(GOLDEN["mu"], jnp.float32).reshape(shape)
    decode = make_dpm_solver_decoder(gaussian_eps_fn(betas, mu, GOLDEN["s"]), _respaced(betas, timesteps),
                                     order=case["order"], clip_denoised=case["clip"], timesteps=timesteps)
    x_T = jnp.asarray(GOLDEN["x_T"], jnp.float32).reshape(shape)
    _, states = jax.jit(decode)(None, x_T)
    np.testing.assert_allclose(np.asarray(states).reshape(len(timesteps), -1), np.asarray(case["states"]),
                               rtol=2e-4, atol=2e-5)


def test_trailing_spacing_is_diffusers_own_and_the_spacings_are_lin_et_al_s():
    assert spaced_timesteps(1000, 10, "trailing")[::-1].tolist() == GOLDEN["diffusers_trailing_1000_10"]
    # Lin et al. 2024, Table 2 (T = 1000, 10 steps), 0-based.
    assert spaced_timesteps(1000, 10, "linspace").tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert spaced_timesteps(1000, 10, "leading").tolist() == list(range(0, 1000, 100))
    assert spaced_timesteps(1000, 10, "trailing").tolist() == list(range(99, 1000, 100))
    betas = betas_for("linear", 1000)
    for spacing in SPACINGS:
        for steps in (1, 2, 7, 50, 1000):
            t = spaced_timesteps(1000, steps, spacing, betas=betas)
            assert len(t) == steps and np.all(np.diff(t) > 0) and 0 <= t[0] and t[-1] <= 999, (spacing, steps)
    logsnr = spaced_timesteps(1000, 20, "logsnr", betas=betas)
    lambdas = 0.5 * np.log(np.cumprod(1 - betas) / (1 - np.cumprod(1 - betas)))
    # Even steps in log-SNR, to rounding (near t = 0 one timestep is a large step in lambda).
    np.testing.assert_allclose(np.diff(lambdas[logsnr])[2:], np.ptp(lambdas) / -19, rtol=0.15)
    with pytest.raises(ValueError, match="unknown spacing 'middle'; allowed: linspace, leading, trailing, logsnr"):
        spaced_timesteps(1000, 10, "middle")


def test_order_one_is_deterministic_ddim_on_the_same_steps():
    betas = betas_for("cosine", 100)
    timesteps = spaced_timesteps(100, 12, "trailing")
    schedule = _respaced(betas, timesteps)
    shape = (3, 4, 4, 1)
    eps_fn = gaussian_eps_fn(betas, jnp.full(shape, 0.2), 0.5)
    key = jax.random.PRNGKey(3)
    ddim = make_ddim_sampler(eps_fn, schedule, shape, timesteps=timesteps)(None, key)
    dpm = make_dpm_solver_sampler(eps_fn, schedule, shape, order=1, timesteps=timesteps)(None, key)
    np.testing.assert_allclose(np.asarray(dpm), np.asarray(ddim), atol=2e-5)


def test_the_orders_start_at_one_climb_and_end_first_order():
    assert dpm_solver_orders(6, 3) == [1, 2, 3, 3, 2, 1]
    assert dpm_solver_orders(20, 3) == [1, 2] + [3] * 17 + [1]
    assert dpm_solver_orders(20, 3, lower_order_final=False) == [1, 2] + [3] * 17 + [1]
    assert dpm_solver_orders(4, 2) == [1, 2, 2, 1] and dpm_solver_orders(1, 2) == [1]
    with pytest.raises(ValueError, match="order must be one of"):
        dpm_solver_orders(10, 4)
    with pytest.raises(ValueError, match="SDE-DPM-Solver.. has orders 1 and 2"):
        dpm_solver_coefficients(np.linspace(0.01, 0.99, 10), 3, stochastic=True)


def _ode_error(order, steps, mu, s, x_T):
    """Max error of the state at the last solver timestep against the exact ODE solution there, on a schedule
    of ``steps`` noise levels uniform in log-SNR from lambda = -5 to 3 (so every step shrinks as 1/steps)."""
    lambdas = np.linspace(3.0, -5.0, steps)  # index 0 is the cleanest, as timesteps ascend
    alpha_bars = 1.0 / (1.0 + np.exp(-2.0 * lambdas))
    schedule = DiffusionSchedule.from_betas(1.0 - alpha_bars / np.append(1.0, alpha_bars[:-1]))
    table = schedule.alpha_bars

    def eps_fn(variables, x, t):
        ab = table[t].reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        x0 = mu + s**2 * jnp.sqrt(ab) * (x - jnp.sqrt(ab) * mu) / (ab * s**2 + 1 - ab)
        return (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)

    decode = make_dpm_solver_decoder(eps_fn, schedule, order=order, clip_denoised=False)
    _, states = jax.jit(decode)(None, x_T)
    ab = np.asarray(table, np.float64)
    z = (np.asarray(x_T, np.float64) - np.sqrt(ab[-1]) * mu) / np.sqrt(ab[-1] * s**2 + 1 - ab[-1])
    exact = np.sqrt(ab[0]) * mu + np.sqrt(ab[0] * s**2 + 1 - ab[0]) * z
    return float(np.max(np.abs(np.asarray(states[-2], np.float64) - exact)))


# Order 3 is measured where its third-order steps dominate: its first step is first order (a multistep
# method has no history yet), whose local error O(h^2) takes over below h ~ 1/32 (slope 2.3, then 2.1).
@pytest.mark.parametrize("order, steps, least_slope", [(1, (16, 32, 64), 0.95), (2, (32, 64, 128), 1.9),
                                                       (3, (8, 16, 32), 2.8)])
def test_the_error_against_the_exact_ode_solution_falls_at_the_solvers_order(order, steps, least_slope):
    x_T = jnp.asarray(np.random.default_rng(0).standard_normal((8, 1, 1, 1)), jnp.float32)
    errors = np.array([_ode_error(order, k, 0.3, 0.4, x_T) for k in steps])
    slopes = -np.diff(np.log(errors)) / np.diff(np.log(np.array(steps)))
    assert np.all(slopes > least_slope), (errors, slopes)
