"""Training machinery: the train state, the jitted step, and the training loop.

The step functions are pure (``(state, batch) -> (state, metrics)``) and
jitted once; ``train_and_evaluate(config, workdir)`` is the loop that the
``experiments.mnist`` entry point calls, importable from a notebook as well.
"""

from __future__ import annotations

import json
import os
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
from ddpm_jax.api import DiffusionCheckpoint, sample
from ddpm_jax.configs import schedule_from_config
from ddpm_jax.data import crop, preprocess  # noqa: F401  (crop: re-exported for notebooks)
from ddpm_jax.losses import l_simple
from ddpm_jax.models import build_model
from ddpm_jax.schedules import DiffusionSchedule

# Stream ids folded into the run's key, so data order, training noise and
# sampling never share random numbers.
_DATA_STREAM, _STEP_STREAM = 0, 1
NUM_LOSS_BUCKETS = 4  # loss is also logged per quarter of the timestep range


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: saved whole in every checkpoint.

    ``key`` is the run's base key (raw uint32); per-step keys are
    ``fold_in``-ed from it and ``step``, so a resumed run draws the same numbers.
    """

    step: jnp.ndarray  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jnp.ndarray
    apply_fn: Any = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def apply_gradients(self, grads, batch_stats) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )


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
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
        key=run_key,
        apply_fn=model.apply,
        tx=tx,
    )


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def train_step(
    state: TrainState, batch: jnp.ndarray, schedule: DiffusionSchedule
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One optimizer step of L_simple on ``batch`` (``(B, H, W, C)`` float in [-1, 1]).

    Returns the new state and metrics: ``loss`` (batch mean), and per quarter of
    the timestep range ``loss_sum_by_quarter`` / ``count_by_quarter`` ``(4,)``,
    which the logger sums over steps before dividing.
    """
    chex.assert_rank(batch, 4)
    key = jax.random.fold_in(jax.random.fold_in(state.key, _STEP_STREAM), state.step)

    def loss_fn(params):
        def eps_fn(x_t, t):
            eps, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, x_t, t, train=True, mutable=["batch_stats"]
            )
            return eps, updates["batch_stats"]

        loss, per_image, t, batch_stats = l_simple(schedule, eps_fn, batch, key)
        return loss, (per_image, t, batch_stats)

    (loss, (per_image, t, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    bucket = t * NUM_LOSS_BUCKETS // schedule.num_timesteps
    one_hot = jax.nn.one_hot(bucket, NUM_LOSS_BUCKETS, dtype=jnp.float32)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "loss_sum_by_quarter": per_image @ one_hot,
        "count_by_quarter": jnp.sum(one_hot, axis=0),
    }
    return state.apply_gradients(grads, batch_stats), metrics


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


def draw_batch(key: jax.Array, images: jnp.ndarray, step: jnp.ndarray, batch_size: int) -> jnp.ndarray:
    """The ``step``-th batch of ``images`` in the order of :func:`batch_indices`."""
    return images[batch_indices(key, images.shape[0], step, batch_size)]


def make_dataset_train_step(
    config: ml_collections.ConfigDict, schedule: DiffusionSchedule, mesh: jax.sharding.Mesh | None = None
):
    """A jitted ``(state, images_u8) -> (state, metrics)`` drawing its batch inside jit.

    ``images_u8`` is the whole training set as uint8 ``(N, h, w, 1)``, kept on
    the devices; the old state is donated. Data parallel over ``mesh`` (default:
    every device, :func:`ddpm_jax.parallel.make_mesh`): state and images
    replicated, the batch split along the mesh's ``data`` axis; XLA all-reduces
    the gradients and BatchNorm's statistics, so the step computes what one
    device would. On one device this is the plain single-device step.
    """
    batch_size, image_size = config.train.batch_size, config.data.image_size
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_divisible(batch_size, mesh)
    everywhere, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def step(state: TrainState, images_u8: jnp.ndarray):
        data_key = jax.random.fold_in(state.key, _DATA_STREAM)
        batch = preprocess(draw_batch(data_key, images_u8, state.step, batch_size), image_size)
        return train_step(state, jax.lax.with_sharding_constraint(batch, split), schedule)

    return jax.jit(step, in_shardings=(everywhere, everywhere), out_shardings=(everywhere, everywhere),
                   donate_argnums=0)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return num_examples // batch_size


class MetricLogger:
    """Sums step metrics on the host between log points and writes JSONL lines."""

    def __init__(self, path: str):
        self.path = path
        self._pending: list[dict] = []

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)  # device arrays; fetched together at flush

    def flush(self, step: int, extra: dict) -> dict:
        fetched = jax.device_get(self._pending)
        self._pending = []
        sums = np.sum([m["loss_sum_by_quarter"] for m in fetched], axis=0)
        counts = np.sum([m["count_by_quarter"] for m in fetched], axis=0)
        record = {
            "step": step,
            "loss": float(np.mean([m["loss"] for m in fetched])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
        }
        for q in range(NUM_LOSS_BUCKETS):
            record[f"loss_t_q{q}"] = float(sums[q] / counts[q]) if counts[q] else None
        record.update(extra)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def validate_config(config: ml_collections.ConfigDict, num_examples: int | None = None) -> None:
    """Raise ValueError naming the field, the value and what is allowed."""
    if config.diffusion.num_timesteps < 1:
        raise ValueError(f"diffusion.num_timesteps must be >= 1, got {config.diffusion.num_timesteps}.")
    schedule_from_config(config)  # validates schedule name and betas
    if config.train.batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {config.train.batch_size}.")
    if num_examples is not None and config.train.batch_size > num_examples:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} is larger than the {num_examples} training images."
        )
    if config.train.num_steps < 1:
        raise ValueError(f"train.num_steps must be >= 1, got {config.train.num_steps}.")
    make_optimizer(config)
    size, factor = config.data.image_size, 2**config.model.levels
    if size < 28 or size % factor:
        raise ValueError(
            f"data.image_size={size} must be >= 28 and divisible by 2**model.levels={factor} "
            f"(model.levels={config.model.levels}); e.g. 28 for levels <= 2, 32 for levels 3-5."
        )
    build_model(config.model)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    images: np.ndarray | None = None,
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

    Returns:
      The final train state.
    """
    workdir = os.path.abspath(workdir)
    if images is None:
        images, _ = data_lib.load_mnist("train", data_dir=data_dir, idx_dir=idx_dir)
    if config.data.max_train_examples:
        images = images[: config.data.max_train_examples]
    validate_config(config, num_examples=len(images))
    mesh = parallel.make_mesh()
    parallel.check_divisible(config.train.batch_size, mesh)
    os.makedirs(workdir, exist_ok=True)

    schedule = schedule_from_config(config)
    manager = ckpt_lib.make_manager(workdir, config)
    state = create_train_state(config)
    restored = ckpt_lib.restore_latest(manager, state, config)
    if restored is not None:
        state = restored
        print(f"resuming from step {int(state.step)} in {workdir}", flush=True)
    else:
        print(
            f"model {config.model.name}: {count_params(state.params):,} parameters; "
            f"{len(images):,} training images, {steps_per_epoch(len(images), config.train.batch_size):,} steps per epoch",
            flush=True,
        )
    # Several processes: each runs this same loop over the global mesh; process 0 alone writes files and logs.
    is_main = jax.process_index() == 0
    progress = progress and is_main
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
    logger = MetricLogger(os.path.join(workdir, "metrics.jsonl"))
    start, total = int(state.step), config.train.num_steps
    end = total if stop_at is None else min(stop_at, total)
    batch_size = config.train.batch_size

    bar = None
    if progress and start < end:
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1)
    last_time, last_step = time.perf_counter(), start
    compile_seconds = None
    for step in range(start, end):
        state, metrics = step_fn(state, device_images)
        if is_main:
            logger.add(metrics)
        done = step + 1
        if compile_seconds is None:
            jax.block_until_ready(metrics["loss"])
            compile_seconds = time.perf_counter() - last_time
            last_time, last_step = time.perf_counter(), done
        if is_main and (done % config.train.log_every == 0 or done == end):
            jax.block_until_ready(metrics["loss"])
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
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.0f}" if rate else "-")
        if done % config.train.checkpoint_every == 0 or done == end:
            ckpt_lib.save(manager, state, config)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    manager.wait_until_finished()
    manager.close()

    if make_figures and end == total and is_main:
        write_figures(DiffusionCheckpoint.from_train_state(state, config), workdir, progress=progress)
    return state


def write_figures(checkpoint, workdir: str, progress: bool = False) -> dict:
    """Write ``samples.png`` (the report's Figure 4), ``reverse_process.png`` (its Figure 5)
    and ``sampling.json`` (how long the grid took) into ``workdir``.

    ``checkpoint`` is a :class:`ddpm_jax.DiffusionCheckpoint`; the samples use
    the key ``PRNGKey(config.seed + 1)``, so the figures are reproducible.
    """
    config = checkpoint.config
    grid_key, strip_key = jax.random.split(jax.random.PRNGKey(config.seed + 1))
    n_grid = config.sampling.grid_size**2
    t0 = time.perf_counter()
    grid = np.asarray(sample(checkpoint, grid_key, n_grid, progress=progress))
    seconds = time.perf_counter() - t0
    plotting.save_grid(grid, os.path.join(workdir, "samples.png"), nrow=config.sampling.grid_size)
    _, frames = sample(checkpoint, strip_key, config.sampling.strip_samples, return_every=config.sampling.strip_every)
    plotting.save_reverse_process(
        np.asarray(frames),
        os.path.join(workdir, "reverse_process.png"),
        num_timesteps=config.diffusion.num_timesteps,
        every=config.sampling.strip_every,
    )
    info = {"num_samples": n_grid, "seconds_including_compile": seconds, "step": checkpoint.step}
    with open(os.path.join(workdir, "sampling.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"wrote {workdir}/samples.png and reverse_process.png ({n_grid} samples in {seconds:.1f} s)", flush=True)
    return info
