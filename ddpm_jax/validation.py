"""Every option checked once, at one boundary, with one message that names the value and what is allowed.

:func:`validate_config` judges a whole diffusion config before any compute (training and
:func:`ddpm_jax.load_checkpoint`'s callers use it); the sampling options of
:func:`ddpm_jax.sample` and of the evaluation are checked by :func:`check_sampling_options`.
The small predicates (:func:`is_int`, :func:`is_number`) are shared by the classifiers' checks.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax.configs import BATCHNORM_MODES, PRESETS, UNCONDITIONAL_MODES, model_input_shape, schedule_from_config
from ddpm_jax.diffusion import MEAN_TYPES, VARIANCE_TYPES
from ddpm_jax.models import MODEL_NAMES, build_model
from ddpm_jax.train_state import diffusion_optimizer


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


def validate_config(config: ml_collections.ConfigDict, num_examples: int | None = None) -> None:
    """Check every field of a config before any compute; raise ValueError naming the field, the value and
    what is allowed. Ends by tracing the network abstractly (no arrays are made), so a combination of
    model fields that cannot build a network, or whose weights and optimizer state would not fit in this
    machine's memory, is refused here too, not after training has started."""
    d, m, t, s = config.diffusion, config.model, config.train, config.sampling
    require(is_int(config.seed, 0, MAX_SEED), "seed", config.seed, f"an integer in 0..{MAX_SEED}")
    require(config.preset in PRESETS, "preset", config.preset, " or ".join(PRESETS))
    require(config.get("dataset", "mnist") == "mnist", "dataset", config.get("dataset"), "'mnist'")
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
    require(is_int(size, 28, 1024), "data.image_size", size, "an integer in 28..1024")
    if size % factor:
        raise ValueError(
            f"data.image_size={size} must be >= 28 and divisible by 2**model.levels={factor} "
            f"(model.levels={m.levels}); e.g. 28 for levels <= 2, 32 for levels 3-5."
        )
    require(is_int(config.data.max_train_examples, 0), "data.max_train_examples", config.data.max_train_examples,
             "0 (all images) or a positive count")
    require(isinstance(config.data.fingerprint, str), "data.fingerprint", config.data.fingerprint,
             "a string (written by training)")
    frequencies = tuple(config.data.get("label_frequencies", ()))
    require(not frequencies or (len(frequencies) == num_classes and all(is_number(f, 0.0) for f in frequencies)
                                 and sum(frequencies) > 0), "data.label_frequencies", frequencies,
             f"empty, or {num_classes} shares >= 0, one per class (written by training)")

    require(is_int(t.batch_size, 1, 1_000_000), "train.batch_size", t.batch_size, "an integer >= 1")
    if num_examples is not None:
        require(t.batch_size <= num_examples, "train.batch_size", t.batch_size,
                 f"at most the {num_examples} training images")
    require(is_int(t.num_steps, 1, MAX_STEPS), "train.num_steps", t.num_steps, f"an integer in 1..{MAX_STEPS}")
    require(is_number(t.learning_rate, 0.0, lo_open=True), "train.learning_rate", t.learning_rate,
             "a finite number > 0 (the cpu preset: 2e-3)")
    require(is_int(t.warmup_steps, 0, MAX_STEPS), "train.warmup_steps", t.warmup_steps, "an integer >= 0")
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
    require(is_int(s.strip_samples, 1, 100), "sampling.strip_samples", s.strip_samples, "an integer in 1..100")
    require(is_int(s.strip_every, 1, d.num_timesteps), "sampling.strip_every", s.strip_every,
             f"an integer in 1..diffusion.num_timesteps={d.num_timesteps}")
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


def check_count(name: str, value, least: int) -> int:
    """``value`` as an int if it is an integer (numpy's too, never a bool) >= ``least``; else ValueError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")
    return int(value)


SAMPLING_METHODS = ("ancestral", "ddim")


def resolve_variance(config, variance: str | None) -> str:
    """The reverse variance a run samples (or is scored) with: ``variance``, checked, or its default.

    The default is the network's own Sigma for a learned-variance network (Nichol & Dhariwal
    2021), else ``sampling.variance``. ``'learned'`` is refused for a network that predicts eps only.
    """
    learned_model = bool(config.model.get("learn_variance", False))
    if variance == "learned" and not learned_model:
        raise ValueError("variance='learned' needs a network trained to output it (model.learn_variance); "
                         "this one predicts eps only: use 'beta' or 'beta_tilde'.")
    variance = variance or ("learned" if learned_model else config.sampling.variance)
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCE_TYPES)}.")
    return variance


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How a run is sampled, every field checked and defaulted from its config by :func:`sampling_options`.

    ``steps``: None for all T (the network's own timesteps), else the K < T of a respaced
    sampler. ``variance`` and ``mean``: the ancestral step's (None for DDIM); ``eta``: DDIM's.
    """

    method: str
    steps: int | None
    eta: float
    variance: str | None
    mean: str | None
    batchnorm: str


def sampling_options(config, *, steps=None, method: str = "ancestral", eta=0.0, variance: str | None = None,
                     mean: str | None = None, batchnorm: str | None = None) -> SamplingOptions:
    """Check the sampling options of a run with ``config``, and fill in its defaults (see :func:`ddpm_jax.sample`)."""
    num_timesteps = config.diffusion.num_timesteps
    if steps is not None and (isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer))
                              or not 1 <= steps <= num_timesteps):
        raise ValueError(f"steps must be an integer in 1..{num_timesteps} (the T this network was trained with), "
                         f"got {steps!r}.")
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(SAMPLING_METHODS)}.")
    if method == "ddim":
        if variance is not None or mean is not None:
            raise ValueError("variance= and mean= choose ancestral sampling's step; DDIM's step is set by eta= "
                             "(0: deterministic, 1: sigma^2 = beta-tilde).")
        # Numbers from numpy are numbers; NaN and Inf are not valid etas (they give all-NaN images).
        if not is_number(eta, 0.0):
            raise ValueError(f"eta must be a finite number >= 0 (0: deterministic, 1: ancestral), got {eta!r}.")
    elif eta:
        raise ValueError(f"eta={eta} applies to method='ddim' only.")
    else:
        variance = resolve_variance(config, variance)
        mean = mean or config.sampling.mean
        if mean not in MEAN_TYPES:
            raise ValueError(f"unknown mean {mean!r}; allowed: {', '.join(MEAN_TYPES)}.")
    batchnorm = batchnorm or config.sampling.get("batchnorm", "running")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"unknown batchnorm {batchnorm!r}; allowed: {', '.join(BATCHNORM_MODES)}.")
    return SamplingOptions(method=method, steps=None if steps in (None, num_timesteps) else int(steps),
                           eta=float(eta), variance=variance, mean=mean, batchnorm=batchnorm)
