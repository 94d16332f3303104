"""Orbax checkpoints: the whole train state plus the run's config, per step.

Layout: ``WORKDIR/checkpoints/<step>/{state,config}``. ``state`` is the
:class:`~ddpm_jax.train.TrainState` pytree (params, batch_stats, opt_state,
step, key); ``config`` is the config as JSON, so :func:`load_checkpoint`
rebuilds everything from the directory alone.

Restoring always targets an abstract state built on this process's first
device, so a checkpoint written on a GPU restores on a CPU-only machine.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from ddpm_jax import configs as configs_lib
from ddpm_jax.api import DiffusionCheckpoint, tree_differences

CHECKPOINT_SUBDIR = "checkpoints"
_STATE, _CONFIG = "state", "config"


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A manager keeping the last ``config.train.keep_checkpoints`` steps."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    # A save is written to a temporary directory and renamed when complete, and latest_step() only sees
    # complete ones, so a process killed mid-save leaves its last finished checkpoint as the latest; the
    # leftover temporary directory is deleted when the next manager opens the workdir.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints, create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
    """A manager that only reads ``WORKDIR/checkpoints`` (never creates, cleans or deletes anything)."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


def _item_handlers() -> dict:
    # Named handlers (rather than item names alone) let Orbax read either item's metadata without a restore.
    return {_STATE: ocp.StandardCheckpointHandler(), _CONFIG: ocp.JsonCheckpointHandler()}


def step_directory(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def save(manager: ocp.CheckpointManager, state, config: ml_collections.ConfigDict) -> None:
    """Save ``state`` and ``config`` at ``state.step`` (asynchronously; no-op if that step exists)."""
    step = int(state.step)
    if step in manager.all_steps():
        return
    manager.save(
        step,
        args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _CONFIG: ocp.args.JsonSave(config.to_dict())}
        ),
    )


def on_local_device(abstract_tree):
    """Give every leaf of an abstract tree this process's first device as its sharding."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract_tree)


def restore_state(manager: ocp.CheckpointManager, step: int, template):
    """Restore the train state saved at ``step`` into the structure of ``template``.

    Raises ValueError listing the arrays whose shapes or names differ when the
    checkpoint was written by another model than ``template``'s.
    """
    abstract = on_local_device(jax.eval_shape(lambda s: s, template))
    saved = manager.item_metadata(step)[_STATE]  # names and shapes only: compared before any array is read
    if saved is not None and _EMA not in saved and hasattr(abstract, _EMA):
        return _restore_without_ema(manager, step, saved, abstract)
    _check_fits(manager, step, saved, abstract)
    restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)}))
    return restored[_STATE]


def _check_fits(manager: ocp.CheckpointManager, step: int, saved, expected) -> None:
    diffs = tree_differences(saved, expected) if saved is not None else []
    if diffs:
        raise ValueError(
            f"the checkpoint at step {step} in {manager.directory} does not fit the model this config builds: "
            + "; ".join(diffs)
        )


_EMA = "ema_params"


def _restore_without_ema(manager: ocp.CheckpointManager, step: int, saved, abstract):
    """A checkpoint written before the train state had ``ema_params``: restored with its average
    starting from its weights, so old runs still load and resume."""
    fields = {name: getattr(abstract, name) for name, field in abstract.__dataclass_fields__.items()
              if name != _EMA and field.metadata.get("pytree_node", True)}  # the arrays, not the settings
    _check_fits(manager, step, saved, fields)
    restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(fields)}))[_STATE]
    state = abstract.replace(**restored)
    return state.replace(ema_params=jax.tree.map(lambda p: p.copy(), state.params))


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    restored = manager.restore(step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))
    return ml_collections.ConfigDict(restored[_CONFIG])


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Fields whose values differ between two config dicts, as ``'a.b: saved -> current'``."""
    diffs = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<missing>"), current.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{k}.")
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # JSON keeps tuples as lists
            if list(a) != list(b):
                diffs.append(f"{prefix}{k}: {list(a)!r} -> {list(b)!r}")
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return diffs


# Fields that may change between a run and its resumption without making the
# checkpoint incompatible: they steer the loop or how the same math is computed,
# not the state's shapes or what it means.
# The learning-rate fields are among them (every schedule gives Adam the same state), so a run that
# diverged can continue from its last good checkpoint with a lower --lr.
_RESUMABLE_FIELDS = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.learning_rate", "train.lr_schedule", "train.warmup_steps", "train.on_nonfinite",
                     "train.max_consecutive_skips", "train.ema_", "sampling.", "preset", "model.conv_impl",
                     "model.compute_dtype")


def restore_latest(manager: ocp.CheckpointManager, template, config: ml_collections.ConfigDict):
    """The latest saved state, or None if there is none; refuses a checkpoint of another config."""
    step = manager.latest_step()
    if step is None:
        return None
    saved = restore_config(manager, step).to_dict()
    saved_data, current_data = saved.get("data", {}), config.to_dict().get("data", {})
    if saved_data.get("fingerprint") and saved_data.get("fingerprint") != current_data.get("fingerprint"):
        raise ValueError(
            f"{manager.directory} holds a run (step {step}) trained on other data (fingerprint "
            f"{saved_data['fingerprint']}, this data {current_data.get('fingerprint')}); resuming would train it on "
            "different images. Use another --workdir, or point at the same data to resume."
        )
    diffs = [
        d for d in config_differences(saved, config.to_dict())
        # Fields newer than the checkpoint take their defaults; the fingerprint was compared above.
        if not d.startswith(_RESUMABLE_FIELDS) and ": '<missing>' ->" not in d and not d.startswith("data.fingerprint")
    ]
    if diffs:
        raise ValueError(
            f"{manager.directory} holds a checkpoint (step {step}) of a different config; fields that differ "
            f"(saved -> now): {'; '.join(diffs)}. Use another --workdir, or the same settings to resume."
        )
    return restore_state(manager, step, template)


def load_checkpoint(workdir: str, step: int | None = None, weights: str = "ema"):
    """Load what :func:`ddpm_jax.sample` needs from a run directory.

    Args:
      workdir: the ``--workdir`` of a training run.
      step: which checkpoint; the latest if None.
      weights: which parameters sampling uses: ``'ema'`` (their exponential moving
        average, the default) or ``'raw'`` (the last step's). Both are loaded;
        switch with ``checkpoint.with_weights(...)`` or ``sample(..., weights=...)``.

    Returns:
      A :class:`ddpm_jax.DiffusionCheckpoint` (params, ema_params, batch_stats,
      config, step), on this process's first device.
    """
    from ddpm_jax.train import create_train_state  # train imports this module: import at call time

    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no checkpoints in {workdir!r} (looked for {directory}); train one with "
            f"`python -m experiments.mnist --workdir {workdir}`."
        )
    manager = read_only_manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {directory}; saved steps: {list(manager.all_steps())}."
        )
    config = restore_config(manager, step)
    # The state's structure (optimizer state included) follows from the config alone.
    template = jax.eval_shape(lambda: create_train_state(config))
    state = restore_state(manager, step, template)
    manager.close()
    return DiffusionCheckpoint(
        params=state.params,
        batch_stats=state.batch_stats,
        config=configs_lib.config_from_dict(config.to_dict()),
        step=int(state.step),
        ema_params=state.ema_params,
    ).with_weights(weights)
