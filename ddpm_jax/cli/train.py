"""Train a DDPM on MNIST: ``ddpm-jax-train --workdir runs/mnist`` (or ``python -m experiments.mnist``).

Or on Fashion-MNIST or CIFAR-10 (``--dataset``), or on a folder of your own images
(``--image-dir DIR``, see :mod:`ddpm_jax.data.image_folder`). Parses flags, loads the data
(before anything is written), calls :func:`ddpm_jax.training.train.train_and_evaluate` (a run already in
``--workdir`` resumes from its latest checkpoint), then draws the run's figures
from its last checkpoint (:func:`ddpm_jax.evaluation.figures.write_figures`). ``--time-limit 10m`` or ``--stop-at STEP``
time-box a long run: it stops there with a checkpoint, its length and learning-rate schedule unchanged, and
the same command continues it. Exit status: 0
done; 2 a bad flag, config value, dataset, image folder or workdir, a workdir in use by another
process, or a damaged checkpoint that cannot be replaced (one ``error:`` line);
3 a NaN/Inf loss or update, or a diverging loss (see ``train.on_nonfinite`` and
``train.divergence_factor``; nothing after the last good state is saved); 130/143 stopped by SIGINT/SIGTERM
after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys

import jax

from ddpm_jax import configs as configs_lib
from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.cli.flags import apply_override, check_overrides_read, duration_seconds
from ddpm_jax.data import image_folder as image_folder_lib
from ddpm_jax.evaluation.figures import write_figures
from ddpm_jax.evaluation.previews import SampleGrids
from ddpm_jax.training import guard as guard_lib
from ddpm_jax.training import loop as training_loop_lib
from ddpm_jax.training import tensorboard
from ddpm_jax.training import train as train_lib
from ddpm_jax.training.checkpoint import load_checkpoint
from ddpm_jax.training.workdir import check_workdir, prepare_workdir
from ddpm_jax.utils import parallel

PROG = "ddpm-jax-train"  # the console script (pyproject.toml); `python -m experiments.mnist` from the repository root


EXIT_NONFINITE = 3  # 2: bad flags, config or data; 128 + N: stopped by signal N after saving


def default_preset(backend: str | None = None) -> str:
    """The preset a run gets without ``--preset``: ``gpu`` where JAX's default backend (or ``backend``)
    is a GPU, ``cpu`` otherwise. The report's own setup is ``--preset seed``."""
    return "gpu" if (backend or jax.default_backend()) == "gpu" else "cpu"


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/mnist", help="run directory: checkpoints, metrics, figures (default: %(default)s)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--dataset", default=None,
                        help=f"what to train on: {', '.join(data_lib.DATASETS)} (config dataset; default: the "
                             "preset's, mnist for all but --preset cifar10)")
    source.add_argument("--image-dir", default=None,
                        help="train on your own images: a folder of PNG/JPEG files, searched recursively, "
                             "center-cropped and resized to data.image_size; with one subfolder per class, the "
                             "subfolder names are the labels")
    p.add_argument("--data-dir", default=None,
                   help="TFDS data directory (the dataset is downloaded and prepared there on first use)")
    p.add_argument("--idx-dir", default=None,
                   help="read the dataset from its four standard IDX files in this folder instead of TFDS")
    p.add_argument("--preset", default=None, choices=configs_lib.PRESETS,
                   help="config preset (default: 'gpu' on a GPU, 'cpu' otherwise; 'seed' is the report's setup)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="total training steps (config train.num_steps)")
    length.add_argument("--epochs", type=float, default=None, help="total training epochs, converted to steps")
    p.add_argument("--time-limit", type=duration_seconds, default=None, metavar="DURATION",
                   help="stop after this much training (e.g. 90s, 10m, 1.5h; a bare number is minutes, compilation "
                        "included), saving a checkpoint; the run keeps its length and learning-rate schedule, so "
                        "the same command continues it")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after this step, saving a checkpoint (as --time-limit: the same command continues)")
    p.add_argument("--batch-size", type=int, default=None, help="config train.batch_size")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (config train.learning_rate)")
    p.add_argument("--seed", type=int, default=None, help="config seed")
    p.add_argument("--class-conditional", action="store_true",
                   help="train a class-conditional network (model.num_classes = the dataset's classes, labels "
                        "dropped with probability train.p_uncond) for choosing classes and classifier-free guidance")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set diffusion.schedule=linear "
                        "--set diffusion.num_timesteps=1000 --set model.base_channels=32 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    dist = p.add_argument_group("several hosts (data parallel over every device of every process)")
    dist.add_argument("--coordinator-address", default=None,
                      help="host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS; 'auto' on SLURM/Open MPI/TPU)")
    dist.add_argument("--num-processes", type=int, default=None, help="default: $JAX_NUM_PROCESSES")
    dist.add_argument("--process-id", type=int, default=None, help="default: $JAX_PROCESS_ID")
    return p.parse_args(argv)


class FiguresInterrupted(Exception):
    """SIGINT or SIGTERM arrived while the end-of-run figures were being drawn."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


def _stop_drawing(signum: int) -> None:
    raise FiguresInterrupted(signum)


def build_config(args: argparse.Namespace):
    config = configs_lib.get_config(args.preset or default_preset())
    if args.image_dir is not None:
        config.dataset = data_lib.IMAGE_FOLDER
    elif args.dataset is not None:
        config.dataset = args.dataset
    if args.class_conditional:
        config.model.num_classes = 10
    for assignment in args.overrides:
        apply_override(config, assignment)
    if args.image_dir is not None and config.dataset != data_lib.IMAGE_FOLDER:
        raise ValueError(f"--image-dir and --set dataset={config.dataset} both name the training data; give one.")
    if args.steps is not None:
        config.train.num_steps = args.steps
    if args.batch_size is not None:
        config.train.batch_size = args.batch_size
    if args.lr is not None:
        config.train.learning_rate = args.lr
    if args.seed is not None:
        config.seed = args.seed
    # What the data's name already says of its images (training writes them again from the images themselves).
    if config.dataset == data_lib.IMAGE_FOLDER:
        config.data.native_size = config.data.image_size  # the folder's images are resized to it
    elif config.dataset in data_lib.DATASETS:
        size, _, channels = data_lib.dataset_info(config.dataset).image_shape
        config.data.channels, config.data.native_size = channels, size
        if size > config.data.image_size:
            print(f"data.image_size {config.data.image_size} -> {size}: {config.dataset}'s images are {size}x{size}",
                  flush=True)
            config.data.image_size = size
    return config


def load_training_data(config, args: argparse.Namespace):
    """``(images, labels)`` of the run's training data: the folder of ``--image-dir`` (its class names
    written into ``config.data.class_names``) or the config's dataset from ``--idx-dir`` or TFDS."""
    if config.dataset == data_lib.IMAGE_FOLDER:
        folder = image_folder_lib.load_image_folder(args.image_dir, config.data.image_size,
                                                    progress=not args.no_progress)
        config.data.class_names = folder.class_names
        kind = (f"{folder.num_classes} classes ({', '.join(folder.class_names)})" if folder.labels is not None
                else "no class subfolders: unlabelled")
        channels = "grey" if folder.images.shape[-1] == 1 else "RGB"
        print(f"{args.image_dir}: {len(folder.images):,} {channels} images at {config.data.image_size}x"
              f"{config.data.image_size}, {kind}", flush=True)
        return folder.images, folder.labels
    return data_lib.load_dataset(config.dataset, "train", data_dir=args.data_dir, idx_dir=args.idx_dir)


