"""Flags shared by the command-line programs (``ddpm_jax.cli`` and ``experiments/``): ``--set FIELD=VALUE``
overrides, and the options of the evaluation-style tools that read a trained run.

Entry points import from here, never from one another.
"""

from __future__ import annotations

import argparse
import ast
import math

from ddpm_jax import data as data_lib
from ddpm_jax.configs import check_field_read
from ddpm_jax.data import image_folder as image_folder_lib
from ddpm_jax.diffusion.schedules import SPACINGS
from ddpm_jax.sampling.options import DEFAULT_ORDER, SAMPLING_METHODS
from ddpm_jax.utils import cache


class OneLineErrors(argparse.ArgumentParser):
    """argparse, but a bad flag ends in one ``error:`` line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def apply_override(config, assignment: str) -> None:
    """Set ``a.b.c=value`` on ``config``; the value is parsed as a Python literal if it is one."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. --set model.base_channels=32.")
    field, raw = assignment.split("=", 1)
    # Shown as typed, unless it holds a newline or other control character, which would break the one-line error.
    shown_field, shown_raw = (t if t.isprintable() else repr(t) for t in (field, raw))
    *parents, leaf = field.strip().split(".")
    if not parents and leaf == "preset":
        raise ValueError(f"--set {shown_field}: the preset is chosen with --preset, not set as a field.")
    node = config
    for name in parents:
        if name not in node or not hasattr(node[name], "keys"):
            raise ValueError(f"--set {shown_field}: unknown config section {name!r}; sections: {', '.join(k for k in node.keys() if hasattr(node[k], 'keys'))}.")
        node = node[name]
    if leaf not in node:
        raise ValueError(f"--set {shown_field}: unknown field {leaf!r}; allowed here: {', '.join(sorted(node.keys()))}.")
    if hasattr(node[leaf], "keys"):
        raise ValueError(f"--set {shown_field}: {'.'.join((*parents, leaf))} is a section; set one of its fields, "
                         f"e.g. --set {'.'.join((*parents, leaf))}.{sorted(node[leaf].keys())[0]}=...; fields: "
                         f"{', '.join(sorted(node[leaf].keys()))}.")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is an int to Python; a count, size or rate given True/False is still a mistake.
    if current is not None and (not isinstance(value, type(current)) or isinstance(value, bool) != isinstance(current, bool)):
        kind = type(current).__name__
        raise ValueError(f"--set {shown_field}={shown_raw}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind} like {current!r}.")
    node[leaf] = value




_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """``--time-limit``'s value in seconds: a number with an optional unit s, m or h (a bare number is minutes)."""
    text = text.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "m")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; e.g. 90s, 10m or 1.5h") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite duration > 0, e.g. 90s, 10m or 1.5h")
    return value


def check_overrides_read(config, assignments: list[str]) -> None:
    """Refuse a ``--set`` of a field that nothing the final config builds reads, whatever its value
    (:func:`ddpm_jax.configs.check_field_read`); after every flag and what the data decided are applied."""
    for assignment in assignments:
        check_field_read(config, assignment.split("=", 1)[0].strip())


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse a bad ``--seed``, ``--batch-size`` or ``--guidance-scale`` of a sampling program, one line naming the value."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be at least 1.")
    if not 0 <= args.seed <= 2**32 - 1:
        raise ValueError(f"--seed {args.seed}: must be an integer in 0..{2**32 - 1}.")
    if args.guidance_scale is not None and not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        raise ValueError(f"--guidance-scale {args.guidance_scale}: must be a finite number >= 0 (0: no guidance).")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--idx-dir``: where the run's dataset (its config's ``dataset``) comes from, as for training."""
    p.add_argument("--data-dir", default=None, help="TFDS data directory (as for training)")
    p.add_argument("--idx-dir", default=None,
                   help="read the run's dataset from its standard IDX files in this folder instead of TFDS")


def run_image_folder(config, args: argparse.Namespace, progress: bool = False):
    """The run's folder of images (``--image-dir``, loaded at the run's native size) when it was trained on one, or
    ``None`` when it was trained on a dataset; a missing or unwanted ``--image-dir`` is refused with the fix."""
    dataset = config.get("dataset", "mnist")
    if dataset == data_lib.IMAGE_FOLDER:
        if args.image_dir is None:
            raise ValueError("this run was trained on a folder of images: pass the same folder with --image-dir DIR.")
        return image_folder_lib.load_image_folder(args.image_dir, int(config.data.get("native_size", 28)),
                                                  progress=progress)
    if args.image_dir is not None:
        raise ValueError(f"this run was trained on {data_lib.dataset_info(dataset).title}, not on a folder of "
                         "images; drop --image-dir.")
    return None


def load_run_split(config, split: str, args: argparse.Namespace):
    """``(images, labels)`` of ``split`` of the dataset a run was trained on (its config's ``dataset``), from
    ``--idx-dir`` or TFDS (``--data-dir``); a run on a folder of images is refused with where to measure it."""
    dataset = config.get("dataset", "mnist")
    if dataset == data_lib.IMAGE_FOLDER:
        raise ValueError("this run was trained on a folder of images, which has no fixed test split; measure it with "
                         "ddpm-jax-evaluate --workdir RUN --image-dir DIR.")
    return data_lib.load_dataset(dataset, split, data_dir=args.data_dir, idx_dir=args.idx_dir)


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """``--steps``, ``--method``, ``--order`` and ``--spacing``: which sampler, with how many network calls."""
    p.add_argument("--steps", type=int, default=None,
                   help="reverse steps K, one network call each (default: all T; K < T respaces)")
    p.add_argument("--method", choices=SAMPLING_METHODS, default=None,
                   help="sampler (default: ancestral for all T steps, sde_dpm_solver++ with --steps K < T)")
    p.add_argument("--order", type=int, default=None,
                   help=f"dpm_solver++ / sde_dpm_solver++: the solver's order, 1-3 (default: {DEFAULT_ORDER})")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="where K < T steps fall among the training timesteps (default: trailing; see "
                        "ddpm_jax.diffusion.schedules.spaced_timesteps)")


def add_cache_flag(p: argparse.ArgumentParser) -> None:
    """``--cache-dir``: where the feature classifier and reference features are cached."""
    p.add_argument("--cache-dir", default=None,
                   help="where the feature classifier and reference features are cached "
                        f"(default: ${cache.CACHE_ENV}, else {cache.cache_dir({})})")


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (plain log lines only)")
