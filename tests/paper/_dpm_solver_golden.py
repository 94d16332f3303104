"""Write the golden DPM-Solver++ trajectories of diffusers' ``DPMSolverMultistepScheduler`` that
``test_dpm_solver.py`` compares ours with, so the suite needs no PyTorch.

Run once, in an environment with torch and diffusers (not this project's):
``python tests/paper/_dpm_solver_golden.py`` (it records the versions it ran with).

The model is the exact noise prediction of a Gaussian data distribution, x_0 ~ N(mu, s^2) per pixel:
E[x_0 | x_t] = mu + s^2 sqrt(abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), eps from it.
"""

import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

import importlib.util

# The schedule module alone (numpy, jax and flax.struct), not the package with its training machinery.
_spec = importlib.util.spec_from_file_location(
    "schedules", Path(__file__).resolve().parents[2] / "ddpm_jax" / "schedules.py")
schedules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(schedules)
betas_for, spaced_timesteps = schedules.betas_for, schedules.spaced_timesteps

SHAPE = (4, 2, 2, 1)
MU = np.linspace(-0.6, 0.6, 16).reshape(SHAPE)
S = 0.3


def exact_eps(x, alpha_bar):
    x0 = MU + S**2 * np.sqrt(alpha_bar) * (x - np.sqrt(alpha_bar) * MU) / (alpha_bar * S**2 + 1 - alpha_bar)
    return (x - np.sqrt(alpha_bar) * x0) / np.sqrt(1 - alpha_bar)


def trajectory(betas, timesteps, order, algorithm, thresholding, x_T):
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=len(betas), trained_betas=betas.tolist(), solver_order=order,
        algorithm_type=algorithm, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
        thresholding=thresholding, sample_max_value=1.0, prediction_type="epsilon")
    scheduler.set_timesteps(timesteps=[int(t) for t in timesteps[::-1]])
    alpha_bars = np.cumprod(1.0 - betas)
    x = torch.tensor(x_T, dtype=torch.float32)
    states = []
    for t in scheduler.timesteps:
        eps = torch.tensor(exact_eps(x.double().numpy(), alpha_bars[int(t)]), dtype=torch.float32)
        x = scheduler.step(eps, t, x).prev_sample
        states.append([float(f"{v:.9g}") for v in x.numpy().ravel()])  # float32 holds 9 significant digits
    return [int(t) for t in scheduler.timesteps], states


def main():
    x_T = np.random.default_rng(0).standard_normal(SHAPE)
    cases = []
    for schedule, T in (("cosine", 100), ("linear", 1000)):
        betas = betas_for(schedule, T)
        for spacing in ("trailing", "linspace", "leading"):
            for order in (1, 2, 3):
                for steps in (8, 20):
                    for thresholding in (False, True):
                        if thresholding and (order != 2 or steps != 8):
                            continue
                        timesteps = spaced_timesteps(T, steps, spacing)
                        visited, states = trajectory(betas, timesteps, order, "dpmsolver++", thresholding, x_T)
                        cases.append({"schedule": schedule, "T": T, "spacing": spacing, "order": order,
                                      "steps": steps, "clip": thresholding, "timesteps": visited, "states": states})
    # diffusers' own spacing for DPM-Solver: 'trailing' is ours exactly.
    own = DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    own.set_timesteps(10)
    out = {"diffusers": diffusers.__version__, "torch": torch.__version__, "shape": list(SHAPE),
           "mu": MU.ravel().tolist(), "s": S, "x_T": [float(f"{v:.9g}") for v in x_T.ravel()],
           "diffusers_trailing_1000_10": [int(t) for t in own.timesteps], "cases": cases}
    path = Path(__file__).parent / "golden" / "dpm_solver_diffusers.json"
    path.write_text(json.dumps(out))
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