def fit_config_to_data(config, labels, class_conditional: bool) -> None:
    """What the labels decide: a conditional network gets one label per class of the data; an unlabelled
    folder trains an unconditional one."""
    num_classes = int(config.model.num_classes)
    if labels is None:
        if class_conditional:
            raise ValueError("--class-conditional needs labels: put the images in one subfolder per class "
                             "(the subfolder names are the labels).")
        if num_classes:
            print(f"preset {config.preset} is class-conditional, but the images have no labels: training an "
                  "unconditional network (model.num_classes=0)", flush=True)
            config.model.num_classes = 0
    elif num_classes:
        config.model.num_classes = (len(config.data.class_names) if config.dataset == data_lib.IMAGE_FOLDER
                                    else len(data_lib.dataset_info(config.dataset).class_names))


def main(argv=None, prog: str = PROG) -> int:
    """Run the program with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv, prog)
    # Before anything touches a device (default_preset asks for the backend).
    try:
        parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    except (ValueError, RuntimeError) as e:  # bad distributed flags, or a coordinator out of reach
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.stop_at is not None and args.stop_at < 1:
            raise ValueError(f"--stop-at {args.stop_at}: must be a step >= 1.")
        if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
            raise ValueError(f"--epochs {args.epochs}: must be a finite number > 0 (it is converted to steps).")
        config = build_config(args)
        if args.image_dir is not None and args.idx_dir is not None:
            raise ValueError("--image-dir and --idx-dir both name the training data; give one.")
        if config.dataset != data_lib.IMAGE_FOLDER:
            data_lib.dataset_info(config.dataset)  # an unknown name, before anything is loaded
        configs_lib.validate_config(config)
        check_overrides_read(config, args.overrides)
        check_workdir(args.workdir)  # a bad workdir is named before the data is read
        # The data is read (and refused) before anything is written.
        images, labels = load_training_data(config, args)
        fit_config_to_data(config, labels, args.class_conditional)
        check_overrides_read(config, args.overrides)
        num_images = configs_lib.num_training_images(config, len(images))
        configs_lib.validate_config(config, num_examples=num_images)
        prepare_workdir(args.workdir)
    except (ValueError, data_lib.DatasetNotFoundError) as e:  # IDXFormatError and ImageFolderError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.epochs is not None:
        steps = args.epochs * num_images / config.train.batch_size  # a float: huge epochs give inf, not an int overflow
        if not steps <= configs_lib.MAX_STEPS:
            print(f"error: --epochs {args.epochs}: {steps:,.0f} steps at batch {config.train.batch_size}; "
                  f"at most {configs_lib.MAX_STEPS:,} (the step counter is an int32).", file=sys.stderr)
            return 2
        config.train.num_steps = math.ceil(steps)
    print(f"preset {config.preset} on {jax.default_backend()}: {config.train.num_steps:,} steps at batch "
          f"{config.train.batch_size}, workdir {args.workdir}", flush=True)
    events = tensorboard.open_events(args.workdir, config) if jax.process_index() == 0 else None
    if events is not None:
        print(f"TensorBoard: tensorboard --logdir {args.workdir}", flush=True)
    # The grids sample on this process's devices alone: one process only.
    hooks = (SampleGrids.hook(config, args.workdir, events),) if jax.process_count() == 1 else ()
    try:
        state = train_lib.train_and_evaluate(config, args.workdir, images=images, labels=labels,
                                             progress=not args.no_progress, stop_at=args.stop_at,
                                             time_limit=args.time_limit, hooks=hooks, events=events)
        if int(state.step) < config.train.num_steps:
            why = f"--time-limit {args.time_limit:g} s" if args.stop_at is None or int(state.step) < args.stop_at \
                else f"--stop-at {args.stop_at}"
            print(f"stopped at step {int(state.step):,} of {config.train.num_steps:,} ({why}), checkpoint saved; "
                  "the same command continues the run", flush=True)
        if jax.process_index() == 0:  # one process draws the figures, from what was saved
            checkpoint = load_checkpoint(args.workdir)
            if checkpoint.step == int(state.step):
                with training_loop_lib.StopSignals(on_signal=_stop_drawing):
                    write_figures(checkpoint, args.workdir, progress=not args.no_progress)
    except (ValueError, OSError) as e:  # OSError: the disk filled up, a folder vanished mid-run
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (guard_lib.NonFiniteLossError, guard_lib.TrainingDivergedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except training_loop_lib.TrainingInterrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum  # the shell's convention for "ended by signal N"
    except FiguresInterrupted as e:
        print(f"stopped by {e.name} while drawing the figures; the run itself is saved in {args.workdir}. Rerun the "
              "same command to draw them.", file=sys.stderr)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
