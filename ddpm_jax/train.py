"""Training machinery: the train state, the jitted step, and the training loop.

The step functions are pure (``(state, batch) -> (state, metrics)``) and
jitted once; ``train_and_evaluate(config, workdir)`` is the loop that the
``experiments.mnist`` entry point calls, importable from a notebook as well.
"""

from __future__ import annotations

import contextlib
import functools
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
from ddpm_jax.api import (
    BATCHNORM_MODES,
    UNCONDITIONAL_MODES,
    DiffusionCheckpoint,
    available_memory_bytes,
    sample,
)
from ddpm_jax.configs import schedule_from_config
from ddpm_jax.data import crop, preprocess  # noqa: F401  (crop: re-exported for notebooks)
from ddpm_jax.diffusion import MEAN_TYPES, VARIANCE_TYPES
from ddpm_jax.guidance import drop_labels
from ddpm_jax.losses import l_hybrid, l_simple
from ddpm_jax.models import MODEL_NAMES, build_model
from ddpm_jax.progress import progress_bar
from ddpm_jax.schedules import DiffusionSchedule
from ddpm_jax.workdir import WorkdirLock, prepare_workdir

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
    if not _is_number(t.learning_rate, 0.0, lo_open=True):
        raise ValueError(f"train.learning_rate must be a finite number > 0, got {t.learning_rate}.")
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


