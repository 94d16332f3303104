"""Experiment configs as data, and what a config builds.

One ``ml_collections.ConfigDict`` per preset. Everything that knows the config's fields is
here: the presets, the one check of every field (:func:`validate_config`) and the builders
(:func:`schedule_from_config`, :func:`build_model`, :func:`diffusion_optimizer`,
:func:`create_train_state`), which turn a config into objects once. Training reads the
config only here and in its entry point (:func:`ddpm_jax.train.train_and_evaluate`); the
step and sampler factories, the training loop and the checkpoints are handed objects (and
the checkpoints a plain dict to store), not the config. A new field is added in one file:
its default in a preset, its check, and where it is built.

``get_config(preset)`` returns a fresh, mutable config; command-line flags
override fields of it (``--set model.base_channels=16``), and the config used
is saved as JSON beside every checkpoint, so a checkpoint loads without it
being repeated.

Presets:

* ``cpu``: the default on a machine without a GPU: the ``quick`` network made
  class-conditional and trained 9,000 steps (about 18 minutes on 2 CPU cores).
  ``sample()`` without labels draws each digit from the training label
  frequencies and guides it (classifier-free, w = 0.5): the sweep of
  ``python -m experiments.sweep`` found this the lever that buys the most
  quality per CPU minute (README, "Quality per CPU minute").
* ``quick``: the default before issue 13, for demos and tests. The report's
  U-Net shrunk to 16 base channels and 2 levels at 28x28 (no padding), ending
  in a plain convolution instead of the report's one-channel final block (which
  alone left the loss 1.6x higher and the samples unreadable at this size),
  unconditional, cosine T=100, 3,000 steps at batch 64: about 6 minutes.
* ``gpu``: the default where JAX sees a GPU: the report's U-Net (32x32, 32 base channels, 4
  levels) made class-conditional with a zero-initialized convolutional head, trained 5,000 steps at
  batch 1000 (5M images; about 2 minutes of training at the ~40,000 images/s measured for this
  network on one H200), sampled with classifier-free guidance at w = 1. ``python -m
  benchmarks.gpu_check`` trains and measures it (docs/gpu.md).
* ``seed``: the report's setup: its 12,552,848-parameter U-Net on MNIST padded
  to 32x32, cosine schedule with T=100, batch 1000, 2000 epochs (a GPU run;
  8 hours on the report's RTX 4070).
* ``ddpm``: the ``quick`` preset with Ho et al.'s U-Net (residual blocks, GroupNorm,
  self-attention at 7x7, dropout 0.1) at 16 base channels in place of the report's.
* ``cifar10``: Ho et al.'s CIFAR-10 setup: their U-Net with 128 base channels, multipliers
  (1, 2, 2, 2), 2 residual blocks per level, self-attention at 16x16 and in the middle,
  dropout 0.1, GroupNorm(32) (35,746,307 parameters); linear schedule T=1000; Adam 2e-4
  with 5,000 warm-up steps, batch 128, 800,000 steps, clipping at 1, EMA 0.9999, random
  flips. A GPU run (Ho et al. report FID 3.17).
* ``tiny``: a few-second smoke test for tests and CI.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax.data import DATASETS, IMAGE_FOLDER
from ddpm_jax.diffusion import MEAN_TYPES, VARIANCE_TYPES
from ddpm_jax.models import COMPUTE_DTYPES, CONV_IMPLS, MODEL_NAMES, DDPMUNet, ReportUNet
from ddpm_jax.schedules import DiffusionSchedule, betas_for, respace_betas, spaced_timesteps
from ddpm_jax.train_state import TrainState, count_params, learning_rate_schedule, make_optimizer, new_train_state

PRESETS: tuple[str, ...] = ("cpu", "gpu", "quick", "seed", "ddpm", "cifar10", "tiny")
# What a class-conditional network draws when sample() is given no labels (sampling.unconditional):
# labels drawn from the training label frequencies, then guided ('label_prior'), or the null label ('null').
UNCONDITIONAL_MODES = ("label_prior", "null")
# Which statistics a BatchNorm network normalizes with while sampling (sampling.batchnorm).
BATCHNORM_MODES = ("running", "batch")


def network_shape(model) -> str:
    """The widths of the network a ``model`` section describes; returns e.g. ``'base 16, 2 levels, conv head'``."""
    if model.get("name") == "ddpm_unet":
        return f"{model.base_channels} x {tuple(model.channel_mult)} channels"
    levels = model.get("levels", "?")
    return (f"base {model.get('base_channels', '?')}, {levels} level{'' if levels == 1 else 's'}, "
            f"{model.get('output_head', 'block')} head")


def summary(config) -> str:
    """One line on what a config trains: preset, network, data, schedule and length; returns that text."""
    model, data, train, diffusion = config.model, config.data, config.train, config.diffusion
    classes = int(model.get("num_classes", 0))
    size = int(data.get("image_size", 28))
    return (f"preset {config.get('preset', '?')!r}: {model.get('name', '?')} ({network_shape(model)}"
            f"{f', {classes} classes' if classes else ''}) on "
            f"{config.get('dataset', 'mnist')} {size}x{size}x{int(data.get('channels', 1))}, "
            f"T={diffusion.get('num_timesteps', '?')} {diffusion.get('schedule', '?')}, "
            f"{int(train.get('num_steps', 0)):,} steps at batch {train.get('batch_size', '?')}")


def parameter_count(config) -> int:
    """The number of parameters of the network ``config.model`` describes; returns it without computing any weight."""
    model = build_model(config.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(model_input_shape(config, 1)),
                                               jnp.zeros((1,), jnp.int32), train=False))
    return count_params(shapes["params"])


def preset_table() -> str:
    """The presets' defaults as a Markdown table (the README's, checked by a test); returns the table's text."""
    rows = ["| preset | network | parameters | data | diffusion | batch | steps | learning rate | classes, guidance w |",
            "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for preset in PRESETS:
        c = get_config(preset)
        size, classes = int(c.data.image_size), int(c.model.num_classes)
        rows.append(
            f"| `{preset}` | `{c.model.name}`, {network_shape(c.model)} | {parameter_count(c):,} | {c.dataset} at {size}x{size} | "
            f"{c.diffusion.schedule}, T={c.diffusion.num_timesteps} | {c.train.batch_size:,} | {c.train.num_steps:,} | "
            f"{c.train.learning_rate:g} | {f'{classes}, w = {c.sampling.guidance_scale:g}' if classes else 'none'} |")
    return "\n".join(rows)


class Config(ml_collections.ConfigDict):
    """A run's config: an ``ml_collections.ConfigDict`` whose repr is one line (:func:`summary`).

    ``print(config)`` still shows every field, as YAML.
    """

    def __repr__(self) -> str:
        return f"Config({summary(self)}; print() shows every field)"


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = "cpu"
    c.seed = 0
    # What the run trains on (ddpm_jax.data.DATASETS): 'mnist' or 'fashion_mnist' (28x28 grey, 10 classes),
    # 'cifar10' (32x32 RGB, 10 classes), or 'image_folder' (a folder of your own images, --image-dir).
    c.dataset = "mnist"

    c.data = ml_collections.ConfigDict()
    # Height/width the network sees: MNIST's 28x28 is padded with background
    # (-1) up to this size, and samples are cropped back to 28x28.
    c.data.image_size = 28
    # Written by training from the images, not set by hand: their channels (1 grey, 3 RGB) and their own
    # height and width before the padding to image_size; samples are cropped back to native_size.
    c.data.channels = 1
    c.data.native_size = 28
    # Mirror each training image left-right with probability 1/2 (Ho et al. on CIFAR-10; off for digits and
    # letters, which a mirror turns into other shapes).
    c.data.random_flip = False
    # Use only the first N training images (0: all). For smoke tests.
    c.data.max_train_examples = 0
    # Written by training, not set by hand: a content hash of the training images, so a
    # workdir holding a run on other data is refused instead of resumed with the wrong images.
    c.data.fingerprint = ""
    # Written by training for a class-conditional run, not set by hand: the share of each class among the
    # training labels, from which sample() draws labels when none are given (sampling.unconditional).
    c.data.label_frequencies = ()
    # Written for a run on a folder of images (dataset='image_folder'): its class subfolders, in label order.
    c.data.class_names = ()

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"  # 'linear' | 'cosine'
    c.diffusion.num_timesteps = 100
    c.diffusion.beta_start = 1e-4  # linear schedule only
    c.diffusion.beta_end = 0.02  # linear schedule only
    c.diffusion.cosine_s = 0.008  # cosine schedule only
    c.diffusion.max_beta = 0.999  # cosine schedule only

    c.model = ml_collections.ConfigDict()
    c.model.name = "report_unet"
    c.model.base_channels = 16
    c.model.levels = 2
    c.model.time_embed_dim = 32
    c.model.output_head = "block"  # 'block' (the report's) | 'conv' (a zero-initialized conv)
    c.model.conv_impl = "auto"  # 'auto' | 'xla' | 'matmul': same math, see ddpm_jax/models/layers.py
    c.model.compute_dtype = "float32"  # 'bfloat16': mixed precision (params, optimizer and loss stay float32)
    # Learned reverse variance (Nichol & Dhariwal 2021): the network also outputs v, trained with
    # L_hybrid = L_simple + train.hybrid_lambda * L_vlb, and sampling uses Sigma(v) by default.
    c.model.learn_variance = False
    # Class conditioning (Ho & Salimans 2022): 0 is an unconditional network; 10 (MNIST's digits) adds a
    # learned label embedding to the time embedding, with one more "null" label (index num_classes) that
    # stands for "no label", so one network serves both (see train.p_uncond and ddpm_jax/guidance.py).
    c.model.num_classes = 0
    # model.name='ddpm_unet' only (Ho et al.'s U-Net; levels = len(channel_mult) - 1 downsamplings):
    c.model.channel_mult = (1, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (7,)  # feature-map heights with self-attention
    c.model.dropout = 0.1
    c.model.num_heads = 1
    c.model.norm_groups = 8

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64
    c.train.num_steps = 3000  # total optimizer steps; --epochs converts epochs to steps
    c.train.learning_rate = 2e-3
    c.train.lr_schedule = "cosine"  # 'constant' | 'cosine' (warm-up, then cosine decay to 0)
    c.train.warmup_steps = 100
    c.train.grad_clip_norm = 1.0  # 0 disables; Ho et al. clip at 1
    c.train.hybrid_lambda = 0.001  # lambda of L_hybrid (learned-variance models only)
    # Class-conditional networks only: each training label is replaced by the null label with this
    # probability, which trains the unconditional prediction classifier-free guidance needs.
    c.train.p_uncond = 0.1
    # Per-timestep weighting of L_simple: 'none' (Ho et al.) or 'min_snr' (Hang et al. 2023: each image's
    # eps-MSE weighted by min(SNR_t, gamma) / SNR_t, which down-weights the small-noise timesteps).
    c.train.loss_weighting = "none"
    c.train.min_snr_gamma = 5.0
    # Exponential moving average of the weights (Ho et al.: 0.9999), which sampling uses by default.
    # With the warm-up the decay is min(ema_decay, (1 + n) / (10 + n)) after n updates, so a short
    # run's average is not dominated by its random initialization.
    c.train.ema_decay = 0.9999
    c.train.ema_warmup = True
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    # A NaN/Inf loss or gradient: 'stop' (exit, last good checkpoint untouched) or 'skip'
    # (drop that batch's update; still stop after max_consecutive_skips bad steps in a row).
    c.train.on_nonfinite = "stop"
    c.train.max_consecutive_skips = 10
    # Divergence: a finite loss more than divergence_factor times the median of the last divergence_window
    # steps' losses stops training, and no checkpoint is saved from weights whose next loss is that high
    # (0 turns the check off). Loss curves of these runs never rise 10x; a learning rate 100x too high does.
    c.train.divergence_factor = 10.0
    c.train.divergence_window = 200

    c.sampling = ml_collections.ConfigDict()
    c.sampling.variance = "beta"  # 'beta' | 'beta_tilde' (sigma_t^2); a learn_variance network uses its own
    c.sampling.mean = "x0_clip"  # 'x0_clip' (Ho et al.'s code) | 'eps' (the report's eq. 14)
    c.sampling.batch_size = 100  # images per jitted sampler call
    # Default guidance strength when labels are given: w of classifier-free guidance for a class-conditional
    # network (0: plain conditional sampling), s of classifier guidance (a noise-aware classifier). Both are
    # the lowest FIDs of python -m experiments.guidance's sweep on the cpu preset (README): w = 1 (95% of
    # samples read as the digit asked for), s = 32 (99%; the largest s measured, s = 1 was worse than none).
    c.sampling.guidance_scale = 1.0
    # What a class-conditional network draws when sample() gets no labels: 'label_prior' (labels drawn at
    # the training set's label frequencies, data.label_frequencies, then classifier-free guidance at
    # guidance_scale: a draw from p(x) = sum_y p(y) p_w(x | y)) or 'null' (the null label, unguided).
    c.sampling.unconditional = "label_prior"
    # BatchNorm networks (the report's U-Net): normalize with the running averages of training ('running')
    # or with each sampled batch's own statistics ('batch'); see sample(batchnorm=).
    c.sampling.batchnorm = "running"
    c.sampling.classifier_scale = 32.0
    c.sampling.grid_size = 10  # the grid PNG is grid_size x grid_size samples (at most; see figure_share)
    # The most the end-of-run figures may cost, as a share of the training's network evaluations: a short run's
    # grid shrinks (to no less than 2x2) so that drawing it never takes longer than a tenth of the training.
    c.sampling.figure_share = 0.1
    c.sampling.strip_samples = 4  # rows of the reverse-process figure
    c.sampling.strip_every = 10  # one column every strip_every steps
    return c


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
    """A preset's config; returns a fresh :class:`~ddpm_jax.configs.Config` for ``preset`` (one of :data:`PRESETS`)."""
    c = _base()
    c.preset = preset
    if preset == "quick":
        c.model.output_head = "conv"
    elif preset == "cpu":
        c.model.output_head = "conv"
        c.model.num_classes = 10
        c.train.num_steps = 9000
        # The sweep's lowest FID for this network: w = 0.5 (11.3 at 5,000 samples) against 34.3 at w = 1,
        # which over-sharpens a network trained this long (README, "Quality per CPU minute").
        c.sampling.guidance_scale = 0.5
    elif preset in ("seed", "gpu"):
        c.data.image_size = 32
        c.model.base_channels = 32
        c.model.levels = 4
        c.train.batch_size = 1000
        # 2000 epochs of the 60,000 training images at batch 1000.
        c.train.num_steps = 2000 * 60
        c.train.learning_rate = 1e-3
        c.train.warmup_steps = 500
        c.train.log_every = 100
        c.train.checkpoint_every = 5000
        if preset == "gpu":
            # The report's network with what the CPU sweep found to buy quality per minute (class-conditional,
            # guided, a convolutional head), trained on 5M images (docs/gpu.md).
            c.model.output_head = "conv"
            c.model.num_classes = 10
            c.train.num_steps = 5000
            c.train.checkpoint_every = 1000
            c.sampling.batch_size = 1000
            c.sampling.guidance_scale = 1.0
    elif preset == "ddpm":
        # The quick preset's data, schedule and training, with Ho et al.'s U-Net in place of the report's.
        c.model.name = "ddpm_unet"
        c.model.base_channels = 16
        c.model.levels = 2
        c.model.channel_mult = (1, 2, 2)
        c.model.num_res_blocks = 1
        c.model.attention_resolutions = (7,)
    elif preset == "cifar10":
        c.dataset = "cifar10"
        c.data.image_size = 32
        c.data.channels = 3
        c.data.native_size = 32
        c.data.random_flip = True
        c.diffusion.schedule = "linear"
        c.diffusion.num_timesteps = 1000
        c.model.name = "ddpm_unet"
        c.model.base_channels = 128
        c.model.levels = 3
        c.model.channel_mult = (1, 2, 2, 2)
        c.model.num_res_blocks = 2
        c.model.attention_resolutions = (16,)
        c.model.dropout = 0.1
        c.model.norm_groups = 32
        c.model.output_head = "conv"
        c.train.batch_size = 128
        c.train.num_steps = 800_000
        c.train.learning_rate = 2e-4
        c.train.lr_schedule = "constant"  # Ho et al.: constant after the warm-up
        c.train.warmup_steps = 5000
        c.train.grad_clip_norm = 1.0
        c.train.ema_decay = 0.9999
        c.train.log_every = 100
        c.train.checkpoint_every = 5000
        c.sampling.variance = "beta"  # Ho et al.'s CIFAR-10 samples: sigma_t^2 = beta_t
        c.sampling.grid_size = 8
    elif preset == "tiny":
        c.model.base_channels = 4
        c.model.levels = 1
        c.model.time_embed_dim = 8
        c.diffusion.num_timesteps = 10
        c.train.batch_size = 8
        c.train.num_steps = 4
        c.train.warmup_steps = 0
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.sampling.batch_size = 16
        c.sampling.grid_size = 2
        c.sampling.strip_samples = 2
        c.sampling.strip_every = 5
    else:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}.")
    return Config(c)


def get_classifier_config(image_shape: tuple[int, int, int] = (28, 28, 1),
                          num_classes: int = 10) -> ml_collections.ConfigDict:
    """The classifier whose features FID is computed in (see :mod:`ddpm_jax.feature_network`), for
    images of ``image_shape`` ``(H, W, C)`` in ``num_classes`` classes: the MNIST CNN for grey images, a
    small ResNet (``model.name='resnet'``) for RGB ones.

    Trained once per training set and cached; any change here trains (and
    caches) a new one, so FIDs are only comparable under the same config.
    """
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.stage_channels = (32, 64)
    c.model.feature_dim = 128  # the FID feature space
    c.model.dropout_rate = 0.5
    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 15
    c.train.batch_size = 128
    c.train.learning_rate = 2e-3  # Adam, cosine decay to 0 after a short warm-up
    c.train.warmup_steps = 100
    c.train.weight_decay = 1e-4
    c.train.max_shift = 2  # augmentation: random translations of up to this many pixels
    c.train.seed = 0
    image_shape = tuple(int(d) for d in image_shape)
    if image_shape == (28, 28, 1) and num_classes == 10:
        return c  # MNIST's and Fashion-MNIST's, as before these fields existed: cached networks keep their names
    c.model.input_shape = image_shape
    c.model.num_classes = int(num_classes)
    if image_shape[-1] == 3:
        c.model.name = "resnet"
        c.model.stage_channels = (32, 64, 128)
        c.model.dropout_rate = 0.3
        c.train.num_epochs = 30
        c.train.max_shift = 4  # with the mirror: the usual CIFAR-10 augmentation (pad 4, crop, flip)
        c.train.random_flip = True
    return c


def model_input_shape(config: ml_collections.ConfigDict, batch_size: int) -> tuple[int, int, int, int]:
    """NHWC shape of a batch the network of ``config`` takes: ``data.channels`` at ``data.image_size``
    (MNIST's 28x28 grey padded to it)."""
    size = config.data.image_size
    return (batch_size, size, size, int(config.data.get("channels", 1)))


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    """Rebuild a config saved with :func:`config_to_json`, frozen against edits."""
    return ml_collections.FrozenConfigDict(d)


# Checks: every field judged before any compute, with one message naming the value and what is allowed.


def require(ok: bool, field: str, value, allowed: str) -> None:
    """Raise ``ValueError('field=value is not allowed: allowed.')`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{field}={value!r} is not allowed: {allowed}.")


def is_int(v, lo: int | None = None, hi: int | None = None) -> bool:
    return (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
            and (lo is None or v >= lo) and (hi is None or v <= hi))


def is_number(v, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               hi_open: bool = False) -> bool:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    v = float(v)
    return (np.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))


MAX_SEED = 2**32 - 1
MAX_TIMESTEPS = 100_000
MAX_STEPS = 2**31 - 1  # the step counter is an int32
LOSS_WEIGHTINGS = ("none", "min_snr")
NONFINITE_POLICIES = ("stop", "skip")


_DDPM_UNET = ("model.name='ddpm_unet'", lambda c: c.model.name == "ddpm_unet")
_REPORT_UNET = ("model.name='report_unet'", lambda c: c.model.name == "report_unet")
_LINEAR = ("diffusion.schedule='linear'", lambda c: c.diffusion.schedule == "linear")
_COSINE = ("diffusion.schedule='cosine'", lambda c: c.diffusion.schedule == "cosine")
_CONDITIONAL = ("a class-conditional network (model.num_classes > 0, --class-conditional)",
                lambda c: int(c.model.get("num_classes", 0)) > 0)
# Fields read only under a condition: (what the condition says, whether a config meets it).
READ_ONLY_WHEN = {
    **{f"model.{f}": _DDPM_UNET for f in ("channel_mult", "num_res_blocks", "attention_resolutions", "dropout",
                                          "num_heads", "norm_groups")},
    "model.time_embed_dim": _REPORT_UNET,
    "model.output_head": _REPORT_UNET,
    "sampling.batchnorm": ("a BatchNorm network (model.name='report_unet')", _REPORT_UNET[1]),
    "diffusion.beta_start": _LINEAR,
    "diffusion.beta_end": _LINEAR,
    "diffusion.cosine_s": _COSINE,
    "diffusion.max_beta": _COSINE,
    "train.hybrid_lambda": ("model.learn_variance=True", lambda c: bool(c.model.get("learn_variance", False))),
    "train.min_snr_gamma": ("train.loss_weighting='min_snr'", lambda c: c.train.get("loss_weighting") == "min_snr"),
    "train.p_uncond": _CONDITIONAL,
    "sampling.guidance_scale": _CONDITIONAL,
    "sampling.unconditional": _CONDITIONAL,
}


def _field(config, dotted: str):
    node = config
    for name in dotted.split("."):
        node = node.get(name) if hasattr(node, "get") else None
    return tuple(node) if isinstance(node, list) else node


def check_field_read(config: ml_collections.ConfigDict, field: str) -> None:
    """Refuse ``field`` (dotted) if nothing this config builds reads it (``model.dropout`` of the report's
    U-Net, which has no dropout): ValueError naming the field, what reads it and the preset."""
    condition, reads = READ_ONLY_WHEN.get(field, (None, lambda c: True))
    if not reads(config):
        raise ValueError(f"{field}={_field(config, field)!r} is read only with {condition}, which this config "
                         f"(preset {config.get('preset')}) is not; drop the setting, or change what reads it.")


def check_fields_read(config: ml_collections.ConfigDict) -> None:
    """:func:`check_field_read` of every field set away from its preset's value (fields at their preset's
    value are never refused; the command line also refuses a ``--set`` of an unread field to any value)."""
    preset = get_config(config.preset) if config.get("preset") in PRESETS else _base()
    for field in READ_ONLY_WHEN:
        if _field(config, field) != _field(preset, field):
            check_field_read(config, field)


def validate_config(config: ml_collections.ConfigDict, num_examples: int | None = None) -> None:
    """Check every field of a config before any compute; raise ValueError naming the field, the value and
    what is allowed. Ends by tracing the network abstractly (no arrays are made), so a combination of
    model fields that cannot build a network, or whose weights and optimizer state would not fit in this
    machine's memory, is refused here too, not after training has started."""
    d, m, t, s = config.diffusion, config.model, config.train, config.sampling
    require(is_int(config.seed, 0, MAX_SEED), "seed", config.seed, f"an integer in 0..{MAX_SEED}")
    require(config.preset in PRESETS, "preset", config.preset, " or ".join(PRESETS))
    require(config.get("dataset", "mnist") in (*DATASETS, IMAGE_FOLDER), "dataset", config.get("dataset"),
             " or ".join((*DATASETS, IMAGE_FOLDER)))
    require(is_int(d.num_timesteps, 1, MAX_TIMESTEPS), "diffusion.num_timesteps", d.num_timesteps,
             f"an integer T in 1..{MAX_TIMESTEPS:,} (the report: 100, Ho et al.: 1000)")
    for field in ("beta_start", "beta_end", "cosine_s", "max_beta"):
        require(is_number(d[field]), f"diffusion.{field}", d[field], "a finite number")
    require(d.cosine_s >= 0, "diffusion.cosine_s", d.cosine_s, "an offset >= 0 (Nichol & Dhariwal: 0.008)")
    try:
        schedule_from_config(config)  # the schedule's name and betas, each checked there
    except ValueError as e:  # named by the fields that made the betas, which the schedule module does not know
        made_by = ("beta_start", "beta_end") if d.schedule == "linear" else ("cosine_s", "max_beta")
        raise ValueError(f"{str(e).rstrip('.')} (diffusion.schedule={d.schedule!r}, "
                         + ", ".join(f"diffusion.{f}={d[f]!r}" for f in made_by) + ").") from None

    require(m.name in MODEL_NAMES, "model.name", m.name, " or ".join(MODEL_NAMES))
    require(is_int(m.base_channels, 1, 4096), "model.base_channels", m.base_channels, "an integer in 1..4096")
    require(is_int(m.levels, 1, 10), "model.levels", m.levels, "an integer in 1..10")
    require(is_int(m.time_embed_dim, 2, 8192) and m.time_embed_dim % 2 == 0, "model.time_embed_dim",
             m.time_embed_dim, "an even integer in 2..8192 (the report: 32)")
    require(m.output_head in ("block", "conv"), "model.output_head", m.output_head, "'block' or 'conv'")
    require(isinstance(m.learn_variance, bool), "model.learn_variance", m.learn_variance, "True or False")
    num_classes = m.get("num_classes", 0)
    require(is_int(num_classes, 0, 100_000), "model.num_classes", num_classes,
             "0 (an unconditional network) or the number of classes (MNIST: 10)")
    require(is_number(m.dropout, 0.0, 1.0, hi_open=True), "model.dropout", m.dropout, "a rate in [0, 1)")
    if m.name == "ddpm_unet":
        mult = tuple(m.channel_mult)
        require(all(is_int(k, 1, 64) for k in mult), "model.channel_mult", mult, "integers in 1..64")
        require(len(mult) == m.levels + 1, "model.channel_mult", mult,
                 f"one multiplier per resolution, model.levels + 1 = {m.levels + 1} of them")
        require(is_int(m.num_res_blocks, 1, 16), "model.num_res_blocks", m.num_res_blocks, "an integer in 1..16")
        require(all(is_int(r, 1) for r in m.attention_resolutions), "model.attention_resolutions",
                 m.attention_resolutions, "feature-map heights, integers >= 1 (e.g. (7,) or (16, 8))")
        widths = sorted({m.base_channels * k for k in mult})
        require(is_int(m.norm_groups, 1) and all(w % m.norm_groups == 0 for w in widths), "model.norm_groups",
                 m.norm_groups, f"an integer >= 1 dividing every block's width {widths}")
        require(is_int(m.num_heads, 1) and all(w % m.num_heads == 0 for w in widths), "model.num_heads",
                 m.num_heads, f"an integer >= 1 dividing every block's width {widths}")

    size, factor = config.data.image_size, 2 ** m.levels
    require(is_int(size, 4, 1024), "data.image_size", size,
             "an integer in 4..1024, at least the images' own size (MNIST 28, CIFAR-10 32)")
    if size % factor:
        raise ValueError(
            f"data.image_size={size} must be divisible by 2**model.levels={factor} "
            f"(model.levels={m.levels}); e.g. 28 for levels <= 2, 32 for levels 3-5."
        )
    channels, native = config.data.get("channels", 1), config.data.get("native_size", 28)
    require(channels in (1, 3) and is_int(channels), "data.channels", channels, "1 (grey) or 3 (RGB)")
    require(is_int(native, 1, size), "data.native_size", native,
             f"the images' own height and width, at most data.image_size={size}")
    class_names = tuple(config.data.get("class_names", ()))
    # An unconditional network on labelled images keeps their class names for evaluation (its histogram, FID).
    require(not class_names or (all(isinstance(n, str) for n in class_names)
                                and (len(class_names) == num_classes or (not num_classes and len(class_names) >= 2))),
             "data.class_names", class_names,
             f"empty, or one name per class{f' ({num_classes})' if num_classes else ''} (written by training)")
    require(isinstance(config.data.get("random_flip", False), bool), "data.random_flip",
             config.data.get("random_flip"), "True or False")
    require(is_int(config.data.max_train_examples, 0), "data.max_train_examples", config.data.max_train_examples,
             "0 (all images) or a positive count")
    require(isinstance(config.data.fingerprint, str), "data.fingerprint", config.data.fingerprint,
             "a string (written by training)")
    frequencies = tuple(config.data.get("label_frequencies", ()))
    require(not frequencies or (len(frequencies) == num_classes and all(is_number(f, 0.0) for f in frequencies)
                                 and sum(frequencies) > 0), "data.label_frequencies", frequencies,
             f"empty, or {num_classes} shares >= 0, one per class (written by training)")

    require(is_int(t.batch_size, 1, 1_000_000), "train.batch_size", t.batch_size, "an integer in 1..1000000")
    if num_examples is not None:
        require(t.batch_size <= num_examples, "train.batch_size", t.batch_size,
                 f"at most the {num_examples} training images")
    require(is_int(t.num_steps, 1, MAX_STEPS), "train.num_steps", t.num_steps, f"an integer in 1..{MAX_STEPS}")
    require(is_number(t.learning_rate, 0.0, lo_open=True), "train.learning_rate", t.learning_rate,
             "a finite number > 0 (the cpu preset: 2e-3)")
    require(is_int(t.warmup_steps, 0, MAX_STEPS), "train.warmup_steps", t.warmup_steps, f"an integer in 0..{MAX_STEPS}")
    require(is_number(t.grad_clip_norm, 0.0), "train.grad_clip_norm", t.grad_clip_norm,
             "a finite norm > 0, or 0 for no clipping")
    for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
        require(is_int(t[field], 1), f"train.{field}", t[field], "an integer >= 1")
    require(t.on_nonfinite in NONFINITE_POLICIES, "train.on_nonfinite", t.on_nonfinite,
             " or ".join(NONFINITE_POLICIES))
    require(is_int(t.max_consecutive_skips, 0), "train.max_consecutive_skips", t.max_consecutive_skips,
             "an integer >= 0")
    factor = t.get("divergence_factor", 0.0)
    require(is_number(factor, 0.0) and (factor == 0 or factor > 1), "train.divergence_factor", factor,
             "0 (no divergence check) or a finite factor > 1 (default 10)")
    require(is_int(t.get("divergence_window", 200), 1), "train.divergence_window", t.get("divergence_window"),
             "an integer >= 1 (steps in the running median)")
    require(is_number(t.ema_decay, 0.0, 1.0, hi_open=True), "train.ema_decay", t.ema_decay,
             "a decay in [0, 1) (Ho et al.: 0.9999)")
    require(isinstance(t.ema_warmup, bool), "train.ema_warmup", t.ema_warmup, "True or False")
    diffusion_optimizer(config)  # a known lr_schedule
    require(s.variance in VARIANCE_TYPES, "sampling.variance", s.variance, " or ".join(VARIANCE_TYPES))
    learned = bool(m.get("learn_variance", False))
    require(learned or s.variance != "learned", "sampling.variance", s.variance,
             "beta or beta_tilde ('learned' needs a network that learns it: --set model.learn_variance=True)")
    require(is_number(t.hybrid_lambda, 0.0), "train.hybrid_lambda", t.hybrid_lambda,
             "a finite weight >= 0 (Nichol & Dhariwal: 0.001)")
    require(is_number(t.p_uncond, 0.0, 1.0, hi_open=True), "train.p_uncond", t.p_uncond,
             "a probability in [0, 1) (Ho & Salimans: 0.1 or 0.2; 0 trains no unconditional prediction)")
    for field in ("guidance_scale", "classifier_scale"):
        require(is_number(s[field], 0.0), f"sampling.{field}", s[field], "a finite scale >= 0 (0: no guidance)")
    require(s.mean in MEAN_TYPES, "sampling.mean", s.mean, " or ".join(MEAN_TYPES))
    weighting = t.get("loss_weighting", "none")
    require(weighting in LOSS_WEIGHTINGS, "train.loss_weighting", weighting, " or ".join(LOSS_WEIGHTINGS))
    gamma = t.get("min_snr_gamma", 5.0)
    require(is_number(gamma, 0.0, lo_open=True), "train.min_snr_gamma", gamma, "a finite gamma > 0 (Hang et al.: 5)")
    require(learned is False or weighting == "none", "train.loss_weighting", weighting,
             "'none' for a learned-variance network (L_hybrid has its own weighting)")
    batchnorm = s.get("batchnorm", "running")
    require(batchnorm in BATCHNORM_MODES, "sampling.batchnorm", batchnorm, " or ".join(BATCHNORM_MODES))
    unconditional = s.get("unconditional", "null")
    require(unconditional in UNCONDITIONAL_MODES, "sampling.unconditional", unconditional,
             " or ".join(UNCONDITIONAL_MODES))
    require(is_int(s.batch_size, 1, 100_000), "sampling.batch_size", s.batch_size, "an integer in 1..100000")
    require(is_int(s.grid_size, 1, 100), "sampling.grid_size", s.grid_size, "an integer in 1..100")
    share = s.get("figure_share", 0.1)
    require(is_number(share, 0.0, lo_open=True), "sampling.figure_share", share,
             "a finite share > 0 of the training's network evaluations (default 0.1)")
    require(is_int(s.strip_samples, 1, 100), "sampling.strip_samples", s.strip_samples, "an integer in 1..100")
    require(is_int(s.strip_every, 1, d.num_timesteps), "sampling.strip_every", s.strip_every,
             f"an integer in 1..diffusion.num_timesteps={d.num_timesteps}")
    check_fields_read(config)
    _check_network_builds(config)


