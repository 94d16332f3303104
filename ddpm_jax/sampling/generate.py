"""Drawing images from a trained run: ``sample(checkpoint, key, n)`` and ``prior_labels``.

What a notebook calls after :func:`ddpm_jax.load_checkpoint`: the options are checked
once (:func:`ddpm_jax.sampling.options.sampling_options`), a jitted sampler is built once per
(config, batch shape, options) and reused, and the labels and guidance of a
class-conditional network, or a noise-aware classifier's, are resolved here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax.configs import (
    UNCONDITIONAL_MODES,
    available_memory_bytes,
    model_input_shape,
    sampling_timesteps,
    schedule_from_config,
)
from ddpm_jax.data import crop, pad_to_batch
from ddpm_jax.diffusion.guidance import GuidanceInputs, classifier_grad_fn
from ddpm_jax.diffusion.samplers import make_ancestral_sampler, make_ddim_sampler, make_dpm_solver_sampler
from ddpm_jax.diffusion.schedules import DiffusionSchedule
from ddpm_jax.sampling.denoiser import guided_denoiser_fn
from ddpm_jax.sampling.options import SamplingOptions, sampling_options
from ddpm_jax.training.checkpoint import DiffusionCheckpoint, check_variables_fit_config
from ddpm_jax.training.noisy_classifier import check_classifier_matches, log_prob_fn
from ddpm_jax.utils import parallel
from ddpm_jax.utils.arguments import check_count, check_key
from ddpm_jax.utils.progress import progress_bar

# How labels steer sampling: a class-conditional network's own conditioning with classifier-free
# guidance (Ho & Salimans 2022), or a noise-aware classifier's gradient (Dhariwal & Nichol 2021).
GUIDANCE = ("classifier_free", "classifier")
_PRIOR_LABEL_STREAM = 0x6C61626C  # folded into sample()'s key for the labels it draws; x_T uses fold_in(key, b)


@functools.lru_cache(maxsize=32)
def _compiled_sampler(config: ml_collections.FrozenConfigDict, batch: int, options: SamplingOptions,
                      return_every: int, conditioning: str = "none",
                      classifier_model: ml_collections.FrozenConfigDict | None = None):
    """One jitted ``sampler(GuidanceInputs, key)`` per (config, batch, options): built once, reused across calls.

    Labels and guidance scales are arguments, not constants: a sweep over them compiles once.
    ``classifier_model``: the noise-aware classifier's model config, for classifier guidance.
    """
    mesh = parallel.make_mesh()
    cond_fn = None if classifier_model is None else classifier_grad_fn(log_prob_fn(classifier_model))
    with_learned_variance = options.method == "ancestral" and options.variance == "learned"
    common = dict(  # noqa: C408
        eps_fn=guided_denoiser_fn(config.model, with_learned_variance, conditioning, options.batchnorm),
        cond_fn=cond_fn,
        schedule=schedule_from_config(config, options.steps, options.spacing),
        shape=model_input_shape(config, batch),
        return_every=return_every,
        sharding=parallel.batch_sharded(mesh),
        # all T: the network's own indices
        timesteps=sampling_timesteps(config, options.steps, options.spacing) if options.steps else None,
    )
    if options.method == "ddim":
        sampler = make_ddim_sampler(eta=options.eta, **common)
    elif options.method in ("dpm_solver++", "sde_dpm_solver++"):
        sampler = make_dpm_solver_sampler(order=options.order, stochastic=options.method == "sde_dpm_solver++",
                                          **common)
    else:
        sampler = make_ancestral_sampler(variance=options.variance, mean=options.mean, **common)
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
    method: str | None = None,
    eta: float = 0.0,
    order: int | None = None,
    spacing: str | None = None,
    weights: str | None = None,
    variance: str | None = None,
    mean: str | None = None,
    return_every: int = 0,
    batch_size: int | None = None,
    schedule: DiffusionSchedule | None = None,
    progress: bool = False,
):
    """Draw ``n`` images by ancestral sampling (Ho et al. 2020, Algorithm 2); returns ``(n, H, W, C)`` float32 in [-1, 1].

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
        sampling); default from the config: ``sampling.guidance_scale`` or
        ``sampling.classifier_scale`` (each preset's value: :func:`ddpm_jax.configs.preset_table`).
      classifier: a noise-aware classifier trained on this run's schedule
        (:func:`ddpm_jax.training.noisy_classifier.load_noisy_classifier`), for classifier guidance.
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
      steps: reverse steps K, one network call each (default: all T the network was trained with).
        With K < T the schedule is respaced to K training timesteps placed by ``spacing`` (Nichol &
        Dhariwal 2021). ``steps=FEW_STEPS`` (50) with the default method is the fewest calls measured to
        come within 15% of the FID and 1 point of the unreadable rate of all T = 100 ancestral steps in
        both feature spaces on the default MNIST run at 10,000 samples (x1.05 and x1.07), and on
        Fashion-MNIST (docs/results.md, "Few network calls"); 25 calls are 18% above in one space at
        10,000 samples, 10 calls 25% above in the other.
      method: default ``'ancestral'`` for all T steps, ``'sde_dpm_solver++'`` for K < T (unless
        ``variance``, ``mean`` or ``eta`` is given, which choose ancestral sampling's or DDIM's step).
        ``'ancestral'`` (Ho et al.'s Algorithm 2, on the respaced schedule when K < T),
        ``'ddim'`` (Song et al. 2021; see :func:`ddpm_jax.diffusion.samplers.make_ddim_sampler`),
        ``'dpm_solver++'`` (Lu et al. 2022: the multistep ODE solver in log-SNR; K network calls give
        samples close to many more ancestral steps) or ``'sde_dpm_solver++'`` (its stochastic form).
      eta: DDIM only: 0 deterministic, 1 ancestral-equivalent (sigma^2 = beta-tilde).
      order: DPM-Solver++ only: 1 (= DDIM), 2 (default) or 3 (not the SDE form); K must allow it.
      spacing: where K < T steps fall (:func:`ddpm_jax.diffusion.schedules.spaced_timesteps`): ``'trailing'``
        (default: from T-1 down, never 0; the best for every sampler measured), ``'linspace'`` (evenly
        from 0 to T-1, the spacing before DPM-Solver++ came), ``'leading'`` or ``'logsnr'`` (uniform in
        log-SNR).
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
      float32 ``(n, H, W, C)`` images in [-1, 1], NHWC at the training images' own size and
      channels (``data.native_size``, ``data.channels``: ``(n, 28, 28, 1)`` for MNIST, ``(n, 32, 32, 3)``
      for CIFAR-10; map to pixels with ``(x + 1) * 127.5``); with ``labels``, image ``i`` was asked
      to be class ``labels[i]``. With ``return_every=k``: ``(images, frames)``, frames
      ``(F, n, H, W, C)`` from pure noise x_T to x_0 (see
      :func:`ddpm_jax.diffusion.samplers.make_ancestral_sampler`).
    """
    if not isinstance(params, DiffusionCheckpoint):
        raise TypeError(
            "sample(params, key, n) takes what ddpm_jax.load_checkpoint(workdir) returns (a DiffusionCheckpoint "
            f"holding params, batch_stats and the run's config), got {type(params).__name__}. For raw network "
            "variables use ddpm_jax.diffusion.samplers.make_ancestral_sampler with your model and schedule."
        )
    n = check_count("n", n, 1)
    key = check_key(key)
    if batch_size is not None:
        check_count("batch_size", batch_size, 1)
    check_count("return_every", return_every, 0)
    if weights is not None:
        params = params.with_weights(weights)
    config = params.config
    check_variables_fit_config(params)
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
    options = sampling_options(config, steps=steps, method=method, eta=eta, variance=variance, mean=mean,
                               batchnorm=batchnorm, order=order, spacing=spacing)
    # Before anything of size n is drawn (the prior's labels included).
    _check_fits_in_memory(n, config.data.image_size, int(config.data.get("channels", 1)), return_every,
                          options.steps or config.diffusion.num_timesteps)
    if labels is None:
        labels = _prior_labels(config, key, n, unconditional, classifier)
    elif unconditional is not None:
        raise ValueError("unconditional= says what to draw when no labels are given; drop it, or drop labels=.")
    conditioning, scale, classifier_scale = _resolve_guidance(config, n, labels, guidance, guidance_scale, classifier)
    labels = None if labels is None else np.broadcast_to(np.asarray(labels, dtype=np.int32), (n,))
    native = int(config.data.get("native_size", 28))  # the padding to data.image_size is cropped away
    batch = min(batch_size or config.sampling.batch_size, n)
    shards = parallel.num_shards(parallel.make_mesh())  # the mesh _compiled_sampler splits the batch over
    batch = -(-batch // shards) * shards  # a multiple of the device count, so every device gets an equal share
    classifier_model = None if classifier_scale is None else _frozen(classifier.config.model)
    sampler = _compiled_sampler(_frozen(config), batch, options, return_every, conditioning, classifier_model)

    num_batches = -(-n // batch)
    batches = progress_bar(range(num_batches), unit="batch", desc=f"sampling {n}", enabled=progress and num_batches > 1)
    images, frames = [], []
    for b in batches:
        inputs = GuidanceInputs(
            variables=params.variables,
            # The last batch is padded by repeating its labels; its extra images are cropped below.
            labels=None if labels is None else jnp.asarray(pad_to_batch(labels[b * batch:(b + 1) * batch], batch)),
            scale=jnp.float32(scale),
            classifier_params=None if classifier_scale is None else classifier.params,
            classifier_scale=jnp.float32(classifier_scale or 0.0),
        )
        out = sampler(inputs, jax.random.fold_in(key, b))
        if return_every:
            out, chain = out
            frames.append(crop(chain, native, native))
        images.append(crop(out, native, native))
    images = jnp.concatenate(images)[:n]
    if return_every:
        return images, jnp.concatenate(frames, axis=1)[:, :n]
    return images


def _check_fits_in_memory(n: int, size: int, channels: int, return_every: int, steps: int) -> None:
    """Refuse up front a request whose results alone could not fit in memory (they are gathered whole)."""
    frames = (steps // return_every + 1) if return_every else 0
    need = 4 * size * size * channels * n * (1 + frames)  # float32 images, plus the chain's frames
    available = available_memory_bytes()
    if available is not None and need > available:
        raise ValueError(
            f"sample(n={n:,}{f', return_every={return_every}' if return_every else ''}) would need "
            f"{need / 2**30:.1f} GiB for its results, more than the {available / 2**30:.1f} GiB available. Draw "
            "batches of fewer images with separate keys (jax.random.fold_in(key, i)), or use "
            "ddpm_jax.evaluation.evaluate.draw_samples / ddpm-jax-evaluate, which stream to disk.")


def prior_labels(params: DiffusionCheckpoint, key: jax.Array, n: int) -> np.ndarray | None:
    """The digits ``sample(params, key, n)`` draws for a class-conditional network given no labels; returns int32 ``(n,)``.

    int32 ``(n,)``, or None where it draws none (an unconditional network, or
    ``sampling.unconditional='null'``). For reading a grid, or counting what was asked for.
    """
    if not isinstance(params, DiffusionCheckpoint):
        raise TypeError(f"prior_labels(params, key, n) takes what ddpm_jax.load_checkpoint(workdir) returns, got "
                        f"{type(params).__name__}.")
    n = check_count("n", n, 1)
    _check_fits_in_memory(n, 1, 1, 0, 1)  # the labels alone, as int32 (four bytes each, as one float pixel)
    return _prior_labels(params.config, check_key(key), n, None, None)


def _frozen(config) -> ml_collections.FrozenConfigDict:
    """``config`` as the compiled samplers' cache key: a checkpoint's is frozen already (no copy then)."""
    return config if isinstance(config, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(config)


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
                "classifier was given. Either train a class-conditional network (ddpm-jax-train "
                "--class-conditional) or steer this one with a noise-aware classifier: classifier="
                "ddpm_jax.training.noisy_classifier.load_noisy_classifier(...) (python -m experiments.noisy_classifier "
                "--workdir RUN trains one).")
        raise ValueError("guidance='classifier' needs classifier= (a noise-aware classifier, "
                         "ddpm_jax.training.noisy_classifier.load_noisy_classifier; python -m experiments.noisy_classifier).")
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
