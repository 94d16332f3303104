"""Training machinery: the train state, the jitted step, and the training loop.

The step functions are pure (``(state, batch) -> (state, metrics)``) and
jitted once; ``train_and_evaluate(config, workdir)`` is the loop that the
``experiments.mnist`` entry point calls, importable from a notebook as well.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import configs as configs_lib
from ddpm_jax import data as data_lib
from ddpm_jax import parallel, plotting
from ddpm_jax.api import BATCHNORM_MODES, UNCONDITIONAL_MODES, DiffusionCheckpoint, sample
from ddpm_jax.configs import schedule_from_config
from ddpm_jax.data import crop, preprocess  # noqa: F401  (crop: re-exported for notebooks)
from ddpm_jax.diffusion import MEAN_TYPES, VARIANCE_TYPES
from ddpm_jax.guidance import drop_labels
from ddpm_jax.losses import l_hybrid, l_simple
from ddpm_jax.models import build_model
from ddpm_jax.schedules import DiffusionSchedule

# Stream ids folded into the run's key, so data order, training noise and
# sampling never share random numbers.
_DATA_STREAM, _STEP_STREAM, _DROPOUT_STREAM, _LABEL_STREAM = 0, 1, 2, 3
NUM_LOSS_BUCKETS = 4  # loss is also logged per quarter of the timestep range


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: saved whole in every checkpoint.

    ``key`` is the run's base key (raw uint32); per-step keys are
    ``fold_in``-ed from it and ``step``, so a resumed run draws the same numbers.
    """

    step: jnp.ndarray  # int32 scalar: optimizer steps taken
    params: Any
    ema_params: Any  # exponential moving average of params (see ema_decay_at)
    batch_stats: Any
    opt_state: Any
    key: jnp.ndarray
    apply_fn: Any = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.9999)
    ema_warmup: bool = flax.struct.field(pytree_node=False, default=True)
    # lambda of L_hybrid for a learned-variance network; None: the network predicts eps only (L_simple).
    hybrid_lambda: float | None = flax.struct.field(pytree_node=False, default=None)
    # A class-conditional network's classes (0: unconditional) and its label-dropout rate.
    num_classes: int = flax.struct.field(pytree_node=False, default=0)
    p_uncond: float = flax.struct.field(pytree_node=False, default=0.0)
    # gamma of the min-SNR weighting of L_simple (train.loss_weighting='min_snr'); None: unweighted.
    min_snr_gamma: float | None = flax.struct.field(pytree_node=False, default=None)

    def apply_gradients(self, grads, batch_stats) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        decay = ema_decay_at(self.step, self.ema_decay, self.ema_warmup)
        return self.replace(
            step=self.step + 1,
            params=params,
            ema_params=ema_update(self.ema_params, params, decay),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )


def ema_decay_at(num_updates, max_decay: float, warmup: bool = True):
    """The decay of the ``num_updates``-th EMA update (0-based): ``min(max_decay, (1 + n) / (10 + n))``
    with the warm-up (TensorFlow's ``ExponentialMovingAverage(num_updates=n)``), else ``max_decay``.

    The warm-up makes the average's horizon grow with the run (0.1 at the first update, 0.9 after
    80, 0.99 after 890), so a run of a few thousand steps ends with usable averaged weights rather
    than ones still 0.9999^3000 = 74% made of the random initialization.
    """
    if not warmup:
        return jnp.asarray(max_decay, jnp.float32)
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params, params, decay):
    """``decay * ema + (1 - decay) * params``, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """step -> learning rate: linear warm-up, then constant or cosine decay to 0 at ``num_steps``."""
    t = config.train
    if t.learning_rate <= 0:
        raise ValueError(f"train.learning_rate must be > 0, got {t.learning_rate}.")
    if t.lr_schedule == "constant":
        if not t.warmup_steps:
            return optax.constant_schedule(t.learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps), optax.constant_schedule(t.learning_rate)],
            [t.warmup_steps],
        )
    if t.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, max(t.num_steps, t.warmup_steps + 1))
    raise ValueError(f"unknown train.lr_schedule {t.lr_schedule!r}; allowed: constant, cosine.")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam on :func:`learning_rate_schedule`, after global-norm clipping if configured."""
    clip = config.train.grad_clip_norm
    chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    return optax.chain(*chain, optax.adam(learning_rate_schedule(config)))


