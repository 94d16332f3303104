"""Training the diffusion model: the jitted step on L_simple / L_hybrid, and the run around it.

The step functions are pure (``(state, batch) -> (state, metrics)``) and jitted once;
``train_and_evaluate(config, workdir)`` trains (or resumes) a run through the shared loop
(:func:`ddpm_jax.training.loop.run_training`); the ``ddpm-jax-train`` entry point (:mod:`ddpm_jax.cli.train`)
calls it, then draws the figures (:mod:`ddpm_jax.evaluation.figures`). The schedule and the network
are built from the config once, here, and passed down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import data as data_lib
from ddpm_jax.configs import config_to_json, schedule_from_config, validate_config
from ddpm_jax.data import preprocess, random_flip
from ddpm_jax.diffusion.guidance import drop_labels
from ddpm_jax.diffusion.losses import training_loss
from ddpm_jax.diffusion.schedules import DiffusionSchedule
from ddpm_jax.training import checkpoint as ckpt_lib
from ddpm_jax.training.guard import NonFiniteGuard
from ddpm_jax.training.loop import (
    NUM_QUARTERS,
    EpochOrder,
    EpochOrders,
    Hook,
    MetricLogger,
    batch_indices,
    quarter_of,
    run_training,
    steps_per_epoch,
)
from ddpm_jax.training.setup import create_train_state, diffusion_learning_rate
from ddpm_jax.training.state import TrainState, global_norm, state_is_finite
from ddpm_jax.training.tensorboard import EventWriter, open_events
from ddpm_jax.training.workdir import WorkdirLock, prepare_workdir
from ddpm_jax.utils import parallel
from ddpm_jax.utils.trees import count_params

# Stream ids folded into the run's key, so data order, training noise and
# sampling never share random numbers.
_DATA_STREAM, _STEP_STREAM, _DROPOUT_STREAM, _LABEL_STREAM, _FLIP_STREAM = 0, 1, 2, 3, 4


def _loss(state: TrainState, batch, schedule, model_kwargs, key, dropout_key, params):
    """The training loss of ``params`` on ``batch`` with the step's keys (Ho et al.'s Algorithm 1:
    :func:`ddpm_jax.diffusion.losses.training_loss`, L_hybrid for a learned variance): ``(loss, (per_image, t,
    batch_stats))``. ``model_kwargs``: the network's labels, some already dropped (:func:`_step_inputs`)."""
    def eps_theta(x_t, t):
        eps, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x_t, t, train=True, mutable=["batch_stats"],
            rngs={"dropout": dropout_key}, **model_kwargs,
        )
        return eps, updates.get("batch_stats", {})  # GroupNorm networks have no statistics

    loss, per_image, t, batch_stats = training_loss(schedule, eps_theta, batch, key, min_snr_gamma=state.min_snr_gamma,
                                                    hybrid_lambda=state.hybrid_lambda)
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
    state: TrainState, batch: jnp.ndarray, schedule: DiffusionSchedule, labels: jnp.ndarray | None = None,
    *, keep_last_good: bool = True,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One optimizer step of L_simple (L_hybrid for a learned variance) on ``batch``; returns ``(new_state, metrics)``.

    A class-conditional network (``state.num_classes > 0``) needs the batch's ``labels``
    (int ``(B,)``, 0..num_classes-1); each is replaced by the null label with probability
    ``state.p_uncond`` (:func:`ddpm_jax.diffusion.guidance.drop_labels`) before the network sees it.

    Returns the new state and metrics: ``loss`` (batch mean), ``grad_norm``,
    ``finite`` (False if either is NaN/Inf, or if the update would leave a NaN/Inf
    in the weights, their average, BatchNorm statistics or Adam's moments; the
    update is then dropped: see below), and per quarter of the timestep range ``loss_sum_by_quarter`` /
    ``count_by_quarter`` ``(4,)``, which the logger sums over steps before dividing.

    ``keep_last_good=False`` returns the update even where ``finite`` is False, sparing a pass
    over the whole state: for a loop that stops at such a step and never saves what came
    after it (``train.on_nonfinite='stop'``, :func:`train`).
    """
    chex.assert_rank(batch, 4)
    if labels is not None:
        chex.assert_shape(labels, (batch.shape[0],))
    key, dropout_key, model_kwargs = _step_inputs(state, labels)
    loss_fn = functools.partial(_loss, state, batch, schedule, model_kwargs, key, dropout_key)
    (loss, (per_image, t, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = global_norm(grads)  # the clipping's norm too: XLA computes it once
    one_hot = jax.nn.one_hot(quarter_of(t, schedule.num_timesteps), NUM_QUARTERS, dtype=jnp.float32)
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
    if not keep_last_good:
        return updated, metrics
    # A non-finite step advances only the step counter (so the next step draws the next batch):
    # weights, their average, BatchNorm statistics and Adam's moments stay those of the last good step.
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    return updated.replace(
        params=jax.tree.map(keep, updated.params, state.params),
        ema_params=jax.tree.map(keep, updated.ema_params, state.ema_params),
        batch_stats=jax.tree.map(keep, updated.batch_stats, state.batch_stats),
        opt_state=jax.tree.map(keep, updated.opt_state, state.opt_state),
    ), metrics


@dataclasses.dataclass(frozen=True)
class Batching:
    """How a step draws its batch from the training set kept on the devices: ``batch_size`` images
    (divisible by the ``mesh``'s devices, checked here once), padded to ``image_size``, each mirrored
    left-right with probability 1/2 if ``random_flip``."""

    batch_size: int
    image_size: int
    mesh: jax.sharding.Mesh
    random_flip: bool = False

    def __post_init__(self):
        parallel.check_divisible(self.batch_size, self.mesh)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> "Batching":
        """``train.batch_size`` at ``data.image_size`` over ``mesh`` (default: every device), ``data.random_flip``."""
        return cls(config.train.batch_size, config.data.image_size, parallel.make_mesh() if mesh is None else mesh,
                   bool(config.data.get("random_flip", False)))

    def draw(self, state: TrainState, images_u8: jnp.ndarray, labels: jnp.ndarray | None,
             order: EpochOrder | None = None):
        """The ``state.step``-th batch (float images in [-1, 1], and labels or None), split along the
        mesh's data axis; ``order``: the epoch's permutation, drawn beforehand (:meth:`orders`)."""
        indices = batch_indices(data_key(state), images_u8.shape[0], state.step, self.batch_size, order)
        split = parallel.batch_sharded(self.mesh)
        batch = preprocess(images_u8[indices], self.image_size)
        if self.random_flip:
            batch = random_flip(jax.random.fold_in(jax.random.fold_in(state.key, _FLIP_STREAM), state.step), batch)
        batch = jax.lax.with_sharding_constraint(batch, split)
        batch_labels = None if labels is None else jax.lax.with_sharding_constraint(labels[indices], split)
        return batch, batch_labels

    def orders(self, state: TrainState, num_examples: int) -> EpochOrders:
        """Each epoch's order of ``num_examples`` images for :meth:`draw`, drawn once per epoch."""
        return EpochOrders(data_key(state), num_examples, self.batch_size, parallel.replicated(self.mesh))


def data_key(state: TrainState) -> jax.Array:
    """The key a train state's batches are drawn with (:meth:`Batching.draw`)."""
    return jax.random.fold_in(state.key, _DATA_STREAM)


def keeps_last_good(config: ml_collections.ConfigDict) -> bool:
    """Whether :func:`train`'s step drops a non-finite update in the step itself: only under
    ``train.on_nonfinite='skip'``; under ``'stop'`` such a step ends the run before anything after it is saved."""
    return config.train.on_nonfinite == "skip"


def make_dataset_train_step(schedule: DiffusionSchedule, batching: Batching, *, keep_last_good: bool = True):
    """A jitted ``(state, images_u8[, labels[, order]]) -> (state, metrics)`` drawing its batch inside jit.

    ``images_u8`` is the whole training set as uint8 ``(N, h, w, C)``, kept on
    the devices, and ``labels`` its int ``(N,)`` classes (class-conditional
    networks only); the old state is donated. Data parallel over ``batching.mesh``
    (:meth:`Batching.from_config`: every device): state and images
    replicated, the batch split along the mesh's ``data`` axis; XLA all-reduces
    the gradients and BatchNorm's statistics, so the step computes what one
    device would. On one device this is the plain single-device step. ``keep_last_good``: as
    :func:`train_step`'s. ``order``: the epoch's permutation from :meth:`Batching.orders`, which
    saves drawing it at every step (the same batches with or without it).
    """
    everywhere = parallel.replicated(batching.mesh)

    def step(state: TrainState, images_u8: jnp.ndarray, labels: jnp.ndarray | None = None,
             order: EpochOrder | None = None):
        batch, batch_labels = batching.draw(state, images_u8, labels, order)
        return train_step(state, batch, schedule, batch_labels, keep_last_good=keep_last_good)

    # One sharding for every argument (the labels may be None): state and data replicated.
    return jax.jit(step, in_shardings=everywhere, out_shardings=(everywhere, everywhere), donate_argnums=0)


def make_dataset_probe(schedule: DiffusionSchedule, batching: Batching):
    """A jitted ``(state, images_u8[, labels]) -> {loss, state_finite}``: :func:`probe_loss` on the batch
    the next step of :func:`make_dataset_train_step` would draw. The state is not donated (it is then saved)."""
    everywhere = parallel.replicated(batching.mesh)

    def probe(state: TrainState, images_u8: jnp.ndarray, labels: jnp.ndarray | None = None,
              order: EpochOrder | None = None):
        batch, batch_labels = batching.draw(state, images_u8, labels, order)
        return probe_loss(state, batch, schedule, batch_labels)

    return jax.jit(probe, in_shardings=everywhere, out_shardings=everywhere)


def summarize_steps(fetched: list[dict]) -> dict:
    """A log line's fields from the fetched metrics of its steps: means over the good ones, the skipped
    steps counted (``train.on_nonfinite=skip``), and the loss per quarter of the timestep range."""
    good = [m for m in fetched if m["finite"]]
    sums = np.sum([m["loss_sum_by_quarter"] for m in good], axis=0) if good else np.zeros(NUM_QUARTERS)
    counts = np.sum([m["count_by_quarter"] for m in good], axis=0) if good else np.zeros(NUM_QUARTERS)
    record = {
        "loss": float(np.mean([m["loss"] for m in good])) if good else None,
        "grad_norm": float(np.mean([m["grad_norm"] for m in good])) if good else None,
        "skipped_steps": len(fetched) - len(good),
    }
    for q in range(NUM_QUARTERS):
        record[f"loss_t_q{q}"] = float(sums[q] / counts[q]) if counts[q] else None
    return record


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    data_dir: str | None = None,
    idx_dir: str | None = None,
    progress: bool = True,
    stop_at: int | None = None,
    time_limit: float | None = None,
    hooks: tuple[Hook, ...] = (),
    events: EventWriter | None = None,
) -> TrainState:
    """Train (or resume) a run in ``workdir``; returns the final TrainState.

    Args:
      config: a config from :func:`ddpm_jax.configs.get_config`, possibly overridden.
      workdir: run directory; holds ``checkpoints/``, ``config.json`` and ``metrics.jsonl``
        (the figures are :func:`ddpm_jax.evaluation.figures.write_figures`'). A run already there
        resumes from its latest intact checkpoint.
      images: the training images as uint8 ``(N, h, h, C)`` (MNIST ``(N, 28, 28, 1)``; square, C = 1 or 3,
        at most ``data.image_size`` on a side); if None, the train split of the config's ``dataset`` is
        loaded from ``idx_dir`` (IDX files) or TFDS (``data_dir``). Their channels and size are written
        into the run's config (``data.channels``, ``data.native_size``).
      labels: their int ``(N,)`` classes, needed with ``images`` for a class-conditional
        network (``model.num_classes > 0``); loaded with the images when those are.
      stop_at: stop after this step, a checkpoint saved there; the run keeps its length
        (``train.num_steps``) and learning-rate schedule, so calling again continues it.
      time_limit: stop after the first step that ends this many seconds into the loop (compilation
        included), a checkpoint saved there; as ``stop_at``, calling again continues the run.
      hooks: work between steps (:class:`ddpm_jax.training.loop.Hook`), e.g. the sample grids of
        :class:`ddpm_jax.evaluation.previews.SampleGrids`; they find the run's config in ``WORKDIR/config.json``.
      events: where the log lines' scalars go in TensorBoard form; default (None): ``WORKDIR/tensorboard``
        when ``train.tensorboard`` is on (:func:`ddpm_jax.training.tensorboard.open_events`).

    Returns:
      The final train state.
    """
    workdir = prepare_workdir(workdir)
    if images is None:
        images, labels = data_lib.load_dataset(config.get("dataset", "mnist"), "train", data_dir=data_dir,
                                               idx_dir=idx_dir)
    num_classes = int(config.model.get("num_classes", 0))
    labels = _training_labels(labels, len(images), num_classes)
    if config.data.max_train_examples:
        images = images[: config.data.max_train_examples]
        labels = None if labels is None else labels[: config.data.max_train_examples]
    config = ml_collections.ConfigDict(config.to_dict())  # the caller's config is left as it was
    config.data.channels, config.data.native_size = image_format(images)
    validate_config(config, num_examples=len(images))
    # A conditional run is also refused on relabelled data; an unconditional one keeps its old fingerprint.
    config.data.fingerprint = data_lib.fingerprint(images, *(() if labels is None else (labels,)))
    if labels is not None:  # sample() draws labels from these when given none (sampling.unconditional)
        counts = np.bincount(labels, minlength=num_classes)
        config.data.label_frequencies = tuple(round(float(c), 6) for c in counts / counts.sum())
    batching = Batching.from_config(config)  # the batch size checked against the devices before any work
    is_main = jax.process_index() == 0  # several processes: process 0 alone writes files (and holds the lock)
    # One process per workdir: a second one would clean up the first's checkpoint in flight.
    with WorkdirLock(workdir, what="training") if is_main else contextlib.nullcontext():
        return _train_locked(config, workdir, images, labels, batching, progress, stop_at, time_limit, hooks,
                             events)


