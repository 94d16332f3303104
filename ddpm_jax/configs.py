"""Experiment configs as data: one ``ml_collections.ConfigDict`` per preset.

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
* ``seed``: the report's setup: its 12,552,848-parameter U-Net on MNIST padded
  to 32x32, cosine schedule with T=100, batch 1000, 2000 epochs (a GPU run;
  8 hours on the report's RTX 4070).
* ``ddpm``: the ``quick`` preset with Ho et al.'s U-Net (residual blocks, GroupNorm,
  self-attention at 7x7, dropout 0.1) at 16 base channels in place of the report's.
* ``tiny``: a few-second smoke test for tests and CI.
"""

from __future__ import annotations

import json

import ml_collections

from ddpm_jax.schedules import DiffusionSchedule, betas_for, respace_betas, space_timesteps

PRESETS: tuple[str, ...] = ("cpu", "quick", "seed", "ddpm", "tiny")
# What a class-conditional network draws when sample() is given no labels (sampling.unconditional):
# labels drawn from the training label frequencies, then guided ('label_prior'), or the null label ('null').
UNCONDITIONAL_MODES = ("label_prior", "null")
# Which statistics a BatchNorm network normalizes with while sampling (sampling.batchnorm).
BATCHNORM_MODES = ("running", "batch")


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = "cpu"
    c.seed = 0
    c.dataset = "mnist"

    c.data = ml_collections.ConfigDict()
    # Height/width the network sees: MNIST's 28x28 is padded with background
    # (-1) up to this size, and samples are cropped back to 28x28.
    c.data.image_size = 28
    # Use only the first N training images (0: all). For smoke tests.
    c.data.max_train_examples = 0
    # Written by training, not set by hand: a content hash of the training images, so a
    # workdir holding a run on other data is refused instead of resumed with the wrong images.
    c.data.fingerprint = ""
    # Written by training for a class-conditional run, not set by hand: the share of each class among the
    # training labels, from which sample() draws labels when none are given (sampling.unconditional).
    c.data.label_frequencies = ()

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
    c.sampling.grid_size = 10  # the grid PNG is grid_size x grid_size samples
    c.sampling.strip_samples = 4  # rows of the reverse-process figure
    c.sampling.strip_every = 10  # one column every strip_every steps
    return c


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
    """A fresh config for ``preset`` (one of :data:`PRESETS`)."""
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
    elif preset == "seed":
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
    elif preset == "ddpm":
        # The quick preset's data, schedule and training, with Ho et al.'s U-Net in place of the report's.
        c.model.name = "ddpm_unet"
        c.model.base_channels = 16
        c.model.levels = 2
        c.model.channel_mult = (1, 2, 2)
        c.model.num_res_blocks = 1
        c.model.attention_resolutions = (7,)
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
    return c


def get_classifier_config() -> ml_collections.ConfigDict:
    """The MNIST classifier whose features FID is computed in (see :mod:`ddpm_jax.feature_network`).

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
    return c


def model_input_shape(config: ml_collections.ConfigDict, batch_size: int) -> tuple[int, int, int, int]:
    """NHWC shape of a batch the network of ``config`` takes (MNIST padded to ``data.image_size``)."""
    size = config.data.image_size
    return (batch_size, size, size, 1)


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    """Rebuild a config saved with :func:`config_to_json`, frozen against edits."""
    return ml_collections.FrozenConfigDict(d)


def schedule_from_config(config: ml_collections.ConfigDict, steps: int | None = None) -> DiffusionSchedule:
    """The :class:`DiffusionSchedule` a config's ``diffusion`` section describes.

    With ``steps = K`` (< T), the schedule respaced to K of the T timesteps
    (:func:`ddpm_jax.schedules.respace_betas`); its index k stands for the
    training timestep :func:`sampling_timesteps` ``(config, K)[k]``.
    """
    d = config.diffusion
    betas = betas_for(
        d.schedule,
        d.num_timesteps,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        cosine_s=d.cosine_s,
        max_beta=d.max_beta,
    )
    if steps is not None and steps != d.num_timesteps:
        betas = respace_betas(betas, sampling_timesteps(config, steps))
    return DiffusionSchedule.from_betas(betas)


def sampling_timesteps(config: ml_collections.ConfigDict, steps: int | None = None):
    """The training timesteps (0-based, ascending) a K-step sampler visits: all T when ``steps`` is None."""
    return space_timesteps(config.diffusion.num_timesteps, steps or config.diffusion.num_timesteps)