def model_input_shape(config: ml_collections.ConfigDict, batch_size: int) -> tuple[int, int, int, int]:
    size = config.data.image_size
    return (batch_size, size, size, 1)


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array | None = None) -> TrainState:
    """A fresh train state: initialized network, optimizer state, step 0."""
    model = build_model(config.model)
    key = jax.random.PRNGKey(config.seed) if key is None else key
    init_key, run_key = jax.random.split(key)
    variables = model.init(
        init_key, jnp.zeros(model_input_shape(config, 1)), jnp.zeros((1,), jnp.int32), train=False
    )
    tx = make_optimizer(config)
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=variables["params"],
        ema_params=jax.tree.map(jnp.copy, variables["params"]),
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
        key=run_key,
        apply_fn=model.apply,
        tx=tx,
        ema_decay=float(config.train.get("ema_decay", 0.9999)),
        ema_warmup=bool(config.train.get("ema_warmup", True)),
        hybrid_lambda=float(config.train.get("hybrid_lambda", 0.001))
        if config.model.get("learn_variance", False) else None,
        num_classes=int(config.model.get("num_classes", 0)),
        p_uncond=float(config.train.get("p_uncond", 0.1)),
        min_snr_gamma=float(config.train.get("min_snr_gamma", 5.0))
        if config.train.get("loss_weighting", "none") == "min_snr" else None,
    )


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def train_step(
    state: TrainState, batch: jnp.ndarray, schedule: DiffusionSchedule, labels: jnp.ndarray | None = None
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One optimizer step of L_simple (L_hybrid for a learned variance) on ``batch`` (``(B, H, W, C)`` float in [-1, 1]).

    A class-conditional network (``state.num_classes > 0``) needs the batch's ``labels``
    (int ``(B,)``, 0..num_classes-1); each is replaced by the null label with probability
    ``state.p_uncond`` (:func:`ddpm_jax.guidance.drop_labels`) before the network sees it.

    Returns the new state and metrics: ``loss`` (batch mean), ``grad_norm``,
    ``finite`` (False if either is NaN/Inf; the update is then dropped: see
    below), and per quarter of the timestep range ``loss_sum_by_quarter`` /
    ``count_by_quarter`` ``(4,)``, which the logger sums over steps before dividing.
    """
    chex.assert_rank(batch, 4)
    stream_key = lambda stream: jax.random.fold_in(jax.random.fold_in(state.key, stream), state.step)  # noqa: E731
    key, dropout_key = stream_key(_STEP_STREAM), stream_key(_DROPOUT_STREAM)
    model_kwargs = {}
    if state.num_classes:
        if labels is None:
            raise ValueError(f"this network is class-conditional (model.num_classes={state.num_classes}): "
                             "train_step needs the batch's labels.")
        chex.assert_shape(labels, (batch.shape[0],))
        model_kwargs["y"] = drop_labels(stream_key(_LABEL_STREAM), labels, state.p_uncond, state.num_classes)
    elif labels is not None:
        raise ValueError("labels were given for a network without classes (model.num_classes=0).")

    def loss_fn(params):
        def eps_fn(x_t, t):
            eps, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, x_t, t, train=True, mutable=["batch_stats"],
                rngs={"dropout": dropout_key}, **model_kwargs,
            )
            return eps, updates.get("batch_stats", {})  # GroupNorm networks have no statistics

        if state.hybrid_lambda is None:
            loss, per_image, t, batch_stats = l_simple(schedule, eps_fn, batch, key, state.min_snr_gamma)
        else:
            loss, per_image, t, batch_stats = l_hybrid(schedule, eps_fn, batch, key, state.hybrid_lambda)
        return loss, (per_image, t, batch_stats)

    (loss, (per_image, t, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    bucket = t * NUM_LOSS_BUCKETS // schedule.num_timesteps
    one_hot = jax.nn.one_hot(bucket, NUM_LOSS_BUCKETS, dtype=jnp.float32)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "finite": finite,
        "loss_sum_by_quarter": per_image @ one_hot,
        "count_by_quarter": jnp.sum(one_hot, axis=0),
    }
    updated = state.apply_gradients(grads, batch_stats)
    # A non-finite step advances only the step counter (so the next step draws the next batch):
    # weights, their average, BatchNorm statistics and Adam's moments stay those of the last good step. The
    # selects fuse into the update's elementwise loops, so this costs no extra pass over memory.
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    return updated.replace(
        params=jax.tree.map(keep, updated.params, state.params),
        ema_params=jax.tree.map(keep, updated.ema_params, state.ema_params),
        batch_stats=jax.tree.map(keep, updated.batch_stats, state.batch_stats),
        opt_state=jax.tree.map(keep, updated.opt_state, state.opt_state),
    ), metrics


def batch_indices(key: jax.Array, num_examples: int, step: jnp.ndarray, batch_size: int) -> jnp.ndarray:
    """Indices of the ``step``-th batch of an epoch-wise shuffled pass over ``num_examples`` items.

    Every epoch is a fresh permutation (``fold_in(key, epoch)``) cut into
    ``num_examples // batch_size`` full batches; the leftover items of that
    permutation are skipped, so every batch has the same shape and nothing
    recompiles. The batch depends only on ``(key, step)``: a resumed run sees
    the same data order.
    """
    epoch, position = divmod(step, steps_per_epoch(num_examples, batch_size))
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return jax.lax.dynamic_slice_in_dim(perm, position * batch_size, batch_size)


def make_dataset_train_step(
    config: ml_collections.ConfigDict, schedule: DiffusionSchedule, mesh: jax.sharding.Mesh | None = None
):
    """A jitted ``(state, images_u8[, labels]) -> (state, metrics)`` drawing its batch inside jit.

    ``images_u8`` is the whole training set as uint8 ``(N, h, w, 1)``, kept on
    the devices, and ``labels`` its int ``(N,)`` classes (class-conditional
    networks only); the old state is donated. Data parallel over ``mesh`` (default:
    every device, :func:`ddpm_jax.parallel.make_mesh`): state and images
    replicated, the batch split along the mesh's ``data`` axis; XLA all-reduces
    the gradients and BatchNorm's statistics, so the step computes what one
    device would. On one device this is the plain single-device step.
    """
    batch_size, image_size = config.train.batch_size, config.data.image_size
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_divisible(batch_size, mesh)
    everywhere, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def step(state: TrainState, images_u8: jnp.ndarray, labels: jnp.ndarray | None = None):
        indices = batch_indices(jax.random.fold_in(state.key, _DATA_STREAM), images_u8.shape[0], state.step,
                                batch_size)
        batch = jax.lax.with_sharding_constraint(preprocess(images_u8[indices], image_size), split)
        batch_labels = None if labels is None else jax.lax.with_sharding_constraint(labels[indices], split)
        return train_step(state, batch, schedule, batch_labels)

    # One sharding for every argument (the labels may be None): state and data replicated.
    return jax.jit(step, in_shardings=everywhere, out_shardings=(everywhere, everywhere), donate_argnums=0)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return num_examples // batch_size


class MetricLogger:
    """Sums step metrics on the host between log points and writes JSONL lines."""

    def __init__(self, path: str):
        self.path = path
        self._pending: list[dict] = []

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run rewrites what a killed one logged after its last checkpoint."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                break  # a line cut short by the kill, and anything after it
        with open(self.path, "w") as f:
            f.writelines(kept)

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)  # device arrays; fetched together at flush

    def flush(self, step: int, extra: dict) -> dict:
        fetched = jax.device_get(self._pending)
        self._pending = []
        good = [m for m in fetched if m["finite"]]  # skipped steps (train.on_nonfinite=skip) are counted, not averaged
        sums = np.sum([m["loss_sum_by_quarter"] for m in good], axis=0) if good else np.zeros(NUM_LOSS_BUCKETS)
        counts = np.sum([m["count_by_quarter"] for m in good], axis=0) if good else np.zeros(NUM_LOSS_BUCKETS)
        record = {
            "step": step,
            "loss": float(np.mean([m["loss"] for m in good])) if good else None,
            "grad_norm": float(np.mean([m["grad_norm"] for m in good])) if good else None,
            "skipped_steps": len(fetched) - len(good),
        }
        for q in range(NUM_LOSS_BUCKETS):
            record[f"loss_t_q{q}"] = float(sums[q] / counts[q]) if counts[q] else None
        record.update(extra)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record


NONFINITE_POLICIES = ("stop", "skip")
LOSS_WEIGHTINGS = ("none", "min_snr")


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is not allowed: {allowed}.")


def validate_config(config: ml_collections.ConfigDict, num_examples: int | None = None) -> None:
    """Check a config before any compute; raise ValueError naming the field, the value and what is allowed."""
    d, t, s = config.diffusion, config.train, config.sampling
    _require(isinstance(d.num_timesteps, int) and d.num_timesteps >= 1, "diffusion.num_timesteps", d.num_timesteps,
             "an integer T >= 1 (the report: 100, Ho et al.: 1000)")
    schedule_from_config(config)  # the schedule's name and betas, each checked there
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    if num_examples is not None:
        _require(t.batch_size <= num_examples, "train.batch_size", t.batch_size,
                 f"at most the {num_examples} training images")
    _require(t.num_steps >= 1, "train.num_steps", t.num_steps, "an integer >= 1")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "an integer >= 0")
    _require(t.grad_clip_norm >= 0, "train.grad_clip_norm", t.grad_clip_norm, "a norm > 0, or 0 for no clipping")
    for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _require(t[field] >= 1, f"train.{field}", t[field], "an integer >= 1")
    _require(t.on_nonfinite in NONFINITE_POLICIES, "train.on_nonfinite", t.on_nonfinite,
             " or ".join(NONFINITE_POLICIES))
    _require(t.max_consecutive_skips >= 0, "train.max_consecutive_skips", t.max_consecutive_skips, "an integer >= 0")
    _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay, "a decay in [0, 1) (Ho et al.: 0.9999)")
    make_optimizer(config)  # learning rate > 0 and a known lr_schedule
    _require(s.variance in VARIANCE_TYPES, "sampling.variance", s.variance, " or ".join(VARIANCE_TYPES))
    learned = bool(config.model.get("learn_variance", False))
    _require(learned or s.variance != "learned", "sampling.variance", s.variance,
             "beta or beta_tilde ('learned' needs a network that learns it: --set model.learn_variance=True)")
    _require(t.hybrid_lambda >= 0, "train.hybrid_lambda", t.hybrid_lambda, "a weight >= 0 (Nichol & Dhariwal: 0.001)")
    num_classes = config.model.get("num_classes", 0)
    _require(isinstance(num_classes, int) and num_classes >= 0, "model.num_classes", num_classes,
             "0 (an unconditional network) or the number of classes (MNIST: 10)")
    _require(0.0 <= t.p_uncond < 1.0, "train.p_uncond", t.p_uncond,
             "a probability in [0, 1) (Ho & Salimans: 0.1 or 0.2; 0 trains no unconditional prediction)")
    for field in ("guidance_scale", "classifier_scale"):
        _require(s[field] >= 0, f"sampling.{field}", s[field], "a scale >= 0 (0: no guidance)")
    _require(s.mean in MEAN_TYPES, "sampling.mean", s.mean, " or ".join(MEAN_TYPES))
    weighting = t.get("loss_weighting", "none")
    _require(weighting in LOSS_WEIGHTINGS, "train.loss_weighting", weighting, " or ".join(LOSS_WEIGHTINGS))
    gamma = t.get("min_snr_gamma", 5.0)
    _require(isinstance(gamma, (int, float)) and np.isfinite(gamma) and gamma > 0, "train.min_snr_gamma", gamma,
             "a finite gamma > 0 (Hang et al.: 5)")
    _require(learned is False or weighting == "none", "train.loss_weighting", weighting,
             "'none' for a learned-variance network (L_hybrid has its own weighting)")
    batchnorm = s.get("batchnorm", "running")
    _require(batchnorm in BATCHNORM_MODES, "sampling.batchnorm", batchnorm, " or ".join(BATCHNORM_MODES))
    unconditional = s.get("unconditional", "null")
    _require(unconditional in UNCONDITIONAL_MODES, "sampling.unconditional", unconditional,
             " or ".join(UNCONDITIONAL_MODES))
    _require(s.batch_size >= 1, "sampling.batch_size", s.batch_size, "an integer >= 1")
    _require(config.data.max_train_examples >= 0, "data.max_train_examples", config.data.max_train_examples,
             "0 (all images) or a positive count")
    levels = config.model.levels
    _require(isinstance(levels, int) and levels >= 1, "model.levels", levels, "an integer >= 1")
    if config.model.name == "ddpm_unet":
        mult = tuple(config.model.channel_mult)
        _require(len(mult) == levels + 1, "model.channel_mult", mult,
                 f"one multiplier per resolution, model.levels + 1 = {levels + 1} of them")
        _require(0.0 <= config.model.dropout < 1.0, "model.dropout", config.model.dropout, "a rate in [0, 1)")
    _require(config.model.base_channels >= 1, "model.base_channels", config.model.base_channels, "an integer >= 1")
    size, factor = config.data.image_size, 2**levels
    if size < 28 or size % factor:
        raise ValueError(
            f"data.image_size={size} must be >= 28 and divisible by 2**model.levels={factor} "
            f"(model.levels={levels}); e.g. 28 for levels <= 2, 32 for levels 3-5."
        )
    build_model(config.model)


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or Inf loss or gradient (``step``: the update that would have produced that step)."""

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint: int | None, consecutive: int = 1):
        self.step, self.last_checkpoint = step, last_checkpoint
        kept = (f"the latest checkpoint (step {last_checkpoint}) is untouched. To continue from it, rerun with a "
                "lower --lr (the same command meets the same batch again)" if last_checkpoint is not None
                else "no checkpoint had been saved yet. Rerun with a lower --lr")
        streak = f" ({consecutive} bad steps in a row)" if consecutive > 1 else ""
        super().__init__(
            f"non-finite training step {step}{streak}: loss {loss}, gradient norm {grad_norm}. Training stopped "
            f"without applying it; {kept}, or with --set train.on_nonfinite=skip to skip such batches."
        )