def _train_locked(config, workdir: str, images, labels, batching: Batching, progress: bool,
                  stop_at: int | None, time_limit: float | None = None, hooks: tuple[Hook, ...] = (),
                  events: EventWriter | None = None) -> TrainState:
    """The run of :func:`train_and_evaluate`, while holding the workdir's lock: resume or start, then the loop."""
    schedule = schedule_from_config(config)  # built once: the step and its probe take it
    t, mesh = config.train, batching.mesh
    manager = ckpt_lib.make_manager(workdir, t.keep_checkpoints)
    state = create_train_state(config)
    record = config.to_dict()  # what every checkpoint stores beside the state, and resuming compares
    restored = ckpt_lib.restore_latest(manager, state, record)
    # Several processes: each runs this same loop over the global mesh; process 0 alone writes files and logs.
    is_main = jax.process_index() == 0
    logger = MetricLogger(os.path.join(workdir, "metrics.jsonl"), summarize_steps)
    if is_main:  # lines a killed run logged after its last checkpoint are written again
        logger.truncate_after(int(restored.step) if restored is not None else 0)
    if restored is not None:
        state = restored
        print(f"resuming from step {int(state.step)} in {workdir}", flush=True)
    else:
        print(
            f"model {config.model.name}: {count_params(state.params):,} parameters; "
            f"{len(images):,} training images, {steps_per_epoch(len(images), t.batch_size):,} steps per epoch",
            flush=True,
        )
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_to_json(config))
    if parallel.num_shards(mesh) > 1:
        print(f"data parallel over {parallel.num_shards(mesh)} devices "
              f"({t.batch_size // parallel.num_shards(mesh)} images each per step)", flush=True)
    data = (parallel.put_replicated(np.asarray(images, dtype=np.uint8), mesh),
            None if labels is None else parallel.put_replicated(labels, mesh))
    state = parallel.put_replicated(state, mesh)
    if events is None and is_main:
        events = open_events(workdir, config)
    if events is not None:
        events.start(int(state.step))
    lr_at = diffusion_learning_rate(config)
    per_epoch = steps_per_epoch(len(images), t.batch_size)
    try:
        return run_training(
            state,
            make_dataset_train_step(schedule, batching, keep_last_good=keeps_last_good(config)),
            data,
            orders=batching.orders(state, len(images)),
            end=t.num_steps if stop_at is None else min(stop_at, t.num_steps),
            batch_size=t.batch_size,
            logger=logger,
            log_every=t.log_every,
            # The rate the last step used.
            log_fields=lambda done: {"epoch": done / per_epoch, "learning_rate": float(lr_at(done - 1))},
            manager=manager,
            config_record=record,
            checkpoint_every=t.checkpoint_every,
            guard=NonFiniteGuard(t.on_nonfinite, t.max_consecutive_skips, manager,
                                 t.get("divergence_factor", 0.0), t.get("divergence_window", 200)),
            probe_fn=make_dataset_probe(schedule, batching),
            postfix=lambda record, rate: {"loss": f"{record['loss']:.4f}", "img_s": f"{rate:.0f}" if rate else "-"},
            progress=progress,
            desc="training",
            is_main=is_main,
            time_limit=time_limit,
            on_log=None if events is None else events.scalars,
            hooks=tuple(hooks),
        )
    finally:
        if events is not None:
            events.close()  # what the run logged reaches the event file, however it ends


def image_format(images) -> tuple[int, int]:
    """``(channels, size)`` of training images uint8 ``(N, size, size, C)``, C = 1 or 3; ValueError otherwise."""
    shape = np.shape(images)
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] not in (1, 3):
        raise ValueError(f"training images must be square, grey or RGB: uint8 (N, size, size, 1 or 3); got shape "
                         f"{shape}.")
    return int(shape[3]), int(shape[1])


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


