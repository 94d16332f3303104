"""Training the noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, sec. 4), and scoring it.

The classifier reads x_t at every timestep of the diffusion run it will guide: each step
noises a batch to its own ``t ~ Uniform{0..T-1}`` under that run's schedule and takes one
AdamW step on the cross-entropy, through the shared loop
(:func:`ddpm_jax.training.loop.run_training`). :func:`evaluate_noisy_classifier` measures its
accuracy per quarter of the timestep range. What a guided sampler calls, the checkpoint type
and the loader are in :mod:`ddpm_jax.training.noisy_classifier`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import data as data_lib
from ddpm_jax.configs import config_to_json, is_int, is_number, require, schedule_from_config
from ddpm_jax.diffusion.process import q_sample
from ddpm_jax.diffusion.schedules import DiffusionSchedule
from ddpm_jax.training import checkpoint as ckpt_lib
from ddpm_jax.training.loop import (
    NUM_QUARTERS,
    EpochOrder,
    EpochOrders,
    MetricLogger,
    batch_indices,
    quarter_of,
    run_training,
    timestep_quarters,
)
from ddpm_jax.training.noisy_classifier import (
    NoisyClassifierCheckpoint,
    build_noisy_classifier,
    check_is_classifier_checkpoint,
    classifier_learning_rate,
    create_train_state,
    noisy_classifier_config,
)
from ddpm_jax.training.state import TrainState
from ddpm_jax.training.workdir import WorkdirLock, prepare_workdir
from ddpm_jax.utils.trees import count_params

# Stream ids folded into the run's key, so data order, training noise and evaluation noise never share numbers.
_DATA_STREAM, _NOISE_STREAM, _EVAL_STREAM = 0, 1, 2


def make_train_step(config: ml_collections.ConfigDict, schedule: DiffusionSchedule):
    """A jitted ``(state, images_u8, labels) -> (state, metrics)`` drawing its batch inside jit.

    ``images_u8``: the whole training set, uint8 ``(N, h, w, C)`` on the device;
    ``labels``: int32 ``(N,)``. Each step takes the ``step``-th batch of an epoch-wise
    shuffle (:func:`ddpm_jax.training.loop.batch_indices`; ``order``: the epoch's permutation,
    drawn once per epoch by :class:`~ddpm_jax.training.loop.EpochOrders`), maps it to [-1, 1] at
    ``data.image_size``, noises each image to its own ``t ~ Uniform{0..T-1}`` and takes
    one AdamW step on the cross-entropy. The old state is donated.

    Metrics: ``loss``, ``accuracy`` (batch means) and per quarter of the timestep range
    ``correct_by_quarter`` / ``count_by_quarter`` ``(4,)``, for the logger to sum.
    """
    model = build_noisy_classifier(config.model)
    batch_size, image_size, num_timesteps = config.train.batch_size, config.data.image_size, schedule.num_timesteps

    def step(state: TrainState, images_u8: jnp.ndarray, labels: jnp.ndarray, order: EpochOrder | None = None):
        chex.assert_rank(images_u8, 4)
        chex.assert_shape(labels, (images_u8.shape[0],))
        idx = batch_indices(jax.random.fold_in(state.key, _DATA_STREAM), images_u8.shape[0], state.step, batch_size,
                            order)
        t_key, eps_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(state.key, _NOISE_STREAM), state.step))
        x0 = data_lib.preprocess(images_u8[idx], image_size)
        y = labels[idx]
        t = jax.random.randint(t_key, (batch_size,), 0, num_timesteps)
        x_t = q_sample(schedule, x0, t, jax.random.normal(eps_key, x0.shape))

        def loss_fn(params):
            logits = model.apply({"params": params}, x_t, t)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        one_hot = jax.nn.one_hot(quarter_of(t, num_timesteps), NUM_QUARTERS, dtype=jnp.float32)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(correct),
            "correct_by_quarter": correct @ one_hot,
            "count_by_quarter": jnp.sum(one_hot, axis=0),
        }
        return state.apply_gradients(grads), metrics

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
      images_u8: uint8 ``(N, h, w, C)``; labels: int ``(N,)``.

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
    predict = _compiled_predict(ml_collections.FrozenConfigDict(
        {"model": c.model, "diffusion": c.diffusion, "image_size": c.data.image_size}), batch)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), _EVAL_STREAM)
    predictions = []
    for i, start in enumerate(range(0, n, batch)):
        x, t = images_u8[start : start + batch], t_all[start : start + batch]
        real = len(x)  # one compiled shape for every batch; padded rows are dropped below
        x, t = data_lib.pad_to_batch(x, batch), data_lib.pad_to_batch(t, batch)
        predictions.append(np.asarray(predict(classifier.params, jax.random.fold_in(key, i), x, t))[:real])
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
def _compiled_predict(what: ml_collections.FrozenConfigDict, batch: int) -> Callable:
    # Keyed by what the prediction depends on (network, schedule, size), not by training fields, so a resumed
    # or longer run evaluates with the function already compiled.
    schedule = schedule_from_config(what)
    model, image_size = build_noisy_classifier(what.model), what.image_size

    @jax.jit
    def predict(params, key, images_u8, t):
        x0 = data_lib.preprocess(images_u8, image_size)
        x_t = q_sample(schedule, x0, t, jax.random.normal(key, x0.shape))
        return jnp.argmax(model.apply({"params": params}, x_t, t), axis=-1)

    return predict


def _full_config(run_config, config: ml_collections.ConfigDict, images_u8, labels) -> ml_collections.ConfigDict:
    """The classifier's model and train sections, with the diffusion run's schedule and image size and the data's hash."""
    full = ml_collections.ConfigDict({"model": config.model.to_dict(), "train": config.train.to_dict()})
    full.diffusion = ml_collections.ConfigDict(run_config.diffusion.to_dict())
    full.data = ml_collections.ConfigDict(
        {"image_size": int(run_config.data.image_size), "channels": int(run_config.data.get("channels", 1)),
         "fingerprint": data_lib.fingerprint(images_u8, labels)}
    )
    return full


