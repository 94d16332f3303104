"""The noise-aware classifier p_phi(y | x_t, t) that classifier guidance needs (Dhariwal & Nichol 2021, sec. 4).

Guidance shifts each reverse step's mean by ``s * Sigma * grad_x log p_phi(y | x_t, t)``
(D&N Alg. 1), so the classifier must read *noisy* images at every timestep of
the diffusion model it guides: it is trained on ``x_t = q_sample(x_0, t, eps)``
with ``t ~ Uniform{0..T-1}`` under that model's schedule, and is only valid for it
(:func:`check_classifier_matches`).

* :func:`train_noisy_classifier` trains one (resuming from ``WORKDIR/checkpoints``
  if a run was cut short) and saves it with its config; ``python -m
  experiments.noisy_classifier --workdir RUN`` is its command line.
* :func:`load_noisy_classifier` returns a :class:`NoisyClassifierCheckpoint`.
* :func:`classifier_log_probs` / :func:`log_prob_fn` / :func:`class_log_prob_grad` are
  the pure, jit-able functions a guided sampler calls.

Layout of ``WORKDIR`` (e.g. ``RUN/noisy_classifier``): ``checkpoints/<step>/{state,config}``,
``config.json`` (the classifier's ``model`` and ``train`` sections plus the diffusion
run's ``diffusion`` section and ``data.image_size``), ``metrics.jsonl`` and, after an
evaluation, ``accuracy.json``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import data as data_lib
from ddpm_jax.checkpoint import config_differences
from ddpm_jax.configs import schedule_from_config
from ddpm_jax.diffusion import q_sample
from ddpm_jax.guidance import GuidanceInputs, classifier_grad_fn
from ddpm_jax.models.layers import CONV_IMPLS
from ddpm_jax.models.noisy_classifier import NoisyClassifier
from ddpm_jax.progress import progress_bar
from ddpm_jax.schedules import DiffusionSchedule
from ddpm_jax.train import MetricLogger, StopSignals, TrainingInterrupted, batch_indices
from ddpm_jax.workdir import WorkdirLock, prepare_workdir

__all__ = [
    "NoisyClassifierCheckpoint",
    "TrainingInterrupted",
    "build_noisy_classifier",
    "check_classifier_matches",
    "class_log_prob_grad",
    "classifier_log_probs",
    "evaluate_noisy_classifier",
    "load_noisy_classifier",
    "log_prob_fn",
    "noisy_classifier_config",
    "read_accuracy",
    "train_noisy_classifier",
]

DEFAULT_SUBDIR = "noisy_classifier"  # where the command line puts a run's classifier: RUN/noisy_classifier
NUM_QUARTERS = 4  # accuracy is reported per quarter of the timestep range, as train.py reports the loss
# Stream ids folded into the run's key, so data order, training noise and evaluation noise never share numbers.
_DATA_STREAM, _NOISE_STREAM, _EVAL_STREAM = 0, 1, 2
# Fields that may change between a run and its resumption: they steer the loop or the learning rate,
# not the state's shapes or the data a step sees.
_RESUMABLE_FIELDS = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.learning_rate", "train.warmup_steps", "train.eval_batch_size", "model.conv_impl")


def noisy_classifier_config() -> ml_collections.ConfigDict:
    """A fresh config: ``model`` (the :class:`NoisyClassifier`'s fields) and ``train``."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.stage_channels = (16, 32, 64)
    c.model.time_embed_dim = 32
    c.model.num_classes = 10
    c.model.groups = 8
    c.model.conv_impl = "auto"  # 'auto' | 'xla' | 'matmul': same parameters, see ddpm_jax/models/layers.py
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 2000
    c.train.batch_size = 128
    c.train.learning_rate = 2e-3  # AdamW, linear warm-up then cosine decay to 0 at num_steps
    c.train.warmup_steps = 100
    c.train.weight_decay = 1e-4
    c.train.seed = 0
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.eval_batch_size = 500
    return c


def build_noisy_classifier(model_config, conv_impl: str | None = None) -> NoisyClassifier:
    """The :class:`NoisyClassifier` a config's ``model`` section describes (``conv_impl``: instead of its own)."""
    conv_impl = conv_impl or model_config.get("conv_impl", "auto")  # configs saved before the field: 'auto'
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl={conv_impl!r} is not one of: {', '.join(CONV_IMPLS)}.")
    return NoisyClassifier(
        stage_channels=tuple(model_config.stage_channels),
        time_embed_dim=model_config.time_embed_dim,
        num_classes=model_config.num_classes,
        groups=model_config.groups,
        conv_impl=conv_impl,
    )


def _guidance_classifier(model_config) -> NoisyClassifier:
    impl = model_config.get("conv_impl", "auto")
    if impl == "auto" and jax.default_backend() == "cpu":
        # Inside a sampler's lax.scan, the gradient of XLA's CPU convolutions with respect to their input ran
        # 3.5x slower than outside one (0.16 s against 0.046 s as im2col matrix products, per step of 100 images
        # on 2 cores); guided sampling of 100 images at T = 100 took 35.9 s with them and 13.0 s without.
        impl = "matmul"
    return build_noisy_classifier(model_config, conv_impl=impl)


# ---------------------------------------------------------------------------
# What a guided sampler calls
# ---------------------------------------------------------------------------


def classifier_log_probs(model_config, params, x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """``log p_phi(y | x_t, t)`` for every class: float32 ``(B, num_classes)``, log-softmax of the logits.

    Pure and jit-able; differentiable with respect to ``x``. ``model_config`` is Python data:
    close over it, or pass it as a static argument (then it must be hashable: a
    ``FrozenConfigDict``, as ``NoisyClassifierCheckpoint.config.model`` is); ``params`` is a pytree.

    Args:
      model_config: the classifier config's ``model`` section (``checkpoint.config.model``).
      params: the classifier's parameters.
      x: float ``(B, H, W, C)``: x_t at the diffusion model's ``data.image_size`` (data in
        [-1, 1], then noised), exactly what the denoiser is given.
      t: int ``(B,)`` 0-based timesteps of the *training* schedule (a respaced sampler's
        index k stands for ``ddpm_jax.configs.sampling_timesteps(config, K)[k]``).

    On CPU with ``conv_impl='auto'`` the convolutions are computed as matrix products (same
    parameters, same values to float32 rounding): their input gradient inside a sampler's
    ``lax.scan`` is then 3.5x faster than XLA's convolution there.
    """
    logits = _guidance_classifier(model_config).apply({"params": params}, x, t)
    return jax.nn.log_softmax(logits, axis=-1)


def log_prob_fn(model_config) -> Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """:func:`classifier_log_probs` with the model bound: ``fn(params, x, t) -> (B, num_classes)``."""
    return functools.partial(classifier_log_probs, model_config)


def class_log_prob_grad(model_config, params, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """``grad_x log p_phi(y_i | x_i, t_i)`` per image: float32 ``(B, H, W, C)``, the term D&N's Alg. 1 scales.

    The gradient of the batch sum is each image's own gradient: nothing in the network
    mixes images (GroupNorm, no BatchNorm). ``y``: int ``(B,)`` target classes; the
    other arguments as in :func:`classifier_log_probs`. The guided samplers use the same
    rule (:func:`ddpm_jax.guidance.classifier_grad_fn`), at s = 1 here.
    """
    inputs = GuidanceInputs(variables=None, labels=y, classifier_params=params, classifier_scale=1.0)
    return classifier_grad_fn(log_prob_fn(model_config))(inputs, x, t)


@flax.struct.dataclass
class NoisyClassifierCheckpoint:
    """A trained noise-aware classifier: ``params`` and the frozen ``config`` it was trained with.

    ``config`` holds ``model`` and ``train`` (see :func:`noisy_classifier_config`), the
    guided diffusion run's ``diffusion`` section and ``data.image_size`` (plus
    ``data.fingerprint`` of the labelled training set). It is a static field, so the
    checkpoint itself can be passed into a jitted function.
    """

    params: Any
    config: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)
    step: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def num_timesteps(self) -> int:
        return self.config.diffusion.num_timesteps

    @property
    def schedule(self) -> DiffusionSchedule:
        """The diffusion schedule it was trained under."""
        return schedule_from_config(self.config)

    def log_probs(self, x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        """:func:`classifier_log_probs` with this checkpoint's model and parameters."""
        return classifier_log_probs(self.config.model, self.params, x, t)

    def grad_log_prob(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        """:func:`class_log_prob_grad` with this checkpoint's model and parameters."""
        return class_log_prob_grad(self.config.model, self.params, x, t, y)


def check_classifier_matches(classifier: NoisyClassifierCheckpoint, run_config) -> None:
    """Raise ValueError naming the fields that differ if ``classifier`` was trained for another diffusion model.

    It must share the run's whole ``diffusion`` section and its ``data.image_size``:
    its notion of x_t at step t is that schedule's. ``run_config`` is the diffusion
    run's config (or a :class:`ddpm_jax.DiffusionCheckpoint`, whose config is used).
    """
    run_config = getattr(run_config, "config", run_config)
    saved, current = classifier.config.to_dict(), run_config.to_dict()
    diffs = [
        d for d in config_differences(saved["diffusion"], current["diffusion"], "diffusion.")
        # A field newer than the classifier's config: judged by the tables below instead.
        if ": '<missing>' ->" not in d
    ]
    saved_size, run_size = saved["data"]["image_size"], current["data"]["image_size"]
    if saved_size != run_size:
        diffs.append(f"data.image_size: {saved_size!r} -> {run_size!r}")
    if not diffs:
        # The tables themselves, so a schedule field added after the classifier was trained cannot hide a change.
        ours, theirs = schedule_from_config(classifier.config), schedule_from_config(run_config)
        if ours.num_timesteps != theirs.num_timesteps or not np.allclose(ours.betas, theirs.betas, rtol=1e-6):
            diffs.append("diffusion: the betas the two configs give differ")
    if diffs:
        raise ValueError(
            "the noisy classifier was trained for another diffusion model than this run's; fields that differ "
            f"(classifier -> run): {'; '.join(diffs)}. Train one for this run with "
            "`python -m experiments.noisy_classifier --workdir RUN`."
        )


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class ClassifierTrainState:
    """What a classifier run needs to continue; saved whole in every checkpoint.

    ``key`` is the run's base key; per-step keys are ``fold_in``-ed from it and ``step``,
    so a resumed run draws the same batches, timesteps and noise.
    """

    step: jnp.ndarray  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    key: jnp.ndarray


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """step -> learning rate: linear warm-up from 0, then cosine decay to 0 at ``train.num_steps``."""
    t = config.train
    warmup = min(t.warmup_steps, max(t.num_steps - 1, 0))  # a run shorter than its warm-up still decays
    return optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, warmup, max(t.num_steps, warmup + 1))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) on :func:`learning_rate_schedule`."""
    return optax.adamw(learning_rate_schedule(config), weight_decay=config.train.weight_decay)


def create_train_state(config: ml_collections.ConfigDict) -> ClassifierTrainState:
    """A fresh state for ``config`` (the full classifier config, ``data.image_size`` included): step 0."""

    def init() -> ClassifierTrainState:
        init_key, run_key = jax.random.split(jax.random.PRNGKey(config.train.seed))
        size = config.data.image_size
        params = build_noisy_classifier(config.model).init(
            init_key, jnp.zeros((1, size, size, 1), jnp.float32), jnp.zeros((1,), jnp.int32)
        )["params"]
        return ClassifierTrainState(
            step=jnp.asarray(0, jnp.int32), params=params, opt_state=make_optimizer(config).init(params), key=run_key
        )

    # One compiled program: run eagerly, initialization compiles each of its ~150 small ops (7 s on 2 cores).
    return jax.jit(init)()


def quarter_of(t: jnp.ndarray, num_timesteps: int) -> jnp.ndarray:
    """Which quarter of ``[0, T)`` each timestep lies in: ``t * 4 // T`` (as train.py buckets the loss)."""
    return t * NUM_QUARTERS // num_timesteps


def timestep_quarters(num_timesteps: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each quarter: the t with ``t * 4 // T == q`` (empty when T < 4)."""
    bounds = [-(-q * num_timesteps // NUM_QUARTERS) for q in range(NUM_QUARTERS + 1)]  # ceil(q T / 4)
    return [(bounds[q], bounds[q + 1]) for q in range(NUM_QUARTERS)]


def make_train_step(config: ml_collections.ConfigDict, schedule: DiffusionSchedule):
    """A jitted ``(state, images_u8, labels) -> (state, metrics)`` drawing its batch inside jit.

    ``images_u8``: the whole training set, uint8 ``(N, h, w, 1)`` on the device;
    ``labels``: int32 ``(N,)``. Each step takes the ``step``-th batch of an epoch-wise
    shuffle (:func:`ddpm_jax.train.batch_indices`), maps it to [-1, 1] at
    ``data.image_size``, noises each image to its own ``t ~ Uniform{0..T-1}`` and takes
    one AdamW step on the cross-entropy. The old state is donated.

    Metrics: ``loss``, ``accuracy`` (batch means) and per quarter of the timestep range
    ``correct_by_quarter`` / ``count_by_quarter`` ``(4,)``, for the logger to sum.
    """
    model = build_noisy_classifier(config.model)
    tx = make_optimizer(config)
    batch_size, image_size, num_timesteps = config.train.batch_size, config.data.image_size, schedule.num_timesteps

    def step(state: ClassifierTrainState, images_u8: jnp.ndarray, labels: jnp.ndarray):
        chex.assert_rank(images_u8, 4)
        chex.assert_shape(labels, (images_u8.shape[0],))
        idx = batch_indices(jax.random.fold_in(state.key, _DATA_STREAM), images_u8.shape[0], state.step, batch_size)
        t_key, eps_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(state.key, _NOISE_STREAM), state.step))
        x0 = data_lib.preprocess(images_u8[idx], image_size)
        y = labels[idx]
        t = jax.random.randint(t_key, (batch_size,), 0, num_timesteps)
        x_t = q_sample(schedule, x0, t, jax.random.normal(eps_key, x0.shape))

        def loss_fn(params):
            logits = model.apply({"params": params}, x_t, t)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        one_hot = jax.nn.one_hot(quarter_of(t, num_timesteps), NUM_QUARTERS, dtype=jnp.float32)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(correct),
            "correct_by_quarter": correct @ one_hot,
            "count_by_quarter": jnp.sum(one_hot, axis=0),
        }
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def evaluate_noisy_classifier(
    classifier: NoisyClassifierCheckpoint,
    images_u8: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    batch_size: int = 500,
) -> dict:
    """Accuracy on noised images, overall and per quarter of the timestep range.

    Stratified: image ``i`` is noised to a ``t`` drawn uniformly from quarter ``i mod 4``
    (each image once, the quarters equally often), so the overall accuracy is that of
    ``t ~ Uniform{0..T-1}`` when 4 divides T. Deterministic given ``seed``.

    Args:
      images_u8: uint8 ``(N, h, w, 1)``; labels: int ``(N,)``.

    Returns:
      ``{'accuracy', 'accuracy_by_quarter' (4 floats, None for an empty quarter),
      'count_by_quarter', 'quarters' ([lo, hi) of t), 'num_examples', 'num_timesteps'}``.
    """
    images_u8, labels = np.asarray(images_u8), np.asarray(labels, np.int32)
    chex.assert_rank(images_u8, 4)
    chex.assert_shape(labels, (images_u8.shape[0],))
    n, num_timesteps = len(labels), classifier.num_timesteps
    quarters = timestep_quarters(num_timesteps)
    nonempty = [q for q, (lo, hi) in enumerate(quarters) if hi > lo]
    rng = np.random.default_rng(seed)
    assigned = np.asarray(nonempty)[np.arange(n) % len(nonempty)]
    lo = np.array([quarters[q][0] for q in assigned], np.int64)
    hi = np.array([quarters[q][1] for q in assigned], np.int64)
    t_all = (lo + np.floor(rng.random(n) * (hi - lo))).astype(np.int32)
    assert np.all(quarter_of(t_all, num_timesteps) == assigned)

    batch = max(1, min(batch_size, n))
    c = classifier.config
    predict = _compiled_predict(json.dumps({"model": c.model.to_dict(), "diffusion": c.diffusion.to_dict(),
                                            "image_size": c.data.image_size}, sort_keys=True), batch)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), _EVAL_STREAM)
    predictions = []
    for i, start in enumerate(range(0, n, batch)):
        x, t = images_u8[start : start + batch], t_all[start : start + batch]
        pad = batch - len(x)  # one compiled shape for every batch; padded rows are dropped below
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.uint8)])
            t = np.concatenate([t, np.zeros((pad,), np.int32)])
        predictions.append(np.asarray(predict(classifier.params, jax.random.fold_in(key, i), x, t))[: batch - pad])
    correct = (np.concatenate(predictions) == labels) if n else np.zeros((0,), bool)
    by_quarter = [float(correct[assigned == q].mean()) if np.any(assigned == q) else None for q in range(NUM_QUARTERS)]
    return {
        "accuracy": float(correct.mean()) if n else None,
        "accuracy_by_quarter": by_quarter,
        "count_by_quarter": [int(np.sum(assigned == q)) for q in range(NUM_QUARTERS)],
        "quarters": [list(q) for q in quarters],
        "num_examples": n,
        "num_timesteps": num_timesteps,
        "seed": seed,
    }


