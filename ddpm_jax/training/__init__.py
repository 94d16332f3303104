"""Training machinery: the train state, the one training loop, checkpoints and their manifests, the workdir
lock, the non-finite and divergence guard, and the training of the diffusion model and of the noise-aware
classifier."""

