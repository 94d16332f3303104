"""The base config: every field, its default and what it means; each preset starts from it.

:func:`get_config` returns a fresh, mutable ``ml_collections.ConfigDict``. A preset
(:mod:`ddpm_jax.configs.presets`) overrides only the fields it changes; command-line flags
override fields of the result (``--set model.base_channels=16``). A new field gets its default
and its comment here, its check in :mod:`ddpm_jax.configs.checks`, and is built in
:mod:`ddpm_jax.configs.builders` (or read where it is used).
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The fields every preset shares, at their defaults (``preset`` names the one that overrides them)."""
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
    c.model.conv_impl = "auto"  # 'auto' | 'xla' | 'matmul': same math, see ddpm_jax/cpu/layers.py
    c.model.compute_dtype = "float32"  # 'bfloat16': mixed precision (params, optimizer and loss stay float32)
    # Learned reverse variance (Nichol & Dhariwal 2021): the network also outputs v, trained with
    # L_hybrid = L_simple + train.hybrid_lambda * L_vlb, and sampling uses Sigma(v) by default.
    c.model.learn_variance = False
    # Class conditioning (Ho & Salimans 2022): 0 is an unconditional network; 10 (MNIST's digits) adds a
    # learned label embedding to the time embedding, with one more "null" label (index num_classes) that
    # stands for "no label", so one network serves both (see train.p_uncond and ddpm_jax/diffusion/guidance.py).
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
    # TensorBoard event files in WORKDIR/tensorboard: every log line's scalars and the sample grids below
    # (ddpm_jax/training/tensorboard.py; tensorboardX, no TensorFlow).
    c.train.tensorboard = True
    # A grid of sample_grid_size^2 samples of the EMA weights every sample_every steps (0: none), from one fixed
    # key, so the grids show the same noise becoming digits: WORKDIR/samples/step_NNNNNN.png and TensorBoard.
    # Each preset's interval gives its run about ten. Drawn with sample_grid_steps calls of the few-step sampler
    # (SDE-DPM-Solver++ on trailing steps; all T where T is fewer), the ten grids of a default cpu run cost 1.9%
    # of it on 2 CPU cores (docs/usage.md, "Watching a run").
    c.train.sample_every = 300
    c.train.sample_grid_size = 8
    c.train.sample_grid_steps = 25
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
    # the lowest FIDs of python -m experiments.guidance's sweep on the quick preset's network (docs/results.md,
    # "Choosing the digit: the guidance sweep"): w = 1 (95% of samples read as the digit asked for), s = 32
    # (99%; the largest s measured, s = 1 was worse than none).
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
