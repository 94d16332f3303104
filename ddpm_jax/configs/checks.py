"""The checks of a config's fields: every field judged before any compute, with one message naming the
value and what is allowed (:func:`validate_config`), and the fields read only under a condition
(:data:`READ_ONLY_WHEN`, :func:`check_field_read`).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from ddpm_jax.configs import default
from ddpm_jax.configs.builders import schedule_from_config, variable_shapes
from ddpm_jax.configs.presets import PRESETS, get_config
from ddpm_jax.data import DATASETS, IMAGE_FOLDER
from ddpm_jax.diffusion.process import MEAN_TYPES, VARIANCE_TYPES
from ddpm_jax.models import MODEL_NAMES
from ddpm_jax.utils.trees import count_params

# What a class-conditional network draws when sample() is given no labels (sampling.unconditional):
# labels drawn from the training label frequencies, then guided ('label_prior'), or the null label ('null').
UNCONDITIONAL_MODES = ("label_prior", "null")
# Which statistics a BatchNorm network normalizes with while sampling (sampling.batchnorm).
BATCHNORM_MODES = ("running", "batch")


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
# The learning-rate schedules (ddpm_jax.training.state.learning_rate_schedule makes each).
LR_SCHEDULES = ("constant", "cosine")


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
    preset = get_config(config.preset) if config.get("preset") in PRESETS else default.get_config()
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
    require(isinstance(t.get("tensorboard", True), bool), "train.tensorboard", t.get("tensorboard"), "True or False")
    require(is_int(t.get("sample_every", 0), 0), "train.sample_every", t.get("sample_every"),
            "an integer >= 0 (steps between sample grids; 0: none)")
    require(is_int(t.get("sample_grid_size", 8), 1, 32), "train.sample_grid_size", t.get("sample_grid_size"),
            "an integer in 1..32 (the grid's side)")
    require(is_int(t.get("sample_grid_steps", 25), 1, MAX_STEPS), "train.sample_grid_steps",
            t.get("sample_grid_steps"), "an integer >= 1 (network calls per grid sample)")
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
    if t.lr_schedule not in LR_SCHEDULES:  # in the words of the schedule's own check
        raise ValueError(f"unknown train.lr_schedule {t.lr_schedule!r}; allowed: {', '.join(LR_SCHEDULES)}.")
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
        shapes = variable_shapes(config)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a combination of model fields makes Flax or XLA raise
        raise ValueError(f"the model.* fields do not build a network ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); see ddpm_jax/configs/default.py for each field.") from None
    num_params = count_params(shapes["params"])
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
