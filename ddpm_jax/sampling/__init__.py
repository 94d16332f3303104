"""Sampling from a trained checkpoint: :func:`ddpm_jax.sampling.generate.sample` (``ddpm_jax.sample``), its
options, and the denoiser that joins a network to the diffusion math."""

