"""``python -m experiments.mnist``: the main job from the repository root, the same program as ``ddpm-jax-train``.

Train a DDPM on MNIST (or Fashion-MNIST, CIFAR-10, a folder of your own images) and draw its
figures; ``--help`` lists the flags. The program lives in :mod:`ddpm_jax.cli.train`.
"""

import sys

from ddpm_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.mnist"))