@functools.lru_cache(maxsize=8)
def _compiled_predict(what_json: str, batch: int) -> Callable:
    # Keyed by what the prediction depends on (network, schedule, size), not by training fields, so a resumed
    # or longer run evaluates with the function already compiled.
    what = ml_collections.ConfigDict(json.loads(what_json))
    schedule = schedule_from_config(what)
    model, image_size = build_noisy_classifier(what.model), what.image_size

    @jax.jit
    def predict(params, key, images_u8, t):
        x0 = data_lib.preprocess(images_u8, image_size)
        x_t = q_sample(schedule, x0, t, jax.random.normal(key, x0.shape))
        return jnp.argmax(model.apply({"params": params}, x_t, t), axis=-1)

    return predict


def _freeze(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
    # Through JSON, as a checkpoint stores it: a trained and a loaded classifier's configs then compare (and
    # hash) equal, so jitted functions taking them as static arguments are not traced again.
    return ml_collections.FrozenConfigDict(json.loads(json.dumps(config.to_dict())))


def _full_config(run_config, config: ml_collections.ConfigDict, images_u8, labels) -> ml_collections.ConfigDict:
    """The classifier's model and train sections, with the diffusion run's schedule and image size and the data's hash."""
    full = ml_collections.ConfigDict({"model": config.model.to_dict(), "train": config.train.to_dict()})
    full.diffusion = ml_collections.ConfigDict(run_config.diffusion.to_dict())
    full.data = ml_collections.ConfigDict(
        {"image_size": int(run_config.data.image_size), "fingerprint": data_lib.fingerprint(images_u8, labels)}
    )
    return full


def _validate(config: ml_collections.ConfigDict, num_examples: int) -> None:
    t = config.train
    checks = [
        (t.num_steps >= 1, "train.num_steps", t.num_steps, "an integer >= 1"),
        (1 <= t.batch_size <= num_examples, "train.batch_size", t.batch_size,
         f"an integer from 1 to the {num_examples} training images"),
        (t.learning_rate > 0, "train.learning_rate", t.learning_rate, "a rate > 0"),
        (t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "an integer >= 0"),
        (t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a weight >= 0"),
    ] + [(t[f] >= 1, f"train.{f}", t[f], "an integer >= 1")
         for f in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size")]
    for ok, field, value, allowed in checks:
        if not ok:
            raise ValueError(f"{field}={value!r} is not allowed: {allowed}.")
    # The network checks its own widths, and the image size against its poolings, when traced.
    jax.eval_shape(lambda: create_train_state(config))


def _restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    restored = ckpt_lib.restore_config(manager, step)
    if "stage_channels" not in restored.get("model", {}):
        # The same layout as a diffusion run's checkpoints: say so rather than fail on mismatched arrays.
        run = os.path.dirname(str(manager.directory))
        raise ckpt_lib.ConfigRefusedError(
            f"{manager.directory} holds checkpoints of a diffusion run, not of a noisy classifier; its classifier "
            f"goes in {os.path.join(run, DEFAULT_SUBDIR)}."
        )
    return restored


def _restore_state(manager: ocp.CheckpointManager, step: int, config) -> ClassifierTrainState:
    # The state's structure (optimizer state included) follows from the config alone.
    return ckpt_lib.restore_state(manager, step, jax.eval_shape(lambda: create_train_state(config)))


def _resume(manager: ocp.CheckpointManager, config: ml_collections.ConfigDict) -> ClassifierTrainState | None:
    """The latest intact saved state, or None; refuses a checkpoint of another config or other data
    (a damaged one is moved aside: :func:`ddpm_jax.checkpoint.restore_newest_intact`)."""
    def load(step):
        saved = _restore_config(manager, step).to_dict()
        diffs = [d for d in config_differences(saved, config.to_dict()) if not d.startswith(_RESUMABLE_FIELDS)]
        if diffs:
            raise ckpt_lib.ConfigRefusedError(
                f"{manager.directory} holds a noisy classifier (step {step}) of a different config or data; fields "
                f"that differ (saved -> now): {'; '.join(diffs)}. Use another output folder, or the same settings "
                "to resume."
            )
        return _restore_state(manager, step, config)

    return ckpt_lib.restore_newest_intact(manager, load)


def train_noisy_classifier(
    run_config,
    images_u8: np.ndarray,
    labels: np.ndarray,
    workdir: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    progress: bool = True,
) -> NoisyClassifierCheckpoint:
    """Train (or resume) a noise-aware classifier for the diffusion run configured by ``run_config``.

    Args:
      run_config: the diffusion run's config (``load_checkpoint(RUN).config``): its
        ``diffusion`` section and ``data.image_size`` fix what x_t the classifier sees.
      images_u8: uint8 ``(N, 28, 28, 1)`` training images; labels: int ``(N,)`` digits.
      workdir: output folder (e.g. ``RUN/noisy_classifier``). Checkpoints every
        ``train.checkpoint_every`` steps (and on Ctrl-C / SIGTERM); a folder that already
        holds a checkpoint of the same config and data is resumed from its latest step.
      config: the classifier config (default :func:`noisy_classifier_config`).
      test_images, test_labels: if given, accuracy on them per quarter of the timestep
        range (:func:`evaluate_noisy_classifier`) is written to ``workdir/accuracy.json``.
      progress: a progress bar (:func:`ddpm_jax.progress.progress_bar`: tqdm on a terminal,
        a plain line every 30 s when stderr is a file).

    Returns:
      The trained :class:`NoisyClassifierCheckpoint`.
    """
    images_u8, labels = np.asarray(images_u8), np.asarray(labels, np.int32)
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4:
        raise ValueError(f"training images must be uint8 (N, h, w, 1), got {images_u8.dtype} {images_u8.shape}.")
    chex.assert_shape(labels, (images_u8.shape[0],))
    config = _full_config(run_config, config or noisy_classifier_config(), images_u8, labels)
    _validate(config, len(labels))
    workdir = prepare_workdir(workdir, "workdir")
    # One process per folder, as for a diffusion run: a second would clean up the first's save in flight.
    with WorkdirLock(workdir, what="training a noisy classifier"):
        return _train_locked(config, workdir, images_u8, labels, test_images, test_labels, progress)


def _train_locked(config, workdir: str, images_u8, labels, test_images, test_labels, progress: bool):
    schedule = schedule_from_config(config)
    manager = ckpt_lib.make_manager(workdir, config)
    state = _resume(manager, config)
    logger = MetricLogger(os.path.join(workdir, "metrics.jsonl"))
    logger.truncate_after(int(state.step) if state is not None else 0)  # lines past the checkpoint are redone
    if state is not None and int(state.step) >= config.train.num_steps:
        print(f"the noisy classifier in {workdir} is trained (step {int(state.step)})", flush=True)
    elif state is not None:
        print(f"resuming the noisy classifier from step {int(state.step)} in {workdir}", flush=True)
    else:
        state = create_train_state(config)
        num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
        print(f"noisy classifier: {num_params:,} parameters; {len(labels):,} training images; "
              f"T={schedule.num_timesteps} {config.diffusion.schedule} schedule at {config.data.image_size}x"
              f"{config.data.image_size}", flush=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)

    tc = config.train
    step_fn = make_train_step(config, schedule)
    device_images, device_labels = jnp.asarray(images_u8), jnp.asarray(labels)
    start, end = int(state.step), tc.num_steps
    lr_at = learning_rate_schedule(config)
    bar = None
    if progress and start < end:
        # smoothing=0: the average rate; steps are dispatched ahead and finish in bursts at each log point.
        bar = progress_bar(total=end, initial=start, unit="step", desc="noisy classifier", dynamic_ncols=True,
                           smoothing=0)
    pending, last_time = [], time.perf_counter()
    try:
        with StopSignals() as stop:
            for step in range(start, end):
                state, metrics = step_fn(state, device_images, device_labels)
                pending.append(metrics)
                done = step + 1
                if done % tc.log_every == 0 or done == end:
                    record = _log_record(jax.device_get(pending), done, float(lr_at(done - 1)),
                                         len(pending) * tc.batch_size / max(time.perf_counter() - last_time, 1e-9))
                    pending, last_time = [], time.perf_counter()
                    with open(logger.path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
                if done % tc.checkpoint_every == 0 or done == end or stop.signum is not None:
                    ckpt_lib.save(manager, state, config)  # the same layout as a diffusion run's
                if bar is not None:
                    bar.update(1)
                if stop.signum is not None:
                    manager.wait_until_finished()
                    raise TrainingInterrupted(stop.signum, done, ckpt_lib.step_directory(manager, done))
    finally:
        if bar is not None:
            bar.close()
        manager.wait_until_finished()  # a save under way completes, so the latest checkpoint stays whole
        ckpt_lib.finish_manifests(manager.directory)
        manager.close()

    classifier = NoisyClassifierCheckpoint(params=state.params, config=_freeze(config), step=int(state.step))
    if test_images is not None and test_labels is not None:
        result = evaluate_noisy_classifier(classifier, test_images, test_labels, seed=tc.seed,
                                           batch_size=tc.eval_batch_size)
        result["step"] = classifier.step
        with open(os.path.join(workdir, "accuracy.json"), "w") as f:
            json.dump(result, f, indent=2)
    return classifier


def _log_record(fetched: list[dict], step: int, learning_rate: float, images_per_s: float) -> dict:
    correct = np.sum([m["correct_by_quarter"] for m in fetched], axis=0)
    counts = np.sum([m["count_by_quarter"] for m in fetched], axis=0)
    record = {
        "step": step,
        "loss": float(np.mean([m["loss"] for m in fetched])),
        "accuracy": float(np.mean([m["accuracy"] for m in fetched])),
        "learning_rate": learning_rate,
        "images_per_s": images_per_s,
    }
    for q in range(NUM_QUARTERS):
        record[f"accuracy_t_q{q}"] = float(correct[q] / counts[q]) if counts[q] else None
    return record


def load_noisy_classifier(workdir: str, step: int | None = None) -> NoisyClassifierCheckpoint:
    """The classifier saved in ``workdir`` (e.g. ``RUN/noisy_classifier``): its latest step, or ``step``.

    Raises FileNotFoundError naming the folder and the command that trains one if there is none.
    """
    directory = os.path.join(os.path.abspath(workdir), ckpt_lib.CHECKPOINT_SUBDIR)
    run = os.path.dirname(os.path.abspath(workdir))
    command = (f"`python -m experiments.noisy_classifier --workdir {run}`"
               if os.path.basename(os.path.abspath(workdir)) == DEFAULT_SUBDIR
               else f"`python -m experiments.noisy_classifier --workdir RUN --out {workdir}`")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no noisy classifier in {workdir!r} (looked for {directory}); train one with {command}.")
    manager = ckpt_lib.read_only_manager(workdir)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(
                f"no noisy-classifier checkpoint for step {step} in {directory} (saved steps: "
                f"{list(manager.all_steps())}); train one with {command}."
            )
        try:
            ckpt_lib.verify_checkpoint(ckpt_lib.step_directory(manager, step))
        except ckpt_lib.CheckpointDamagedError as e:
            raise ckpt_lib.CheckpointDamagedError(f"the noisy classifier's checkpoint at step {step} is damaged "
                                                  f"({e}); retrain it, or load another step.") from None
        config = _restore_config(manager, step)
        state = _restore_state(manager, step, config)
    finally:
        manager.close()
    return NoisyClassifierCheckpoint(params=state.params, config=_freeze(config), step=int(state.step))


def read_accuracy(workdir: str) -> dict:
    """``workdir/accuracy.json``: what :func:`evaluate_noisy_classifier` measured after training, and at which step."""
    with open(os.path.join(os.path.abspath(workdir), "accuracy.json")) as f:
        return json.load(f)
