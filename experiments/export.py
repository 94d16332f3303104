"""Export a trained run for PyTorch: ``python -m experiments.export --workdir RUN --out DIR``.

A run of Ho et al.'s U-Net (``model.name='ddpm_unet'``: the ``ddpm`` and ``cifar10`` presets) becomes a diffusers
``DDPMPipeline`` folder: ``DIR/unet/`` (``UNet2DModel``: ``config.json``, ``diffusion_pytorch_model.safetensors``),
``DIR/scheduler/scheduler_config.json`` (``DDPMScheduler``, our exact betas) and ``DIR/model_index.json``, so that
``diffusers.DDPMPipeline.from_pretrained(DIR)`` samples from it. A run of the report's U-Net
(``'report_unet'``: the ``cpu``, ``quick``, ``seed`` and ``gpu`` presets), which no diffusers class expresses,
becomes ``DIR/report_unet.safetensors`` (weights and BatchNorm running statistics), ``DIR/config.json``, the PyTorch
module that loads them (``DIR/report_unet.py``, a copy of experiments/report_unet_torch.py) and the scheduler
config. Either way ``DIR/README.md`` says how to load it. The mapping is ddpm_jax.interop's (docs/interop.md);
writing it needs neither torch nor diffusers.

Exit status: 0 written; 2 a bad flag, a missing or damaged run, or a network the format cannot express: one
``error:`` line, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from ddpm_jax import cpu
from ddpm_jax.cli import flags
from ddpm_jax.interop import diffusers as diffusers_lib
from ddpm_jax.interop import report_unet as report_lib
from ddpm_jax.training.checkpoint import load_checkpoint

TORCH_MODULE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report_unet_torch.py")


def parse_args(argv=None) -> argparse.Namespace:
    p = flags.OneLineErrors(prog="python -m experiments.export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run's directory (its latest checkpoint)")
    p.add_argument("--out", required=True, help="the folder to write (created; files in it are replaced)")
    p.add_argument("--step", type=int, default=None, help="this checkpoint step instead of the latest")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="the EMA weights (default, as sampling uses) or the last step's")
    return p.parse_args(argv)


def _readme_diffusers(config, weights: str, step: int) -> str:
    m = config.model
    classes = int(m.get("num_classes", 0))
    lines = [
        "# A ddpm-jax run as a diffusers DDPMPipeline",
        "",
        f"Ho et al.'s U-Net ({weights} weights of step {step:,}), written by `python -m experiments.export`.",
        "",
        "```python",
        "from diffusers import DDPMPipeline",
        "pipeline = DDPMPipeline.from_pretrained(\"THIS_FOLDER\")",
    ]
    if classes:
        lines += ["# class-conditional: DDPMPipeline passes no labels, so call the U-Net and scheduler yourself:",
                  "eps = pipeline.unet(x, t, class_labels=y).sample",
                  "```", ""]
    else:
        lines += ["images = pipeline(batch_size=16, num_inference_steps="
                  f"{int(config.diffusion.num_timesteps)}).images  # PIL images", "```", ""]
    lines += [
        f"Inputs of `unet(x, t{', class_labels=y' if classes else ''})`: `x` float (B, {config.data.channels}, "
        f"{config.data.image_size}, {config.data.image_size}) in [-1, 1] (NCHW); `t` 0-based integer timesteps "
        f"0..{int(config.diffusion.num_timesteps) - 1} (index i is the paper's t = i + 1)"
        + (f"; `y` integer labels 0..{classes - 1}, or {classes} for the null label (classifier-free guidance's "
           "unconditional prediction)" if classes else "") + ".",
        f"Output: eps{' and v (channels C..2C-1, learned_range)' if m.get('learn_variance', False) else ''}.",
        "The scheduler holds the run's exact betas (`trained_betas`). `ddpm_jax` reads this folder back with "
        "`python -m experiments.import_diffusers --model THIS_FOLDER --workdir RUN`.",
        "",
    ]
    return "\n".join(lines)


def _readme_report(config, weights: str, step: int) -> str:
    classes = int(config.model.get("num_classes", 0))
    return "\n".join([
        "# The report's U-Net of a ddpm-jax run, for PyTorch",
        "",
        f"{weights} weights of step {step:,} and BatchNorm running statistics, written by "
        "`python -m experiments.export`. No diffusers class has this network (max-pooling, BatchNorm, transposed "
        "convolutions), so it comes with its own PyTorch module, `report_unet.py` (needs torch and safetensors):",
        "",
        "```python",
        "import torch, report_unet  # with this folder on sys.path",
        "model = report_unet.load(\"THIS_FOLDER\")  # eval mode: BatchNorm uses the running averages",
        f"eps = model(x, t{', y' if classes else ''})",
        "```",
        "",
        f"Inputs: `x` float32 (B, {config.data.channels}, {config.data.image_size}, {config.data.image_size}) in "
        f"[-1, 1] (NCHW); `t` int64 (B,) 0-based timesteps 0..{int(config.diffusion.num_timesteps) - 1} (index i is "
        "the paper's t = i + 1)"
        + (f"; `y` int64 (B,) labels 0..{classes - 1}, {classes} (the null label) or None (all null)" if classes
           else "") + ".",
        "`config.json` holds the constructor's arguments; `report_unet.safetensors` the weights under the module's "
        "state-dict names (`down.{l}`, `mid.{0,1}`, `up.{i}.upconv`, `up.{i}.block`, `head`"
        + (", `label_embedding`" if classes else "") + "). `scheduler/scheduler_config.json` is the schedule as a "
        "diffusers `DDPMScheduler` (the run's exact betas), to step with.",
        "",
    ])


def export(checkpoint, out: str) -> list[str]:
    """Write ``checkpoint`` (a :class:`~ddpm_jax.training.checkpoint.DiffusionCheckpoint`) to the folder ``out``;
    returns the paths written."""
    config = checkpoint.config
    params = checkpoint.variables["params"]
    if config.model.name == "ddpm_unet":
        diffusers_lib.check_exportable(config)
        os.makedirs(out, exist_ok=True)
        written = diffusers_lib.write_pipeline(params, config, out)
        readme = _readme_diffusers(config, checkpoint.weights_used, checkpoint.step)
    else:
        report_lib.module_config(config)
        os.makedirs(out, exist_ok=True)
        written = report_lib.write_report_unet(params, checkpoint.batch_stats, config, out)
        module = shutil.copyfile(TORCH_MODULE, os.path.join(out, "report_unet.py"))
        written += [module, diffusers_lib.write_scheduler(config, out)]
        readme = _readme_report(config, checkpoint.weights_used, checkpoint.step)
    path = os.path.join(out, "README.md")
    with open(path, "w") as f:
        f.write(readme)
    return written + [path]


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv)
    try:
        if not args.out.strip():
            raise ValueError("--out is empty; give a folder to write, e.g. --out exports/mnist.")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} exists and is not a folder; give a folder.")
        checkpoint = load_checkpoint(args.workdir, step=args.step, weights=args.weights)
        if checkpoint.config.model.name == "ddpm_unet":
            diffusers_lib.check_exportable(checkpoint.config)
        written = export(checkpoint, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {checkpoint.step:,} of {args.workdir} ({checkpoint.weights_used} weights, "
          f"{checkpoint.config.model.name}) to {args.out}:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
