"""Entry points: thin command-line wrappers around ``ddpm_jax``."""
