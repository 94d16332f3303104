"""The notebook-facing API: ``load_checkpoint(workdir)`` then ``sample(params, key, n)``."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import parallel
from ddpm_jax.configs import sampling_timesteps, schedule_from_config
from ddpm_jax.data import crop
from ddpm_jax.diffusion import MEAN_TYPES, VARIANCE_TYPES, split_learned_variance
from ddpm_jax.guidance import GuidanceInputs, classifier_free_fn, classifier_grad_fn, conditional_fn
from ddpm_jax.models import build_model
from ddpm_jax.progress import progress_bar
from ddpm_jax.sampling import make_ancestral_sampler, make_ddim_sampler
from ddpm_jax.schedules import DiffusionSchedule


WEIGHTS = ("ema", "raw")


@flax.struct.dataclass
class DiffusionCheckpoint:
    """A trained denoiser and everything needed to sample from it.

    What :func:`ddpm_jax.load_checkpoint` returns and :func:`sample` takes:
    the network's ``params``, their exponential moving average ``ema_params``
    (None for a bare set of weights), BatchNorm ``batch_stats``, the run's frozen
    ``config`` (model, schedule, sampling defaults) and the training ``step``.
    ``weights`` says which parameters sampling uses: ``'ema'`` (the default,
    as Ho et al. sample) or ``'raw'``; see :meth:`with_weights`. ``identity`` is
    the SHA-256 digest of the checkpoint's verified files when it was loaded
    from disk (None for one built in memory): caches of its samples key on it.
    """

    params: Any
    batch_stats: Any
    config: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)
    step: int = flax.struct.field(pytree_node=False, default=0)
    ema_params: Any = None
    weights: str = flax.struct.field(pytree_node=False, default="ema")
    identity: str | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def from_train_state(cls, state, config) -> "DiffusionCheckpoint":
        return cls(
            params=state.params,
            batch_stats=state.batch_stats,
            config=ml_collections.FrozenConfigDict(config.to_dict()),
            step=int(state.step),
            ema_params=state.ema_params,
        )

    @property
    def weights_used(self) -> str:
        """``'ema'`` or ``'raw'``: which parameters :attr:`variables` (and so sampling) uses."""
        return "ema" if self.weights == "ema" and self.ema_params is not None else "raw"

    def with_weights(self, weights: str) -> "DiffusionCheckpoint":
        """The same checkpoint sampling with ``'ema'`` (averaged) or ``'raw'`` (last step's) parameters."""
        if weights not in WEIGHTS:
            raise ValueError(f"unknown weights {weights!r}; allowed: {', '.join(WEIGHTS)}.")
        if weights == "ema" and self.ema_params is None:
            raise ValueError("this checkpoint holds no EMA weights (ema_params is None); use weights='raw'.")
        return self.replace(weights=weights)

    @property
    def variables(self) -> dict:
        params = self.ema_params if self.weights_used == "ema" else self.params
        return {"params": params, "batch_stats": self.batch_stats}

    @property
    def schedule(self) -> DiffusionSchedule:
        return schedule_from_config(self.config)


def _shapes_by_path(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in leaves}


def tree_differences(saved, expected, limit: int = 6) -> list[str]:
    """Where two pytrees of arrays (or their metadata) differ, as ``'path: saved ... , expected ...'`` lines."""
    a, b = _shapes_by_path(saved), _shapes_by_path(expected)
    # The network's parameters say most about what differs; BatchNorm statistics and Adam's moments repeat them.
    order = lambda k: (not k.startswith("params"), k.startswith("opt_state"), k)  # noqa: E731
    lines = [f"{k}: saved {a[k]}, this config's model {b[k]}"
             for k in sorted(a.keys() & b.keys(), key=order) if a[k] != b[k]]
    lines += [f"{k}: not in this config's model" for k in sorted(a.keys() - b.keys(), key=order)]
    lines += [f"{k}: missing from the saved arrays" for k in sorted(b.keys() - a.keys(), key=order)]
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


@functools.lru_cache(maxsize=16)
def _expected_variables(config_json: str):
    """Shapes of the variables the network of a config has (no arrays are created)."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    model, size = build_model(config.model), config.data.image_size
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)), jnp.zeros((1,), jnp.int32))
    )


def _config_json(config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def check_variables_fit_config(checkpoint: DiffusionCheckpoint, config_json: str | None = None) -> None:
    """Raise ValueError naming the arrays that do not fit the network ``checkpoint.config`` describes."""
    config_json = config_json or _config_json(checkpoint.config)
    diffs = tree_differences(checkpoint.variables, _expected_variables(config_json))
    if diffs:
        m = checkpoint.config.model
        raise ValueError(
            f"these params do not fit the network their config describes (model.base_channels={m.base_channels}, "
            f"model.levels={m.levels}, data.image_size={checkpoint.config.data.image_size}): {'; '.join(diffs)}. "
            "Load params and config together with ddpm_jax.load_checkpoint(workdir)."
        )


SAMPLING_METHODS = ("ancestral", "ddim")
# How labels steer sampling: a class-conditional network's own conditioning with classifier-free
# guidance (Ho & Salimans 2022), or a noise-aware classifier's gradient (Dhariwal & Nichol 2021).
GUIDANCE = ("classifier_free", "classifier")
# What a class-conditional network draws when sample() is given no labels (config sampling.unconditional):
# labels drawn from the training label frequencies, then guided ('label_prior'), or the null label ('null').
UNCONDITIONAL_MODES = ("label_prior", "null")
# Which statistics a BatchNorm network normalizes with while sampling (config sampling.batchnorm).
BATCHNORM_MODES = ("running", "batch")
_PRIOR_LABEL_STREAM = 0x6C61626C  # folded into sample()'s key for the labels it draws; x_T uses fold_in(key, b)


def _eps_half(output, split: bool):
    return split_learned_variance(output)[0] if split else output


def denoiser_fn(model_config, with_learned_variance: bool):
    """The network as ``(variables, x, t) -> output`` in evaluation mode (a class-conditional one at its null label).

    A learned-variance network's output stacks eps and v (2C channels): with
    ``with_learned_variance`` it is returned whole, otherwise (DDIM, a fixed
    variance) its eps half alone. Other networks return eps either way.
    """
    fn = guided_denoiser_fn(model_config, with_learned_variance, "none")
    return lambda variables, x, t: fn(GuidanceInputs(variables), x, t)


def guided_denoiser_fn(model_config, with_learned_variance: bool, conditioning: str, batchnorm: str = "running"):
    """The network as ``(inputs, x, t) -> output``, ``inputs`` a :class:`ddpm_jax.guidance.GuidanceInputs`.

    ``conditioning``: ``'none'`` (unconditional; a class-conditional network at its null label),
    ``'labels'`` (at ``inputs.labels``) or ``'classifier_free'`` (guided at ``inputs.scale``).
    ``batchnorm``: ``'running'`` (BatchNorm's running averages, as networks are usually evaluated)
    or ``'batch'`` (the statistics of the batch being denoised, all at one timestep while
    sampling; the running averages are left as they are). Networks without BatchNorm ignore it.
    Output as :func:`denoiser_fn`'s.
    """
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"unknown batchnorm={batchnorm!r}; allowed: {', '.join(BATCHNORM_MODES)}.")
    model = build_model(model_config)
    learned = bool(model_config.get("learn_variance", False))
    split = learned and not with_learned_variance
    num_classes = int(model_config.get("num_classes", 0))
    def network(variables, x, t, y=None):
        # Only a network with BatchNorm statistics runs in training mode (which would also turn on dropout).
        if batchnorm == "batch" and variables.get("batch_stats"):
            return model.apply(variables, x, t, y=y, train=True, mutable=["batch_stats"])[0]
        return model.apply(variables, x, t, y=y, train=False)
    if conditioning == "none":
        fn = lambda inputs, x, t: network(inputs.variables, x, t)  # noqa: E731
    elif conditioning == "labels":
        fn = conditional_fn(network, num_classes)
    elif conditioning == "classifier_free":
        fn = classifier_free_fn(network, num_classes, learned_variance=learned)
    else:
        raise ValueError(f"unknown conditioning {conditioning!r}; allowed: none, labels, classifier_free.")
    return lambda inputs, x, t: _eps_half(fn(inputs, x, t), split)


@functools.lru_cache(maxsize=32)
def _compiled_sampler(config_json: str, batch: int, variance: str, mean: str, return_every: int,
                      steps: int | None = None, method: str = "ancestral", eta: float = 0.0,
                      conditioning: str = "none", classifier_json: str | None = None, batchnorm: str = "running"):
    """One jitted ``sampler(GuidanceInputs, key)`` per (config, batch, options): built once, reused across calls.

    Labels and guidance scales are arguments, not constants: a sweep over them compiles once.
    ``classifier_json``: the noise-aware classifier's model config, for classifier guidance.
    """
    config = ml_collections.ConfigDict(json.loads(config_json))
    size = config.data.image_size
    mesh = parallel.make_mesh()
    cond_fn = None
    if classifier_json is not None:
        from ddpm_jax.noisy_classifier import log_prob_fn

        cond_fn = classifier_grad_fn(log_prob_fn(ml_collections.ConfigDict(json.loads(classifier_json))))
    with_learned_variance = method == "ancestral" and variance == "learned"
    common = dict(  # noqa: C408
        eps_fn=guided_denoiser_fn(config.model, with_learned_variance, conditioning, batchnorm),
        cond_fn=cond_fn,
        schedule=schedule_from_config(config, steps),
        shape=(batch, size, size, 1),
        return_every=return_every,
        sharding=parallel.batch_sharded(mesh),
        timesteps=sampling_timesteps(config, steps) if steps else None,  # all T: the network's own indices
    )
    if method == "ddim":
        sampler = make_ddim_sampler(eta=eta, **common)
    else:
        sampler = make_ancestral_sampler(variance=variance, mean=mean, **common)
    # Variables and key on every device, the batch split over the data mesh (one device: the same program).
    return jax.jit(sampler, in_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))


def sample(
    params: DiffusionCheckpoint,
    key: jax.Array,
    n: int,
    *,
    labels=None,
    guidance: str | None = None,
    guidance_scale: float | None = None,
    classifier=None,
    unconditional: str | None = None,
    batchnorm: str | None = None,
    steps: int | None = None,
    method: str = "ancestral",
    eta: float = 0.0,
    weights: str | None = None,
    variance: str | None = None,
    mean: str | None = None,
    return_every: int = 0,
    batch_size: int | None = None,
    schedule: DiffusionSchedule | None = None,
    progress: bool = False,
):
    """Draw ``n`` images by ancestral sampling (Ho et al. 2020, Algorithm 2).

    Args:
      params: what :func:`ddpm_jax.load_checkpoint` returns (a
        :class:`DiffusionCheckpoint`); model, schedule and T come from it.
      key: a PRNG key; the same key gives the same images.
      n: number of images.
      labels: which digits to draw: one int for all ``n`` images, or an int array of shape
        ``(n,)``, each in ``0..num_classes-1``. None (the default) draws unconditionally: a
        class-conditional network then does what ``unconditional`` says.
      guidance: how the labels steer sampling. ``'classifier_free'`` (the default for a
        class-conditional network, ``model.num_classes > 0``): eps = (1 + w) eps(x, t, y) - w
        eps(x, t, null) (Ho & Salimans 2022). ``'classifier'`` (the default when ``classifier``
        is given to an unconditional network): each step's mean moves by s Sigma grad log
        p(y | x_t, t) of ``classifier`` (Dhariwal & Nichol 2021); on a class-conditional network
        it guides the conditional prediction.
      guidance_scale: w, or s for classifier guidance (0: no guidance; w = 0 is plain conditional
        sampling); default from the config: ``sampling.guidance_scale`` (1) or
        ``sampling.classifier_scale`` (32), the lowest FIDs of ``python -m experiments.guidance``.
      classifier: a noise-aware classifier trained on this run's schedule
        (:func:`ddpm_jax.noisy_classifier.load_noisy_classifier`), for classifier guidance.
      unconditional: a class-conditional network without ``labels``: ``'label_prior'`` draws
        each image's label from the training set's label frequencies (``data.label_frequencies``,
        uniform if the config has none) with the key, then samples with classifier-free guidance
        as if those labels were given (``guidance_scale`` applies): a draw from
        p(x) = sum_y p(y) p_w(x | y), the best samples such a network makes. ``'null'`` samples
        at the null label, unguided. Default: the config's ``sampling.unconditional``
        (``'label_prior'``; ``'null'`` for runs saved before the field existed).
      batchnorm: a BatchNorm network's statistics while sampling: ``'running'`` (its running
        averages, collected over training batches of mixed timesteps) or ``'batch'`` (those of each
        batch being denoised, one timestep at a time); default the config's ``sampling.batchnorm``.
      steps: reverse steps K (default: all T the network was trained with). With K < T the
        schedule is respaced to K evenly spaced training timesteps (Nichol & Dhariwal 2021).
      method: ``'ancestral'`` (Ho et al.'s Algorithm 2, on the respaced schedule when K < T)
        or ``'ddim'`` (Song et al. 2021; see :func:`ddpm_jax.sampling.make_ddim_sampler`).
      eta: DDIM only: 0 deterministic, 1 ancestral-equivalent (sigma^2 = beta-tilde).
      weights: ``'ema'`` or ``'raw'``; default the checkpoint's own choice, which is the EMA
        weights for a checkpoint from :func:`ddpm_jax.load_checkpoint` (``params.weights_used``).
      variance: ancestral only: sigma_t^2, ``'beta'``, ``'beta_tilde'`` or ``'learned'`` (a network
        trained with ``model.learn_variance``, whose default it is); default from the run's config.
      mean: ancestral only: ``'x0_clip'`` or ``'eps'`` (see :func:`ddpm_jax.diffusion.p_mean`); default
        from the config.
      return_every: if k > 0, also return the chain every k steps.
      batch_size: images per jitted call (default: the config's ``sampling.batch_size``);
        the last batch is padded, so one compiled shape serves every n.
      schedule: optional; if given it must equal the checkpoint's (sampling with
        another T or schedule than the network was trained with is refused).
      progress: show a progress bar over batches.

    Returns:
      float32 ``(n, 28, 28, 1)`` images in [-1, 1] (NHWC; map to pixels with
      ``(x + 1) * 127.5``); with ``labels``, image ``i`` was asked to be digit ``labels[i]``.
      With ``return_every=k``: ``(images, frames)``, frames
      ``(F, n, 28, 28, 1)`` from pure noise x_T to x_0 (see
      :func:`ddpm_jax.sampling.make_ancestral_sampler`).
    """
    if not isinstance(params, DiffusionCheckpoint):
        raise TypeError(
            "sample(params, key, n) takes what ddpm_jax.load_checkpoint(workdir) returns (a DiffusionCheckpoint "
            f"holding params, batch_stats and the run's config), got {type(params).__name__}. For raw network "
            "variables use ddpm_jax.sampling.make_ancestral_sampler with your model and schedule."
        )
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    n = int(n)
    for name, value, least in (("batch_size", batch_size, 1), ("return_every", return_every, 0)):
        if value is not None and (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
                                  or value < least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")
    if weights is not None:
        params = params.with_weights(weights)
    config = params.config
    config_json = _config_json(config)
    check_variables_fit_config(params, config_json)
    if schedule is not None:
        own = params.schedule
        if schedule.num_timesteps != own.num_timesteps or not np.allclose(
            np.asarray(schedule.betas), np.asarray(own.betas), rtol=1e-6, atol=0
        ):
            raise ValueError(
                f"this checkpoint was trained with a {config.diffusion.schedule} schedule of "
                f"T={own.num_timesteps}; sampling with another schedule (T={schedule.num_timesteps}) would "
                "use the network at timesteps it never saw. Leave schedule unset."
            )
    num_timesteps = config.diffusion.num_timesteps
    if steps is not None and (not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_timesteps):
        raise ValueError(f"steps must be an integer in 1..{num_timesteps} (the T this network was trained with), "
                         f"got {steps!r}.")
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(SAMPLING_METHODS)}.")
    if method == "ddim":
        if variance is not None or mean is not None:
            raise ValueError("variance= and mean= choose ancestral sampling's step; DDIM's step is set by eta= "
                             "(0: deterministic, 1: sigma^2 = beta-tilde).")
        # Numbers from numpy are numbers; NaN and Inf are not valid etas (they give all-NaN images).
        if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, (int, float, np.integer, np.floating)) \
                or not np.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0 (0: deterministic, 1: ancestral), got {eta!r}.")
    elif eta:
        raise ValueError(f"eta={eta} applies to method='ddim' only.")
    steps = None if steps in (None, num_timesteps) else int(steps)
    if labels is None:
        labels = _prior_labels(config, key, n, unconditional, classifier)
    elif unconditional is not None:
        raise ValueError("unconditional= says what to draw when no labels are given; drop it, or drop labels=.")
    conditioning, scale, classifier_scale = _resolve_guidance(config, n, labels, guidance, guidance_scale, classifier)
    labels = None if labels is None else np.broadcast_to(np.asarray(labels, dtype=np.int32), (n,))
    learned_model = bool(config.model.get("learn_variance", False))
    if variance == "learned" and not learned_model:
        raise ValueError("variance='learned' needs a network trained to output it (model.learn_variance); "
                         "this one predicts eps only: use 'beta' or 'beta_tilde'.")
    # A learned-variance network samples with its own Sigma unless told otherwise.
    variance = variance or ("learned" if learned_model else config.sampling.variance)
    mean = mean or config.sampling.mean
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCE_TYPES)}.")
    if mean not in MEAN_TYPES:
        raise ValueError(f"unknown mean {mean!r}; allowed: {', '.join(MEAN_TYPES)}.")
    _check_fits_in_memory(n, config.data.image_size, return_every, steps or num_timesteps)
    batch = min(batch_size or config.sampling.batch_size, n)
    shards = parallel.num_shards(parallel.make_mesh())  # the mesh _compiled_sampler splits the batch over
    batch = -(-batch // shards) * shards  # a multiple of the device count, so every device gets an equal share
    classifier_json = None if classifier_scale is None else _config_json(classifier.config.model)
    batchnorm = batchnorm or config.sampling.get("batchnorm", "running")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"unknown batchnorm {batchnorm!r}; allowed: {', '.join(BATCHNORM_MODES)}.")
    sampler = _compiled_sampler(config_json, batch, variance, mean, return_every, steps, method, float(eta),
                                conditioning, classifier_json, batchnorm)

    num_batches = -(-n // batch)
    batches = progress_bar(range(num_batches), unit="batch", desc=f"sampling {n}", enabled=progress and num_batches > 1)
    images, frames = [], []
    for b in batches:
        inputs = GuidanceInputs(
            variables=params.variables,
            # The last batch is padded by repeating its labels; its extra images are cropped below.
            labels=None if labels is None else jnp.asarray(np.resize(labels[b * batch:(b + 1) * batch], batch)),
            scale=jnp.float32(scale),
            classifier_params=None if classifier_scale is None else classifier.params,
            classifier_scale=jnp.float32(classifier_scale or 0.0),
        )
        out = sampler(inputs, jax.random.fold_in(key, b))
        if return_every:
            out, chain = out
            frames.append(crop(chain))
        images.append(crop(out))
    images = jnp.concatenate(images)[:n]
    if return_every:
        return images, jnp.concatenate(frames, axis=1)[:, :n]
    return images


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


def _check_fits_in_memory(n: int, size: int, return_every: int, steps: int) -> None:
    """Refuse up front a request whose results alone could not fit in memory (they are gathered whole)."""
    frames = (steps // return_every + 1) if return_every else 0
    need = 4 * size * size * n * (1 + frames)  # float32 images, plus the chain's frames
    available = available_memory_bytes()
    if available is not None and need > available:
        raise ValueError(
            f"sample(n={n:,}{f', return_every={return_every}' if return_every else ''}) would need "
            f"{need / 2**30:.1f} GiB for its results, more than the {available / 2**30:.1f} GiB available. Draw "
            "batches of fewer images with separate keys (jax.random.fold_in(key, i)), or use "
            "ddpm_jax.evaluation.draw_samples / python -m experiments.evaluate, which stream to disk.")


def prior_labels(params: DiffusionCheckpoint, key: jax.Array, n: int) -> np.ndarray | None:
    """The digits ``sample(params, key, n)`` draws for a class-conditional network given no labels.

    int32 ``(n,)``, or None where it draws none (an unconditional network, or
    ``sampling.unconditional='null'``). For reading a grid, or counting what was asked for.
    """
    return _prior_labels(params.config, key, n, None, None)


def _prior_labels(config, key: jax.Array, n: int, unconditional: str | None, classifier) -> np.ndarray | None:
    """Labels for a class-conditional network sampled without them (``unconditional='label_prior'``), else None.

    Drawn from ``fold_in(key, _PRIOR_LABEL_STREAM)``: the same key gives the same labels, and the
    noise (which uses ``fold_in(key, b)``) is the one an explicit-labels call with that key draws.
    """
    num_classes = int(config.model.get("num_classes", 0))
    mode = unconditional if unconditional is not None else config.sampling.get("unconditional", "null")
    if mode not in UNCONDITIONAL_MODES:
        raise ValueError(f"unknown unconditional={mode!r}; allowed: {', '.join(UNCONDITIONAL_MODES)}.")
    if not num_classes:
        if unconditional is not None:
            raise ValueError("unconditional= applies to a class-conditional network (model.num_classes > 0); "
                             "this one was trained without labels and always samples unconditionally.")
        return None
    if mode == "null" or classifier is not None:
        return None
    frequencies = np.asarray(config.data.get("label_frequencies", ()) or np.ones(num_classes), np.float64)
    if frequencies.shape != (num_classes,) or (frequencies < 0).any() or not frequencies.sum() > 0:
        raise ValueError(f"data.label_frequencies={tuple(frequencies)} is not a distribution over the "
                         f"{num_classes} classes; sample with labels= or unconditional='null'.")
    draw = jax.random.choice(jax.random.fold_in(key, _PRIOR_LABEL_STREAM), num_classes, (n,),
                             p=jnp.asarray(frequencies / frequencies.sum(), jnp.float32))
    return np.asarray(draw, np.int32)


def _resolve_guidance(config, n: int, labels, guidance, guidance_scale, classifier):
    """Check ``sample``'s label and guidance arguments: ``(conditioning, w, s)`` for the sampler.

    ``conditioning`` is :func:`guided_denoiser_fn`'s; ``s`` is None without classifier guidance.
    """
    num_classes = int(config.model.get("num_classes", 0))
    if labels is None:
        if guidance is not None or guidance_scale is not None or classifier is not None:
            raise ValueError("guidance, guidance_scale and classifier steer sampling towards labels; pass labels= "
                             "(one digit for all images, or one per image).")
        return "none", 0.0, None
    if guidance is not None and guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance {guidance!r}; allowed: {', '.join(GUIDANCE)}.")
    if guidance is None:
        guidance = "classifier_free" if num_classes else "classifier"
    if guidance == "classifier" and classifier is None:
        if not num_classes:
            raise ValueError(
                "labels were given, but this network was trained without them (model.num_classes=0) and no "
                "classifier was given. Either train a class-conditional network (python -m experiments.mnist "
                "--class-conditional) or steer this one with a noise-aware classifier: classifier="
                "ddpm_jax.noisy_classifier.load_noisy_classifier(...) (python -m experiments.noisy_classifier "
                "--workdir RUN trains one).")
        raise ValueError("guidance='classifier' needs classifier= (a noise-aware classifier, "
                         "ddpm_jax.noisy_classifier.load_noisy_classifier; python -m experiments.noisy_classifier).")
    if guidance == "classifier_free":
        if not num_classes:
            raise ValueError(
                "guidance='classifier_free' needs a class-conditional network, and this one was trained without "
                "labels (model.num_classes=0); train one with --class-conditional, or use guidance="
                "'classifier' with a noise-aware classifier.")
        if classifier is not None:
            raise ValueError("classifier= is used by guidance='classifier' only; drop it, or pass "
                             "guidance='classifier'.")
    valid_classes = num_classes
    if guidance == "classifier":
        from ddpm_jax.noisy_classifier import check_classifier_matches

        check_classifier_matches(classifier, config)
        classifier_classes = int(classifier.config.model.num_classes)
        valid_classes = min(num_classes, classifier_classes) if num_classes else classifier_classes
    _check_labels(labels, n, valid_classes)
    # Configs saved before these fields take today's defaults.
    default = config.sampling.get("classifier_scale", 32.0) if guidance == "classifier" else \
        config.sampling.get("guidance_scale", 1.0)
    scale = default if guidance_scale is None else guidance_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
            or not np.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (0: no guidance), got {scale!r}.")
    if guidance == "classifier":
        # s = 0 shifts nothing: skip the classifier's gradient (the samples are the same, bit for bit).
        return ("labels" if num_classes else "none"), 0.0, (float(scale) if scale else None)
    # w = 0 is the conditional prediction alone: one network call per step instead of two.
    return ("classifier_free" if scale else "labels"), float(scale), None


def _check_labels(labels, n: int, num_classes: int) -> None:
    array = np.asarray(labels)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers (digits 0..{num_classes - 1}), got {array.dtype} values.")
    if array.ndim > 1 or (array.ndim == 1 and array.shape != (n,)):
        raise ValueError(f"labels must be one int or an array of shape (n,) = ({n},), one per image; "
                         f"got shape {array.shape}.")
    bad = np.flatnonzero((array.ravel() < 0) | (array.ravel() >= num_classes))
    if bad.size:
        where = "" if array.ndim == 0 else f" at index {int(bad[0])}"
        raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {int(array.ravel()[bad[0]])}{where}"
                         f"{f' ({bad.size} such labels)' if bad.size > 1 else ''}.")