def state_is_finite(state: TrainState) -> jnp.ndarray:
    """True (a bool scalar) if every float array of the state (weights, EMA, statistics, Adam moments) is finite."""
    leaves = [x for x in jax.tree.leaves((state.params, state.ema_params, state.batch_stats, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def _loss(state: TrainState, batch, schedule, model_kwargs, key, dropout_key, params):
    """The training loss of ``params`` on ``batch`` with the step's keys: ``(loss, (per_image, t, batch_stats))``."""
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


def _step_inputs(state: TrainState, labels):
    """The keys and network arguments of the step ``state.step`` (one definition for the step and its probe)."""
    stream_key = lambda stream: jax.random.fold_in(jax.random.fold_in(state.key, stream), state.step)  # noqa: E731
    key, dropout_key = stream_key(_STEP_STREAM), stream_key(_DROPOUT_STREAM)
    model_kwargs = {}
    if state.num_classes:
        if labels is None:
            raise ValueError(f"this network is class-conditional (model.num_classes={state.num_classes}): "
                             "train_step needs the batch's labels.")
        model_kwargs["y"] = drop_labels(stream_key(_LABEL_STREAM), labels, state.p_uncond, state.num_classes)
    elif labels is not None:
        raise ValueError("labels were given for a network without classes (model.num_classes=0).")
    return key, dropout_key, model_kwargs


def probe_loss(state: TrainState, batch: jnp.ndarray, schedule: DiffusionSchedule, labels=None) -> dict:
    """The loss the next :func:`train_step` on ``batch`` would report, without taking the step.

    What a checkpoint is judged by before it is saved: ``loss`` and ``state_finite``
    (:func:`state_is_finite`). Same keys, same batch, same BatchNorm mode as the step.
    """
    chex.assert_rank(batch, 4)
    if labels is not None:
        chex.assert_shape(labels, (batch.shape[0],))
    key, dropout_key, model_kwargs = _step_inputs(state, labels)
    loss, _ = _loss(state, batch, schedule, model_kwargs, key, dropout_key, state.params)
    return {"loss": loss, "state_finite": state_is_finite(state)}


def train_step(
    state: TrainState, batch: jnp.ndarray, schedule: DiffusionSchedule, labels: jnp.ndarray | None = None
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One optimizer step of L_simple (L_hybrid for a learned variance) on ``batch`` (``(B, H, W, C)`` float in [-1, 1]).

    A class-conditional network (``state.num_classes > 0``) needs the batch's ``labels``
    (int ``(B,)``, 0..num_classes-1); each is replaced by the null label with probability
    ``state.p_uncond`` (:func:`ddpm_jax.guidance.drop_labels`) before the network sees it.

    Returns the new state and metrics: ``loss`` (batch mean), ``grad_norm``,
    ``finite`` (False if either is NaN/Inf, or if the update would leave a NaN/Inf
    in the weights, their average, BatchNorm statistics or Adam's moments; the
    update is then dropped: see below), and per quarter of the timestep range ``loss_sum_by_quarter`` /
    ``count_by_quarter`` ``(4,)``, which the logger sums over steps before dividing.
    """
    chex.assert_rank(batch, 4)
    if labels is not None:
        chex.assert_shape(labels, (batch.shape[0],))
    key, dropout_key, model_kwargs = _step_inputs(state, labels)
    loss_fn = functools.partial(_loss, state, batch, schedule, model_kwargs, key, dropout_key)
    (loss, (per_image, t, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    bucket = t * NUM_LOSS_BUCKETS // schedule.num_timesteps
    one_hot = jax.nn.one_hot(bucket, NUM_LOSS_BUCKETS, dtype=jnp.float32)
    updated = state.apply_gradients(grads, batch_stats)
    # The update itself is judged, not only what it was computed from: a finite loss and gradient can still
    # make non-finite weights or Adam moments (a NaN or overflowing learning rate, a moment that overflows).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & state_is_finite(updated)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "finite": finite,
        "loss_sum_by_quarter": per_image @ one_hot,
        "count_by_quarter": jnp.sum(one_hot, axis=0),
    }
    # A non-finite step advances only the step counter (so the next step draws the next batch):
    # weights, their average, BatchNorm statistics and Adam's moments stay those of the last good step.
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
    mesh = parallel.make_mesh() if mesh is None else mesh
    everywhere, draw = _dataset_batches(config, mesh)

    def step(state: TrainState, images_u8: jnp.ndarray, labels: jnp.ndarray | None = None):
        batch, batch_labels = draw(state, images_u8, labels)
        return train_step(state, batch, schedule, batch_labels)

    # One sharding for every argument (the labels may be None): state and data replicated.
    return jax.jit(step, in_shardings=everywhere, out_shardings=(everywhere, everywhere), donate_argnums=0)


def make_dataset_probe(
    config: ml_collections.ConfigDict, schedule: DiffusionSchedule, mesh: jax.sharding.Mesh | None = None
):
    """A jitted ``(state, images_u8[, labels]) -> {loss, state_finite}``: :func:`probe_loss` on the batch
    the next step of :func:`make_dataset_train_step` would draw. The state is not donated (it is then saved)."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    everywhere, draw = _dataset_batches(config, mesh)

    def probe(state: TrainState, images_u8: jnp.ndarray, labels: jnp.ndarray | None = None):
        batch, batch_labels = draw(state, images_u8, labels)
        return probe_loss(state, batch, schedule, batch_labels)

    return jax.jit(probe, in_shardings=everywhere, out_shardings=everywhere)


def _dataset_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """``(replicated sharding, draw)``: ``draw(state, images_u8, labels)`` is the ``state.step``-th batch
    (float images in [-1, 1], and labels or None), split along the mesh's data axis."""
    batch_size, image_size = config.train.batch_size, config.data.image_size
    parallel.check_divisible(batch_size, mesh)
    everywhere, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def draw(state: TrainState, images_u8: jnp.ndarray, labels: jnp.ndarray | None):
        indices = batch_indices(jax.random.fold_in(state.key, _DATA_STREAM), images_u8.shape[0], state.step,
                                batch_size)
        batch = jax.lax.with_sharding_constraint(preprocess(images_u8[indices], image_size), split)
        batch_labels = None if labels is None else jax.lax.with_sharding_constraint(labels[indices], split)
        return batch, batch_labels

    return everywhere, draw


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return num_examples // batch_size


class MetricLogger:
    """Sums step metrics on the host between log points and writes JSONL lines."""

    def __init__(self, path: str):
        self.path = path
        self._pending: list[dict] = []

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run rewrites what a killed one logged after its last checkpoint.

        Every record of a step up to ``step`` is kept, wherever it stands in the file. A line that is
        not a record (cut short by a kill, blank, edited by hand) is never deleted: it is moved to
        ``metrics.jsonl.unreadable`` beside the log, with a line saying so.
        """
        if not os.path.exists(self.path):
            return
        with open(self.path, errors="replace") as f:
            lines = f.readlines()
        kept, unreadable = [], []
        for line in lines:
            if not line.strip():
                continue  # a blank line holds nothing to keep
            try:
                record_step = json.loads(line)["step"]
                if isinstance(record_step, bool) or not isinstance(record_step, (int, float)):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                unreadable.append(line if line.endswith("\n") else line + "\n")
                continue
            if record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if unreadable:
            side = self.path + ".unreadable"
            with open(side, "a") as f:
                f.writelines(unreadable)
            print(f"moved {len(unreadable)} unreadable line(s) of {self.path} to {side}", flush=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)  # a kill during the rewrite leaves the old log, not half of it

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


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is not allowed: {allowed}.")


def _is_int(v, lo: int | None = None, hi: int | None = None) -> bool:
    return (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
            and (lo is None or v >= lo) and (hi is None or v <= hi))


def _is_number(v, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
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
    _require(_is_int(config.seed, 0, MAX_SEED), "seed", config.seed, f"an integer in 0..{MAX_SEED}")
    _require(config.preset in configs_lib.PRESETS, "preset", config.preset, " or ".join(configs_lib.PRESETS))
    _require(config.get("dataset", "mnist") == "mnist", "dataset", config.get("dataset"), "'mnist'")
    _require(_is_int(d.num_timesteps, 1, MAX_TIMESTEPS), "diffusion.num_timesteps", d.num_timesteps,
             f"an integer T in 1..{MAX_TIMESTEPS:,} (the report: 100, Ho et al.: 1000)")
    for field in ("beta_start", "beta_end", "cosine_s", "max_beta"):
        _require(_is_number(d[field]), f"diffusion.{field}", d[field], "a finite number")
    _require(d.cosine_s >= 0, "diffusion.cosine_s", d.cosine_s, "an offset >= 0 (Nichol & Dhariwal: 0.008)")
    try:
        schedule_from_config(config)  # the schedule's name and betas, each checked there
    except ValueError as e:  # named by the fields that made the betas, which the schedule module does not know
        made_by = ("beta_start", "beta_end") if d.schedule == "linear" else ("cosine_s", "max_beta")
        raise ValueError(f"{str(e).rstrip('.')} (diffusion.schedule={d.schedule!r}, "
                         + ", ".join(f"diffusion.{f}={d[f]!r}" for f in made_by) + ").") from None

    _require(m.name in MODEL_NAMES, "model.name", m.name, " or ".join(MODEL_NAMES))
    _require(_is_int(m.base_channels, 1, 4096), "model.base_channels", m.base_channels, "an integer in 1..4096")
    _require(_is_int(m.levels, 1, 10), "model.levels", m.levels, "an integer in 1..10")
    _require(_is_int(m.time_embed_dim, 2, 8192) and m.time_embed_dim % 2 == 0, "model.time_embed_dim",
             m.time_embed_dim, "an even integer in 2..8192 (the report: 32)")
    _require(m.output_head in ("block", "conv"), "model.output_head", m.output_head, "'block' or 'conv'")
    _require(isinstance(m.learn_variance, bool), "model.learn_variance", m.learn_variance, "True or False")
    num_classes = m.get("num_classes", 0)
    _require(_is_int(num_classes, 0, 100_000), "model.num_classes", num_classes,
             "0 (an unconditional network) or the number of classes (MNIST: 10)")
    _require(_is_number(m.dropout, 0.0, 1.0, hi_open=True), "model.dropout", m.dropout, "a rate in [0, 1)")
    if m.name == "ddpm_unet":
        mult = tuple(m.channel_mult)
        _require(all(_is_int(k, 1, 64) for k in mult), "model.channel_mult", mult, "integers in 1..64")
        _require(len(mult) == m.levels + 1, "model.channel_mult", mult,
                 f"one multiplier per resolution, model.levels + 1 = {m.levels + 1} of them")
        _require(_is_int(m.num_res_blocks, 1, 16), "model.num_res_blocks", m.num_res_blocks, "an integer in 1..16")
        _require(all(_is_int(r, 1) for r in m.attention_resolutions), "model.attention_resolutions",
                 m.attention_resolutions, "feature-map heights, integers >= 1 (e.g. (7,) or (16, 8))")
        widths = sorted({m.base_channels * k for k in mult})
        _require(_is_int(m.norm_groups, 1) and all(w % m.norm_groups == 0 for w in widths), "model.norm_groups",
                 m.norm_groups, f"an integer >= 1 dividing every block's width {widths}")
        _require(_is_int(m.num_heads, 1) and all(w % m.num_heads == 0 for w in widths), "model.num_heads",
                 m.num_heads, f"an integer >= 1 dividing every block's width {widths}")

    size, factor = config.data.image_size, 2 ** m.levels
    _require(_is_int(size, 28, 1024), "data.image_size", size, "an integer in 28..1024")
    if size % factor:
        raise ValueError(
            f"data.image_size={size} must be >= 28 and divisible by 2**model.levels={factor} "
            f"(model.levels={m.levels}); e.g. 28 for levels <= 2, 32 for levels 3-5."
        )
    _require(_is_int(config.data.max_train_examples, 0), "data.max_train_examples", config.data.max_train_examples,
             "0 (all images) or a positive count")
    _require(isinstance(config.data.fingerprint, str), "data.fingerprint", config.data.fingerprint,
             "a string (written by training)")
    frequencies = tuple(config.data.get("label_frequencies", ()))
    _require(not frequencies or (len(frequencies) == num_classes and all(_is_number(f, 0.0) for f in frequencies)
                                 and sum(frequencies) > 0), "data.label_frequencies", frequencies,
             f"empty, or {num_classes} shares >= 0, one per class (written by training)")

    _require(_is_int(t.batch_size, 1, 1_000_000), "train.batch_size", t.batch_size, "an integer >= 1")
    if num_examples is not None:
        _require(t.batch_size <= num_examples, "train.batch_size", t.batch_size,
                 f"at most the {num_examples} training images")
    _require(_is_int(t.num_steps, 1, MAX_STEPS), "train.num_steps", t.num_steps, f"an integer in 1..{MAX_STEPS}")
    _require(_is_number(t.learning_rate, 0.0, lo_open=True), "train.learning_rate", t.learning_rate,
             "a finite number > 0 (the cpu preset: 2e-3)")
    _require(_is_int(t.warmup_steps, 0, MAX_STEPS), "train.warmup_steps", t.warmup_steps, "an integer >= 0")
    _require(_is_number(t.grad_clip_norm, 0.0), "train.grad_clip_norm", t.grad_clip_norm,
             "a finite norm > 0, or 0 for no clipping")
    for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _require(_is_int(t[field], 1), f"train.{field}", t[field], "an integer >= 1")
    _require(t.on_nonfinite in NONFINITE_POLICIES, "train.on_nonfinite", t.on_nonfinite,
             " or ".join(NONFINITE_POLICIES))
    _require(_is_int(t.max_consecutive_skips, 0), "train.max_consecutive_skips", t.max_consecutive_skips,
             "an integer >= 0")
    factor = t.get("divergence_factor", 0.0)
    _require(_is_number(factor, 0.0) and (factor == 0 or factor > 1), "train.divergence_factor", factor,
             "0 (no divergence check) or a finite factor > 1 (default 10)")
    _require(_is_int(t.get("divergence_window", 200), 1), "train.divergence_window", t.get("divergence_window"),
             "an integer >= 1 (steps in the running median)")
    _require(_is_number(t.ema_decay, 0.0, 1.0, hi_open=True), "train.ema_decay", t.ema_decay,
             "a decay in [0, 1) (Ho et al.: 0.9999)")
    _require(isinstance(t.ema_warmup, bool), "train.ema_warmup", t.ema_warmup, "True or False")
    make_optimizer(config)  # a known lr_schedule
    _require(s.variance in VARIANCE_TYPES, "sampling.variance", s.variance, " or ".join(VARIANCE_TYPES))
    learned = bool(m.get("learn_variance", False))
    _require(learned or s.variance != "learned", "sampling.variance", s.variance,
             "beta or beta_tilde ('learned' needs a network that learns it: --set model.learn_variance=True)")
    _require(_is_number(t.hybrid_lambda, 0.0), "train.hybrid_lambda", t.hybrid_lambda,
             "a finite weight >= 0 (Nichol & Dhariwal: 0.001)")
    _require(_is_number(t.p_uncond, 0.0, 1.0, hi_open=True), "train.p_uncond", t.p_uncond,
             "a probability in [0, 1) (Ho & Salimans: 0.1 or 0.2; 0 trains no unconditional prediction)")
    for field in ("guidance_scale", "classifier_scale"):
        _require(_is_number(s[field], 0.0), f"sampling.{field}", s[field], "a finite scale >= 0 (0: no guidance)")
    _require(s.mean in MEAN_TYPES, "sampling.mean", s.mean, " or ".join(MEAN_TYPES))
    weighting = t.get("loss_weighting", "none")
    _require(weighting in LOSS_WEIGHTINGS, "train.loss_weighting", weighting, " or ".join(LOSS_WEIGHTINGS))
    gamma = t.get("min_snr_gamma", 5.0)
    _require(_is_number(gamma, 0.0, lo_open=True), "train.min_snr_gamma", gamma, "a finite gamma > 0 (Hang et al.: 5)")
    _require(learned is False or weighting == "none", "train.loss_weighting", weighting,
             "'none' for a learned-variance network (L_hybrid has its own weighting)")
    batchnorm = s.get("batchnorm", "running")
    _require(batchnorm in BATCHNORM_MODES, "sampling.batchnorm", batchnorm, " or ".join(BATCHNORM_MODES))
    unconditional = s.get("unconditional", "null")
    _require(unconditional in UNCONDITIONAL_MODES, "sampling.unconditional", unconditional,
             " or ".join(UNCONDITIONAL_MODES))
    _require(_is_int(s.batch_size, 1, 100_000), "sampling.batch_size", s.batch_size, "an integer in 1..100000")
    _require(_is_int(s.grid_size, 1, 100), "sampling.grid_size", s.grid_size, "an integer in 1..100")
    _require(_is_int(s.strip_samples, 1, 100), "sampling.strip_samples", s.strip_samples, "an integer in 1..100")
    _require(_is_int(s.strip_every, 1, d.num_timesteps), "sampling.strip_every", s.strip_every,
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


def _last_good(last_checkpoint: int | None, last_loss: float | None) -> str:
    if last_checkpoint is None:
        return "no checkpoint had been saved yet. Rerun with a lower --lr"
    loss = f", loss {last_loss:.4g} when saved" if last_loss is not None else ""
    return (f"the latest checkpoint (step {last_checkpoint}{loss}) is known good and untouched. To continue from "
            "it, rerun with a lower --lr (the same command meets the same batch again)")


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or Inf loss or gradient, or an update that would leave a NaN or Inf in the state
    (``step``: the update that would have produced that step). Nothing after it was saved."""

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint: int | None, consecutive: int = 1,
                 last_loss: float | None = None):
        self.step, self.last_checkpoint = step, last_checkpoint
        streak = f" ({consecutive} bad steps in a row)" if consecutive > 1 else ""
        super().__init__(
            f"non-finite training step {step}{streak}: loss {loss}, gradient norm {grad_norm} (or the update made a "
            f"weight or Adam moment NaN/Inf). Training stopped without applying it; "
            f"{_last_good(last_checkpoint, last_loss)}, or with --set train.on_nonfinite=skip to skip such batches."
        )


class TrainingDivergedError(RuntimeError):
    """A loss many times the running median of recent losses (``train.divergence_factor``): the weights
    that produced it are not saved, and training stops."""

    def __init__(self, step: int, loss: float, median: float, factor: float, window: int,
                 last_checkpoint: int | None, last_loss: float | None = None, at_checkpoint: bool = False):
        self.step, self.last_checkpoint = step, last_checkpoint
        where = (f"the weights of step {step}, about to be saved, give loss {loss:.4g} on the next batch"
                 if at_checkpoint else f"training step {step} has loss {loss:.4g}")
        super().__init__(
            f"training diverged: {where}, more than train.divergence_factor={factor:g} times the median "
            f"{median:.4g} of the last {window} training losses. Training stopped without saving them; "
            f"{_last_good(last_checkpoint, last_loss)}, or turn this check off with "
            "--set train.divergence_factor=0."
        )


class NonFiniteGuard:
    """Judges each step one step behind the loop, so the host never waits on the device except at log and
    checkpoint points (:meth:`drain`), and judges each state before it is saved (:meth:`judge_checkpoint`).

    A non-finite step (``finite`` metric False): ``'stop'`` raises :class:`NonFiniteLossError` at the first;
    ``'skip'`` reports it and goes on (the step already dropped its update), until more than
    ``max_consecutive`` bad steps in a row. A finite loss more than ``divergence_factor`` times the median of
    the last ``divergence_window`` good losses raises :class:`TrainingDivergedError` (the update is already
    applied, so there is nothing to skip); ``divergence_factor=0`` turns that rule off.
    """

    def __init__(self, policy: str, max_consecutive: int, manager=None, divergence_factor: float = 0.0,
                 divergence_window: int = 200):
        self.policy, self.max_consecutive, self.manager = policy, max_consecutive, manager
        self.divergence_factor, self.divergence_window = divergence_factor, divergence_window
        self._pending: list[tuple[int, dict]] = []
        self._recent: list[float] = []
        self.consecutive = 0

    def push(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))
        while len(self._pending) > 1:
            self._check(*self._pending.pop(0))

    def drain(self) -> None:
        while self._pending:
            self._check(*self._pending.pop(0))

    def _last(self) -> tuple[int | None, float | None]:
        if self.manager is None:
            return None, None
        self.manager.wait_until_finished()  # a save under way is the last good checkpoint once it is whole
        if jax.process_index() == 0:
            ckpt_lib.finish_manifests(self.manager.directory)
        step = self.manager.latest_step()
        return step, ckpt_lib.checkpoint_loss(self.manager, step)

    def _diverged(self, loss: float) -> float | None:
        """The running median ``loss`` exceeds ``divergence_factor`` times, or None."""
        if not self.divergence_factor or not self._recent:
            return None
        median = float(np.median(self._recent))
        return median if loss > self.divergence_factor * median else None

    def _check(self, step: int, metrics: dict) -> None:
        if bool(metrics["finite"]):
            self.consecutive = 0
            loss = float(metrics["loss"])
            median = self._diverged(loss)
            if median is not None:
                self._pending.clear()
                raise TrainingDivergedError(step, loss, median, self.divergence_factor, len(self._recent),
                                            *self._last())
            self._recent = (self._recent + [loss])[-self.divergence_window:]
            return
        self.consecutive += 1
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if self.policy == "skip" and self.consecutive <= self.max_consecutive:
            print(f"step {step}: loss {loss}, gradient norm {grad_norm}: batch skipped, weights unchanged "
                  f"(train.on_nonfinite=skip; {self.consecutive} in a row)", flush=True)
            return
        self._pending.clear()
        last_checkpoint, last_loss = self._last()
        raise NonFiniteLossError(step, loss, grad_norm, last_checkpoint, self.consecutive, last_loss)

    def judge_checkpoint(self, step: int, probe: dict) -> tuple[bool, float | None]:
        """Whether the state of ``step`` may be saved, and its loss on the next batch (``probe``, from
        :func:`probe_loss`). Raises unless every array is finite and that loss is finite and not diverged;
        under ``'skip'`` a non-finite loss (finite weights, a batch or weights that give NaN) only withholds
        this save."""
        self.drain()
        loss = float(probe["loss"])
        if not bool(probe["state_finite"]) or (not np.isfinite(loss) and self.policy == "stop"):
            # Asked only when failing: _last() waits for the save under way and writes its manifest.
            last_checkpoint, last_loss = self._last()
            raise NonFiniteLossError(step + 1, loss, float("nan"), last_checkpoint, 1, last_loss)
        if not np.isfinite(loss):
            print(f"step {step}: not saved: its loss on the next batch is {loss} (train.on_nonfinite=skip)", flush=True)
            return False, None
        median = self._diverged(loss)
        if median is not None:
            raise TrainingDivergedError(step, loss, median, self.divergence_factor, len(self._recent),
                                        *self._last(), at_checkpoint=True)
        return True, loss


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM reached the training loop, which saved a checkpoint at ``step`` and stopped."""

    def __init__(self, signum: int, step: int, checkpoint_dir: str | None, saved_step: int | None = None):
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        saved_step = step if saved_step is None and checkpoint_dir else saved_step
        where = (f"checkpoint saved in {checkpoint_dir}" if saved_step == step else
                 f"the latest good checkpoint is step {saved_step} in {checkpoint_dir}" if checkpoint_dir else
                 "no good checkpoint could be saved")
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where}. Rerun the same "
                         "command to resume.")


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
    workdir = prepare_workdir(workdir)
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
    is_main = jax.process_index() == 0  # several processes: process 0 alone writes files (and holds the lock)
    # One process per workdir: a second one would clean up the first's checkpoint in flight.
    with WorkdirLock(workdir, what="training") if is_main else contextlib.nullcontext():
        state = _train_locked(config, workdir, images, labels, mesh, progress, stop_at)
        if make_figures and int(state.step) == config.train.num_steps and is_main:
            write_figures(DiffusionCheckpoint.from_train_state(state, config), workdir, progress=progress)
    return state


def _train_locked(config, workdir: str, images, labels, mesh, progress: bool, stop_at: int | None) -> TrainState:
    """The training loop of :func:`train_and_evaluate`, run while holding the workdir's lock."""
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
    probe_fn = make_dataset_probe(config, schedule, mesh)
    guard = NonFiniteGuard(config.train.on_nonfinite, config.train.max_consecutive_skips, manager,
                           config.train.get("divergence_factor", 0.0), config.train.get("divergence_window", 200))

    bar = None
    if progress and start < end:
        bar = progress_bar(total=end, initial=start, unit="step", desc="training", dynamic_ncols=True, smoothing=0.1)
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
                    # Only a state known good is saved: every array finite, its loss on the next batch sane.
                    good, loss = guard.judge_checkpoint(done, probe_fn(state, device_images, device_labels))
                    if good:
                        ckpt_lib.save(manager, state, config, loss=loss)
                if bar is not None:
                    bar.update(1)
                if stop.signum is not None:
                    manager.wait_until_finished()
                    latest = manager.latest_step()
                    raise TrainingInterrupted(stop.signum, done, None if latest is None else
                                              ckpt_lib.step_directory(manager, latest), latest)
    finally:
        if bar is not None:
            bar.close()
        manager.wait_until_finished()  # a save already under way completes: the latest checkpoint stays whole
        if is_main:
            ckpt_lib.finish_manifests(manager.directory)
        manager.close()

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