def _validate(config: ml_collections.ConfigDict, num_examples: int) -> None:
    t = config.train
    require(is_int(t.num_steps, 1), "train.num_steps", t.num_steps, "an integer >= 1")
    require(is_int(t.batch_size, 1, num_examples), "train.batch_size", t.batch_size,
            f"an integer from 1 to the {num_examples} training images")
    require(is_number(t.learning_rate, 0.0, lo_open=True), "train.learning_rate", t.learning_rate, "a rate > 0")
    require(is_int(t.warmup_steps, 0), "train.warmup_steps", t.warmup_steps, "an integer >= 0")
    require(is_number(t.weight_decay, 0.0), "train.weight_decay", t.weight_decay, "a weight >= 0")
    for field in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size"):
        require(is_int(t[field], 1), f"train.{field}", t[field], "an integer >= 1")
    # The network checks its own widths, and the image size against its poolings, when traced.
    jax.eval_shape(lambda: create_train_state(config))


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
      progress: a progress bar (:func:`ddpm_jax.utils.progress.progress_bar`: tqdm on a terminal,
        a plain line every 30 s when stderr is a file).

    Returns:
      The trained :class:`NoisyClassifierCheckpoint`.
    """
    images_u8, labels = np.asarray(images_u8), np.asarray(labels, np.int32)
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4:
        raise ValueError(f"training images must be uint8 (N, h, w, C), got {images_u8.dtype} {images_u8.shape}.")
    chex.assert_shape(labels, (images_u8.shape[0],))
    config = _full_config(run_config, config or noisy_classifier_config(), images_u8, labels)
    _validate(config, len(labels))
    workdir = prepare_workdir(workdir, "workdir")
    # One process per folder, as for a diffusion run: a second would clean up the first's save in flight.
    with WorkdirLock(workdir, what="training a noisy classifier"):
        return _train_locked(config, workdir, images_u8, labels, test_images, test_labels, progress)


def _train_locked(config, workdir: str, images_u8, labels, test_images, test_labels, progress: bool):
    schedule = schedule_from_config(config)  # built once: the step takes it
    tc = config.train
    manager = ckpt_lib.make_manager(workdir, tc.keep_checkpoints)
    record = config.to_dict()  # what every checkpoint stores beside the state, and resuming compares
    state = ckpt_lib.restore_latest(manager, jax.eval_shape(lambda: create_train_state(config)), record,
                                    check_saved=functools.partial(check_is_classifier_checkpoint, manager))
    logger = MetricLogger(os.path.join(workdir, "metrics.jsonl"), summarize_steps)
    logger.truncate_after(int(state.step) if state is not None else 0)  # lines past the checkpoint are redone
    if state is not None and int(state.step) >= tc.num_steps:
        print(f"the noisy classifier in {workdir} is trained (step {int(state.step)})", flush=True)
    elif state is not None:
        print(f"resuming the noisy classifier from step {int(state.step)} in {workdir}", flush=True)
    else:
        state = create_train_state(config)
        print(f"noisy classifier: {count_params(state.params):,} parameters; {len(labels):,} training images; "
              f"T={schedule.num_timesteps} {config.diffusion.schedule} schedule at {config.data.image_size}x"
              f"{config.data.image_size}", flush=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_to_json(config))

    lr_at = classifier_learning_rate(config)
    state = run_training(
        state,
        make_train_step(config, schedule),
        (jnp.asarray(images_u8), jnp.asarray(labels)),
        orders=EpochOrders(jax.random.fold_in(state.key, _DATA_STREAM), len(images_u8), tc.batch_size),
        end=tc.num_steps,
        batch_size=tc.batch_size,
        logger=logger,
        log_every=tc.log_every,
        log_fields=lambda done: {"learning_rate": float(lr_at(done - 1))},
        manager=manager,
        config_record=record,
        checkpoint_every=tc.checkpoint_every,
        postfix=lambda record, rate: {"loss": f"{record['loss']:.3f}", "acc": f"{record['accuracy']:.2f}"},
        progress=progress,
        desc="noisy classifier",
        # The average rate: steps are dispatched ahead and finish in bursts at each log point.
        smoothing=0,
    )

    classifier = NoisyClassifierCheckpoint.from_train_state(state, config)
    if test_images is not None and test_labels is not None:
        result = evaluate_noisy_classifier(classifier, test_images, test_labels, seed=tc.seed,
                                           batch_size=tc.eval_batch_size)
        result["step"] = classifier.step
        with open(os.path.join(workdir, "accuracy.json"), "w") as f:
            json.dump(result, f, indent=2)
    return classifier


def summarize_steps(fetched: list[dict]) -> dict:
    """A log line's fields: mean loss and accuracy over its steps, and the accuracy per quarter of [0, T)."""
    correct = np.sum([m["correct_by_quarter"] for m in fetched], axis=0)
    counts = np.sum([m["count_by_quarter"] for m in fetched], axis=0)
    record = {
        "loss": float(np.mean([m["loss"] for m in fetched])),
        "accuracy": float(np.mean([m["accuracy"] for m in fetched])),
    }
    for q in range(NUM_QUARTERS):
        record[f"accuracy_t_q{q}"] = float(correct[q] / counts[q]) if counts[q] else None
    return record
