"""Check an export against its run: ``python -m experiments.check_export --workdir RUN --export DIR``.

Loads the folder ``python -m experiments.export`` wrote, in PyTorch (a diffusers ``UNet2DModel`` for Ho et al.'s
U-Net, the folder's own ``report_unet.py`` module for the report's), feeds it and the run's network the same
random inputs (noised images, timesteps, and labels with the null label among them for a class-conditional
network), and prints the largest difference of the two outputs relative to their scale. float32 rounding through
a few dozen layers is about 1e-6; ``--tolerance`` (default 1e-4) is what passes. Needs torch, and diffusers for
Ho et al.'s U-Net (``pip install 'ddpm-jax[interop]'``). Exported EMA weights are compared with the run's EMA
weights; ``--weights raw`` for an export of the raw ones.

Exit status: 0 the outputs agree; 1 they differ by more than the tolerance; 2 a bad flag, a missing run or
export, or torch / diffusers missing: one ``error:`` line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import jax.numpy as jnp
import numpy as np

from ddpm_jax import cpu
from ddpm_jax.cli import flags
from ddpm_jax.configs import build_model
from ddpm_jax.interop import diffusers as diffusers_lib
from ddpm_jax.training.checkpoint import load_checkpoint

try:  # the interop extra; --help and the errors work without it
    import torch
except ImportError:
    torch = None
try:
    import diffusers
except ImportError:
    diffusers = None


def parse_args(argv=None) -> argparse.Namespace:
    p = flags.OneLineErrors(prog="python -m experiments.check_export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the run that was exported")
    p.add_argument("--export", required=True, help="the folder experiments.export wrote")
    p.add_argument("--step", type=int, default=None, help="the checkpoint step that was exported (default: latest)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="the weights that were exported")
    p.add_argument("--batch", type=int, default=8, help="random inputs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="of the random inputs (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest |theirs - ours| / max |ours| that passes (default: %(default)s)")
    return p.parse_args(argv)


def random_inputs(config, batch: int, seed: int):
    """``x`` (B, H, W, C) float32 N(0, 1), ``t`` (B,) 0-based timesteps, ``y`` (B,) labels cycling through
    0..K (K, the null label, included) or None for an unconditional network."""
    rng = np.random.default_rng(seed)
    size, channels = int(config.data.image_size), int(config.data.channels)
    x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
    t = rng.integers(0, int(config.diffusion.num_timesteps), batch)
    classes = int(config.model.get("num_classes", 0))
    y = np.arange(batch) % (classes + 1) if classes else None
    return x, t, y


def ours(config, variables, x, t, y) -> np.ndarray:
    """The run's network on ``x, t, y`` in eval mode, NCHW."""
    out = build_model(config.model).apply(variables, jnp.asarray(x), jnp.asarray(t, jnp.int32),
                                          None if y is None else jnp.asarray(y, jnp.int32), train=False)
    return np.asarray(out).transpose(0, 3, 1, 2)


def theirs(config, export: str, x, t, y) -> np.ndarray:
    """The exported network, loaded as a PyTorch user would, on the same inputs, NCHW."""
    xt, tt = torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t)
    yt = None if y is None else torch.tensor(y)
    if config.model.name == "ddpm_unet":
        unet = diffusers.UNet2DModel.from_pretrained(os.path.join(export, diffusers_lib.UNET_DIR)).eval()
        with torch.no_grad():
            return unet(xt, tt, class_labels=yt).sample.numpy()
    spec = importlib.util.spec_from_file_location("exported_report_unet", os.path.join(export, "report_unet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.load(export)
    with torch.no_grad():
        return model(xt, tt, yt).numpy()


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv)
    try:
        if args.batch < 1:
            raise ValueError(f"--batch {args.batch}: give at least 1 random input.")
        if torch is None:
            raise ValueError("torch is not installed; pip install 'ddpm-jax[interop]' (torch and diffusers).")
        checkpoint = load_checkpoint(args.workdir, step=args.step, weights=args.weights)
        config = checkpoint.config
        needed = (f"{diffusers_lib.UNET_DIR}/{diffusers_lib.CONFIG_FILE}",) if config.model.name == "ddpm_unet" else ("report_unet.py", "config.json")
        for name in needed:
            if not os.path.isfile(os.path.join(args.export, name)):
                raise ValueError(f"--export {args.export} has no {name}: not an export of a {config.model.name} "
                                 "run; write one with python -m experiments.export.")
        if config.model.name == "ddpm_unet" and diffusers is None:
            raise ValueError("diffusers is not installed; pip install 'ddpm-jax[interop]'.")
        x, t, y = random_inputs(config, args.batch, args.seed)
        reference = ours(config, checkpoint.variables, x, t, y)
        other = theirs(config, args.export, x, t, y)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if other.shape != reference.shape:
        print(f"the export's output has shape {other.shape}, the run's {reference.shape}")
        return 1
    scale = float(np.abs(reference).max())
    difference = float(np.abs(other - reference).max()) / max(scale, 1e-30)
    agree = difference <= args.tolerance
    print(f"step {checkpoint.step:,} of {args.workdir} ({checkpoint.weights_used} weights, {config.model.name}) "
          f"against {args.export} in PyTorch, {args.batch} random inputs: max |theirs - ours| / max |ours| = "
          f"{difference:.2e} (max |ours| = {scale:.3g}): {'agree' if agree else 'DIFFER'} "
          f"(tolerance {args.tolerance:g})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
