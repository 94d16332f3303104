"""Import a diffusers model as a run: ``python -m experiments.import_diffusers --model DIR --workdir RUN``.

``DIR`` is a ``DDPMPipeline`` folder (``unet/`` with ``config.json`` and ``diffusion_pytorch_model.safetensors``,
``scheduler/scheduler_config.json``) or a ``UNet2DModel`` folder with a ``scheduler_config.json`` beside it. A
``UNet2DModel`` our ``DDPMUNet`` expresses (DownBlock2D/AttnDownBlock2D and their up blocks, the positional time
embedding with ``flip_sin_to_cos=False`` and ``freq_shift=0``, GroupNorm epsilon 1e-6, ``resnet_time_scale_shift``
``'default'``, one attention head width, ...) and a ``DDPMScheduler`` whose betas one of our schedules gives become
``RUN``: the checkpoint and ``config.json`` training writes, so that ``ddpm_jax.load_checkpoint(RUN)``,
``ddpm_jax.sample`` and ``python -m experiments.evaluate --workdir RUN`` take it. What cannot be expressed is refused,
naming the config field (docs/interop.md lists what is supported).

Exit status: 0 written; 2 a bad flag, a missing folder or file, a config we cannot express, or a ``--workdir``
that already holds checkpoints: one ``error:`` line, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys

from ddpm_jax import cpu
from ddpm_jax.cli import flags
from ddpm_jax.data import DATASETS
from ddpm_jax.interop import diffusers as diffusers_lib
from ddpm_jax.interop.workdir import write_run


def parse_args(argv=None) -> argparse.Namespace:
    p = flags.OneLineErrors(prog="python -m experiments.import_diffusers", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a DDPMPipeline (or UNet2DModel) folder, saved as safetensors")
    p.add_argument("--workdir", required=True, help="the run directory to write (new, or without checkpoints)")
    p.add_argument("--dataset", choices=tuple(DATASETS), default=None,
                   help="what evaluation compares the samples with (default: mnist for grey, cifar10 for RGB)")
    p.add_argument("--native-size", type=int, default=None,
                   help="the images' own height and width, samples are cropped to it (default: the model's size)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv)
    try:
        if not os.path.isdir(args.model):
            raise ValueError(f"--model {args.model}: no such folder; give a DDPMPipeline folder (unet/, scheduler/).")
        unet, scheduler, state_dict = diffusers_lib.read_pipeline(args.model)
        config = diffusers_lib.run_config_from_diffusers(unet, scheduler, dataset=args.dataset,
                                                         native_size=args.native_size)
        params = diffusers_lib.unet_params(state_dict, config.model, int(config.data.image_size))
        checkpoint_dir = write_run(args.workdir, config, params)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = config.model
    print(f"imported {args.model} as {args.workdir}: ddpm_unet, base {m.base_channels}, channel_mult "
          f"{tuple(m.channel_mult)}, attention at {tuple(m.attention_resolutions)}, {m.num_classes or 'no'} classes; "
          f"{config.diffusion.schedule} schedule, T={config.diffusion.num_timesteps}, sampling.variance "
          f"{config.sampling.variance}, sampling.mean {config.sampling.mean}")
    print(f"  {checkpoint_dir}")
    print(f"  {os.path.join(args.workdir, 'config.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
