"""The samplers, in one place: pure functions of network variables and a PRNG key.

* :mod:`ddpm_jax.diffusion.ancestral`: Ho et al. 2020's Algorithm 2 (``ancestral_sample``) and
  :func:`make_ancestral_sampler`;
* :mod:`ddpm_jax.diffusion.ddim`: DDIM (Song et al. 2021), :func:`make_ddim_sampler`, :func:`make_ddim_decoder`,
  :func:`ddim_invert`;
* :mod:`ddpm_jax.diffusion.dpm_solver`: DPM-Solver++ (Lu et al. 2022), :func:`make_dpm_solver_sampler`,
  :func:`make_dpm_solver_decoder`, :func:`dpm_solver_coefficients`, :func:`dpm_solver_orders`.

Each factory returns a function to ``jax.jit`` that runs the whole reverse
chain inside one ``lax.scan`` (no Python loop over timesteps).

Fewer steps than the network was trained with: pass a respaced schedule
(:func:`ddpm_jax.configs.schedule_from_config` with ``steps=K``) and, as
``timesteps``, the training timestep each of its K indices stands for; the
network is then called with those. Ancestral sampling on a respaced schedule
is Nichol & Dhariwal's (2021) respacing; :func:`make_ddim_sampler` is Song et
al.'s (2021) DDIM on the same schedules.

Classifier guidance (Dhariwal & Nichol 2021): every sampler takes an optional
``cond_fn(variables, x_t, t) -> s grad log p(y | x_t, t)`` (see
:func:`ddpm_jax.diffusion.guidance.classifier_grad_fn`), evaluated inside the jitted chain
at every step; classifier-free guidance is a guided ``eps_fn``
(:func:`ddpm_jax.diffusion.guidance.classifier_free_fn`). ``variables`` is whatever the
functions take: network variables, or a :class:`ddpm_jax.diffusion.guidance.GuidanceInputs`.
"""

from __future__ import annotations

from ddpm_jax.diffusion.ancestral import make_ancestral_sampler
from ddpm_jax.diffusion.chain import CondFn
from ddpm_jax.diffusion.ddim import ddim_invert, make_ddim_decoder, make_ddim_sampler
from ddpm_jax.diffusion.dpm_solver import (
    DPM_SOLVER_ORDERS,
    dpm_solver_coefficients,
    dpm_solver_orders,
    make_dpm_solver_decoder,
    make_dpm_solver_sampler,
)

__all__ = [
    "CondFn",
    "DPM_SOLVER_ORDERS",
    "ddim_invert",
    "dpm_solver_coefficients",
    "dpm_solver_orders",
    "make_ancestral_sampler",
    "make_ddim_decoder",
    "make_ddim_sampler",
    "make_dpm_solver_decoder",
    "make_dpm_solver_sampler",
]