class NonFiniteGuard:
    """Watches each step's ``finite`` metric one step behind the loop, so the host never waits on the device
    except at log and checkpoint points (:meth:`drain`). ``'stop'``: raise :class:`NonFiniteLossError` at the
    first bad step; ``'skip'``: report it and go on (the step already dropped its update), until more than
    ``max_consecutive`` bad steps in a row."""

    def __init__(self, policy: str, max_consecutive: int, manager=None):
        self.policy, self.max_consecutive, self.manager = policy, max_consecutive, manager
        self._pending: list[tuple[int, dict]] = []
        self.consecutive = 0

    def push(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))
        while len(self._pending) > 1:
            self._check(*self._pending.pop(0))

    def drain(self) -> None:
        while self._pending:
            self._check(*self._pending.pop(0))

    def _check(self, step: int, metrics: dict) -> None:
        if bool(metrics["finite"]):
            self.consecutive = 0
            return
        self.consecutive += 1
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if self.policy == "skip" and self.consecutive <= self.max_consecutive:
            print(f"step {step}: loss {loss}, gradient norm {grad_norm}: batch skipped, weights unchanged "
                  f"(train.on_nonfinite=skip; {self.consecutive} in a row)", flush=True)
            return
        self._pending.clear()
        raise NonFiniteLossError(step, loss, grad_norm, self.manager.latest_step() if self.manager else None,
                                 self.consecutive)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM reached the training loop, which saved a checkpoint at ``step`` and stopped."""

    def __init__(self, signum: int, step: int, checkpoint_dir: str):
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
                         f"{checkpoint_dir}. Rerun the same command to resume.")


class StopSignals:
    """Within ``with``, SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) set ``signum`` instead of
    killing the process, so the loop can finish its step and save first. Outside the main thread (where
    Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping", flush=True)
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    data_dir: str | None = None,
    idx_dir: str | None = None,
    progress: bool = True,
    make_figures: bool = True,
    stop_at: int | None = None,
) -> TrainState:
    """Train (or resume) a run in ``workdir`` and write its figures.

    Args:
      config: a config from :func:`ddpm_jax.configs.get_config`, possibly overridden.
      workdir: run directory; holds ``checkpoints/``, ``config.json``,
        ``metrics.jsonl``, ``samples.png`` and ``reverse_process.png``. A run
        already there resumes from its latest checkpoint.
      images: the training images as uint8 ``(N, 28, 28, 1)``; if None, MNIST's
        train split is loaded from ``idx_dir`` (IDX files) or TFDS (``data_dir``).
      labels: their int ``(N,)`` classes, needed with ``images`` for a class-conditional
        network (``model.num_classes > 0``); loaded with the images when those are.

    Returns:
      The final train state.
    """
    workdir = os.path.abspath(workdir)
    if images is None:
        images, labels = data_lib.load_mnist("train", data_dir=data_dir, idx_dir=idx_dir)
    num_classes = int(config.model.get("num_classes", 0))
    labels = _training_labels(labels, len(images), num_classes)
    if config.data.max_train_examples:
        images = images[: config.data.max_train_examples]
        labels = None if labels is None else labels[: config.data.max_train_examples]
    validate_config(config, num_examples=len(images))
    config = ml_collections.ConfigDict(config.to_dict())  # the caller's config is left as it was
    # A conditional run is also refused on relabelled data; an unconditional one keeps its old fingerprint.
    config.data.fingerprint = data_lib.fingerprint(images, *(() if labels is None else (labels,)))
    if labels is not None:  # sample() draws labels from these when given none (sampling.unconditional)
        counts = np.bincount(labels, minlength=num_classes)
        config.data.label_frequencies = tuple(round(float(c), 6) for c in counts / counts.sum())
    mesh = parallel.make_mesh()
    parallel.check_divisible(config.train.batch_size, mesh)
    os.makedirs(workdir, exist_ok=True)

    schedule = schedule_from_config(config)
    manager = ckpt_lib.make_manager(workdir, config)
    state = create_train_state(config)
    restored = ckpt_lib.restore_latest(manager, state, config)
    # Several processes: each runs this same loop over the global mesh; process 0 alone writes files and logs.
    is_main = jax.process_index() == 0
    progress = progress and is_main
    logger = MetricLogger(os.path.join(workdir, "metrics.jsonl"))
    if is_main:  # lines a killed run logged after its last checkpoint are written again
        logger.truncate_after(int(restored.step) if restored is not None else 0)
    if restored is not None:
        state = restored
        print(f"resuming from step {int(state.step)} in {workdir}", flush=True)
    else:
        print(
            f"model {config.model.name}: {count_params(state.params):,} parameters; "
            f"{len(images):,} training images, {steps_per_epoch(len(images), config.train.batch_size):,} steps per epoch",
            flush=True,
        )
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(configs_lib.config_to_json(config))

    step_fn = make_dataset_train_step(config, schedule, mesh)
    lr_at = learning_rate_schedule(config)
    if parallel.num_shards(mesh) > 1:
        print(f"data parallel over {parallel.num_shards(mesh)} devices "
              f"({config.train.batch_size // parallel.num_shards(mesh)} images each per step)", flush=True)
    state = parallel.put_replicated(state, mesh)
    device_images = parallel.put_replicated(np.asarray(images, dtype=np.uint8), mesh)
    device_labels = None if labels is None else parallel.put_replicated(labels, mesh)
    start, total = int(state.step), config.train.num_steps
    end = total if stop_at is None else min(stop_at, total)
    batch_size = config.train.batch_size
    guard = NonFiniteGuard(config.train.on_nonfinite, config.train.max_consecutive_skips, manager)

    bar = None
    if progress and start < end:
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1)
    last_time, last_step = time.perf_counter(), start
    compile_seconds = None
    try:
        with StopSignals() as stop:
            for step in range(start, end):
                state, metrics = step_fn(state, device_images, device_labels)
                done = step + 1
                guard.push(done, metrics)  # checks the step before this one, which has finished by now
                if is_main:
                    logger.add(metrics)
                if compile_seconds is None:
                    jax.block_until_ready(metrics["loss"])
                    compile_seconds = time.perf_counter() - last_time
                    last_time, last_step = time.perf_counter(), done
                if is_main and (done % config.train.log_every == 0 or done == end):
                    guard.drain()
                    now = time.perf_counter()
                    rate = (done - last_step) * batch_size / max(now - last_time, 1e-9) if done > last_step else None
                    record = logger.flush(
                        done,
                        {
                            "epoch": done / steps_per_epoch(len(images), batch_size),
                            "learning_rate": float(lr_at(done - 1)),  # the rate the last step used
                            "images_per_s": rate,
                            "first_step_seconds": compile_seconds if last_step == start + 1 else None,
                        },
                    )
                    last_time, last_step = now, done
                    if bar is not None and record["loss"] is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.0f}" if rate else "-")
                if done % config.train.checkpoint_every == 0 or done == end or stop.signum is not None:
                    guard.drain()  # nothing is saved after a non-finite step unless it was skipped
                    ckpt_lib.save(manager, state, config)
                if bar is not None:
                    bar.update(1)
                if stop.signum is not None:
                    manager.wait_until_finished()
                    raise TrainingInterrupted(stop.signum, done, ckpt_lib.step_directory(manager, done))
    finally:
        if bar is not None:
            bar.close()
        manager.wait_until_finished()  # a save already under way completes: the latest checkpoint stays whole
        manager.close()

    if make_figures and end == total and is_main:
        write_figures(DiffusionCheckpoint.from_train_state(state, config), workdir, progress=progress)
    return state


