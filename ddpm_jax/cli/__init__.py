"""The command-line programs, installed as console scripts (``pyproject.toml``, ``[project.scripts]``).

- ``ddpm-jax-train`` (:mod:`ddpm_jax.cli.train`): train a DDPM and draw its figures; from the
  repository root also ``python -m experiments.mnist``.
- ``ddpm-jax-sample`` (:mod:`ddpm_jax.cli.sample`): draw samples from a trained run into a PNG grid
  and an ``.npz`` file.
- ``ddpm-jax-evaluate`` (:mod:`ddpm_jax.cli.evaluate`): FID, unreadable rate and digit histogram of a
  run's samples; from the repository root also ``python -m experiments.evaluate``.

Each ``main(argv)`` returns an exit status and first makes the CPU speed settings of
:func:`ddpm_jax.cpu.configure`. The top layer: nothing in ``ddpm_jax`` imports from here.
"""