def _check_network_builds(config: ml_collections.ConfigDict) -> None:
    """Trace the network's init abstractly; refuse what fails, or what could not fit in memory."""
    try:
        model = build_model(config.model)
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(model_input_shape(config, 1)),
                                                   jnp.zeros((1,), jnp.int32), train=False))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a combination of model fields makes Flax or XLA raise
        raise ValueError(f"the model.* fields do not build a network ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); see ddpm_jax/configs.py for each field.") from None
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    need = 16 * num_params  # float32 weights, their EMA and Adam's two moments
    available = available_memory_bytes()
    if available is not None and need > available:
        raise ValueError(f"this model has {num_params:,} parameters: its weights, EMA and Adam moments alone need "
                         f"{need / 2**30:.1f} GiB, more than this machine's {available / 2**30:.1f} GiB available; "
                         "use fewer model.base_channels or model.levels.")


def available_memory_bytes() -> int | None:
    """Memory a process could still get: Linux's MemAvailable (free plus reclaimable cache), else the
    free pages the OS reports, else None where it says nothing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# Builders: a config turned into the objects the machinery below is handed, once.


def _betas(config: ml_collections.ConfigDict) -> np.ndarray:
    d = config.diffusion
    return betas_for(d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                     cosine_s=d.cosine_s, max_beta=d.max_beta)


def schedule_from_config(config: ml_collections.ConfigDict, steps: int | None = None,
                         spacing: str = "linspace") -> DiffusionSchedule:
    """The :class:`DiffusionSchedule` a config's ``diffusion`` section describes.

    With ``steps = K`` (< T), the schedule respaced to K of the T timesteps
    (:func:`ddpm_jax.schedules.respace_betas`) chosen by ``spacing``; its index k stands for
    the training timestep :func:`sampling_timesteps` ``(config, K, spacing)[k]``.
    """
    betas = _betas(config)
    if steps is not None and steps != config.diffusion.num_timesteps:
        betas = respace_betas(betas, sampling_timesteps(config, steps, spacing))
    return DiffusionSchedule.from_betas(betas)


def sampling_timesteps(config: ml_collections.ConfigDict, steps: int | None = None, spacing: str = "linspace"):
    """The training timesteps (0-based, ascending) a K-step sampler visits (:func:`ddpm_jax.schedules.spaced_timesteps`
    by ``spacing``): all T when ``steps`` is None."""
    num_timesteps = config.diffusion.num_timesteps
    return spaced_timesteps(num_timesteps, steps or num_timesteps, spacing,
                            betas=_betas(config) if spacing == "logsnr" else None)


def num_training_images(config: ml_collections.ConfigDict, available: int) -> int:
    """How many of ``available`` images a run trains on: ``data.max_train_examples`` of them, or all (0)."""
    return min(available, config.data.max_train_examples or available)


def figure_grid_size(config: ml_collections.ConfigDict) -> int:
    """The side of the end-of-run sample grid: ``sampling.grid_size``, shrunk for a short run so that the grid's
    network evaluations (side^2 samples x T steps) stay within ``sampling.figure_share`` of the training's
    (``train.num_steps`` x ``train.batch_size`` images, each a forward and a backward pass, about 3 evaluations);
    never below 2 (or ``grid_size``, if smaller)."""
    s, t = config.sampling, config.train
    budget = float(s.get("figure_share", 0.1)) * 3 * int(t.num_steps) * int(t.batch_size)
    fits = int((budget / int(config.diffusion.num_timesteps)) ** 0.5)
    return max(min(int(s.grid_size), 2), min(int(s.grid_size), fits))


def output_multiple(model_config) -> int:
    """Output channels per image channel: eps, and v too for a learned variance (``model.learn_variance``)."""
    return 2 if model_config.get("learn_variance", False) else 1


def build_model(model_config) -> nn.Module:
    """The network a config's ``model`` section describes (``name`` plus its fields).

    ``conv_impl`` and ``compute_dtype`` default to ``'auto'`` and ``'float32'``
    for configs saved before they existed.
    """
    name = model_config.name
    conv_impl = model_config.get("conv_impl", "auto")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl={conv_impl!r} is not one of: {', '.join(CONV_IMPLS)}.")
    compute_dtype = model_config.get("compute_dtype", "float32")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.compute_dtype={compute_dtype!r} is not one of: {', '.join(COMPUTE_DTYPES)}.")
    # What every network takes alike: its output channels and how it computes.
    common = {"output_multiple": output_multiple(model_config), "dtype": COMPUTE_DTYPES[compute_dtype],
              "conv_impl": conv_impl, "num_classes": int(model_config.get("num_classes", 0))}
    if name == "report_unet":
        return ReportUNet(
            base_channels=model_config.base_channels,
            levels=model_config.levels,
            time_embed_dim=model_config.time_embed_dim,
            output_head=model_config.output_head,
            **common,
        )
    if name == "ddpm_unet":
        return DDPMUNet(
            base_channels=model_config.base_channels,
            channel_mult=tuple(model_config.channel_mult),
            num_res_blocks=model_config.num_res_blocks,
            attention_resolutions=tuple(model_config.attention_resolutions),
            dropout=model_config.dropout,
            num_heads=model_config.num_heads,
            groups=model_config.norm_groups,
            **common,
        )
    raise ValueError(f"model.name={name!r} is not one of: {', '.join(MODEL_NAMES)}.")


def diffusion_learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The diffusion run's learning-rate schedule (``train.learning_rate``, ``warmup_steps``, ``lr_schedule``)."""
    t = config.train
    return learning_rate_schedule(t.learning_rate, t.warmup_steps, t.num_steps, t.lr_schedule)