def _training_labels(labels, num_images: int, num_classes: int) -> np.ndarray | None:
    """The labels a class-conditional run trains with, checked (None for an unconditional run)."""
    if not num_classes:
        return None
    if labels is None:
        raise ValueError(f"model.num_classes={num_classes}: a class-conditional network needs the images' labels; "
                         "pass labels= with images= (or load MNIST with idx_dir / data_dir, which reads both).")
    labels = np.asarray(labels)
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({num_images},), one per image; got {labels.dtype} "
                         f"of shape {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (model.num_classes={num_classes}); found "
                         f"{int(labels.min())}..{int(labels.max())}.")
    return labels.astype(np.int32)


def write_figures(checkpoint, workdir: str, progress: bool = False) -> dict:
    """Write ``samples.png`` (the report's Figure 4), ``reverse_process.png`` (its Figure 5)
    and ``sampling.json`` (how long the grid took) into ``workdir``; for a class-conditional
    network also ``samples_by_class.png``, one row per class.

    ``checkpoint`` is a :class:`ddpm_jax.DiffusionCheckpoint`; the samples use
    the key ``PRNGKey(config.seed + 1)``, so the figures are reproducible. They
    use the checkpoint's EMA weights; ``samples_raw.png`` is the same grid (same
    noise) from the last step's raw weights, to show what the average buys.
    """
    config = checkpoint.config
    grid_key, strip_key = jax.random.split(jax.random.PRNGKey(config.seed + 1))
    n_grid = config.sampling.grid_size**2
    t0 = time.perf_counter()
    grid = np.asarray(sample(checkpoint, grid_key, n_grid, progress=progress))
    seconds = time.perf_counter() - t0
    plotting.save_grid(grid, os.path.join(workdir, "samples.png"), nrow=config.sampling.grid_size)
    if checkpoint.weights_used == "ema":
        raw = np.asarray(sample(checkpoint, grid_key, n_grid, weights="raw"))
        plotting.save_grid(raw, os.path.join(workdir, "samples_raw.png"), nrow=config.sampling.grid_size)
    _, frames = sample(checkpoint, strip_key, config.sampling.strip_samples, return_every=config.sampling.strip_every)
    plotting.save_reverse_process(
        np.asarray(frames),
        os.path.join(workdir, "reverse_process.png"),
        num_timesteps=config.diffusion.num_timesteps,
        every=config.sampling.strip_every,
    )
    info = {"num_samples": n_grid, "seconds_including_compile": seconds, "step": checkpoint.step,
            "weights": checkpoint.weights_used}
    with open(os.path.join(workdir, "sampling.json"), "w") as f:
        json.dump(info, f, indent=2)
    num_classes = int(config.model.get("num_classes", 0))
    if num_classes:  # one row per class, chosen rather than cherry-picked, at the config's guidance scale
        digits = np.repeat(np.arange(num_classes), config.sampling.grid_size)
        by_class = np.asarray(sample(checkpoint, grid_key, len(digits), labels=digits))
        plotting.save_grid(by_class, os.path.join(workdir, "samples_by_class.png"), nrow=config.sampling.grid_size)
        info["guidance_scale"] = float(config.sampling.guidance_scale)
    also = " (EMA weights; samples_raw.png: the raw weights)" if checkpoint.weights_used == "ema" else ""
    if num_classes:
        drawn = ("labels drawn at the training label frequencies" if config.sampling.get("unconditional", "null")
                 == "label_prior" else "unconditional: the null label")
        also += (f"; samples.png: {drawn}; samples_by_class.png: one row per class "
                 f"(classifier-free guidance w={config.sampling.guidance_scale:g})")
    print(f"wrote {workdir}/samples.png and reverse_process.png{also} ({n_grid} samples in {seconds:.1f} s)",
          flush=True)
    return info