def diffusion_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam on :func:`diffusion_learning_rate`, after ``train.grad_clip_norm`` clipping if set."""
    return make_optimizer(diffusion_learning_rate(config), grad_clip_norm=config.train.grad_clip_norm)


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array | None = None) -> TrainState:
    """Build the diffusion model a config describes; returns a fresh TrainState (initialized network, optimizer, step 0)."""
    model = build_model(config.model)
    key = jax.random.PRNGKey(config.seed) if key is None else key
    init_key, run_key = jax.random.split(key)
    variables = model.init(
        init_key, jnp.zeros(model_input_shape(config, 1)), jnp.zeros((1,), jnp.int32), train=False
    )
    t, m = config.train, config.model
    return new_train_state(
        variables, diffusion_optimizer(config), run_key, ema=True,
        apply_fn=model.apply,
        ema_decay=float(t.get("ema_decay", 0.9999)),
        ema_warmup=bool(t.get("ema_warmup", True)),
        hybrid_lambda=float(t.get("hybrid_lambda", 0.001)) if m.get("learn_variance", False) else None,
        num_classes=int(m.get("num_classes", 0)),
        p_uncond=float(t.get("p_uncond", 0.1)),
        min_snr_gamma=float(t.get("min_snr_gamma", 5.0)) if t.get("loss_weighting", "none") == "min_snr" else None,
    )
