"""Orbax checkpoints: the whole train state plus the run's config, per step, and what loads them.

Layout: ``WORKDIR/checkpoints/<step>/{state,config,manifest.json}``. ``state`` is the
:class:`~ddpm_jax.training.state.TrainState` pytree (params, EMA, batch_stats, opt_state,
step, key); ``config`` is the config as JSON, so :func:`load_checkpoint` rebuilds
everything from the directory alone; ``manifest.json`` holds the checksums that
:mod:`ddpm_jax.training.manifest` verifies before anything is loaded. A damaged latest checkpoint
is never loaded: training moves it aside and resumes from the newest intact one
(:func:`restore_newest_intact`); :func:`load_checkpoint` skips it (or refuses an
explicitly asked-for step), each saying so in one line.

Restoring always targets an abstract state built on this process's first device, so a
checkpoint written on a GPU restores on a CPU-only machine.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import flax.struct
import jax
import ml_collections
import orbax.checkpoint as ocp

from ddpm_jax.configs import config_from_dict, expected_variables, schedule_from_config, summary
from ddpm_jax.diffusion.schedules import DiffusionSchedule
from ddpm_jax.training import manifest as manifest_lib
from ddpm_jax.training.manifest import (  # noqa: F401  (the errors are raised through this module too)
    CheckpointDamagedError,
    CheckpointMismatchError,
    ConfigRefusedError,
    finish_manifests,
)
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.utils.arguments import check_count
from ddpm_jax.utils.trees import count_params

CHECKPOINT_SUBDIR = "checkpoints"


class _NotReadOnlyNoise(logging.Filter):
    """Orbax warns each time a read-only manager opens a directory; loading a checkpoint is not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_NotReadOnlyNoise())
_STATE, _CONFIG = "state", "config"
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

    def __repr__(self) -> str:
        """One line (the arrays would be hundreds of thousands of characters): step, weights, what was trained."""
        return (f"DiffusionCheckpoint(step {self.step:,}, {count_params(self.params):,} parameters, "
                f"{'EMA' if self.weights_used == 'ema' else 'raw'} weights; {summary(self.config)})")


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


def check_variables_fit_config(checkpoint: DiffusionCheckpoint) -> None:
    """Raise ValueError naming the arrays that do not fit the network ``checkpoint.config`` describes."""
    frozen = ml_collections.FrozenConfigDict(checkpoint.config)
    diffs = tree_differences(checkpoint.variables, expected_variables(frozen))
    if diffs:
        m = checkpoint.config.model
        raise ValueError(
            f"these params do not fit the network their config describes (model.base_channels={m.base_channels}, "
            f"model.levels={m.levels}, data.image_size={checkpoint.config.data.image_size}): {'; '.join(diffs)}. "
            "Load params and config together with ddpm_jax.load_checkpoint(workdir)."
        )


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A manager of ``WORKDIR/checkpoints`` keeping the last ``keep`` steps (``train.keep_checkpoints``)."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    # A save is written to a temporary directory and renamed when complete, and latest_step() only sees
    # complete ones, so a process killed mid-save leaves its last finished checkpoint as the latest; the
    # leftover temporary directory is deleted when the next manager opens the workdir.
    # The manifest of a save is written as soon as Orbax has finalized it (and again, if still missing,
    # by finish_manifests): a checksum taken earlier could describe a half-written directory.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=lambda: finish_manifests(directory)),
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


def save(manager: ocp.CheckpointManager, state, config_record: dict, loss: float | None = None) -> None:
    """Save ``state`` and the run's config at ``state.step`` (asynchronously; no-op if that step exists).

    ``config_record``: the config as a plain dict (``config.to_dict()``, made once by the caller);
    stored as JSON beside the state, and compared, never read field by field, when a run resumes.
    ``loss``: the state's loss when it was judged good (kept in the manifest, and named
    when a later step fails and this becomes the checkpoint to go back to).
    """
    step = int(state.step)
    if step in manager.all_steps():
        return
    if loss is not None:
        manifest_lib.remember_loss(manager.directory, step, loss)
    manager.save(
        step,
        args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _CONFIG: ocp.args.JsonSave(config_record)}
        ),
    )


def on_local_device(abstract_tree):
    """Give every leaf of an abstract tree this process's first device as its sharding."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract_tree)


def restore_state(manager: ocp.CheckpointManager, step: int, template):
    """Restore the train state saved at ``step`` into the structure of ``template``.

    Raises :class:`CheckpointMismatchError` listing the arrays whose shapes or names differ
    when the checkpoint was written by another model than ``template``'s. A checkpoint older
    than a field of the state still loads: a missing ``ema_params`` starts from its weights
    (runs saved before the average existed), a missing field the template holds no arrays in
    (``batch_stats`` of a network without BatchNorm, the classifiers' absent average) takes it.
    """
    abstract = on_local_device(jax.eval_shape(lambda s: s, template))
    saved = manager.item_metadata(step)[_STATE]  # names and shapes only: compared before any array is read
    fields = {name: getattr(abstract, name) for name, field in abstract.__dataclass_fields__.items()
              if field.metadata.get("pytree_node", True)}  # the arrays, not the settings
    fillable = {name for name, value in fields.items()
                if saved is not None and name not in saved
                and (name == _EMA and value is not None or not jax.tree.leaves(value))}
    if not fillable:
        _check_fits(manager, step, saved, abstract)
        return manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)}))[_STATE]
    present = {name: value for name, value in fields.items() if name not in fillable}
    _check_fits(manager, step, saved, present)
    restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(present)}))[_STATE]
    state = abstract.replace(**restored)
    if _EMA in fillable:
        state = state.replace(ema_params=jax.tree.map(lambda p: p.copy(), state.params))
    return state


def _check_fits(manager: ocp.CheckpointManager, step: int, saved, expected) -> None:
    diffs = tree_differences(saved, expected) if saved is not None else []
    if diffs:
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {manager.directory} does not fit the model this config builds: "
            + "; ".join(diffs)
        )


_EMA = "ema_params"


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


# Fields that may change between a run and its resumption without making the checkpoint
# incompatible: they steer the loop or how the same math is computed, not the state's shapes
# or what it means. One list for the diffusion model and the noise-aware classifier (a field
# only one of them has is absent from the other's config).
# The learning-rate fields are among them (every schedule gives Adam the same state), so a run that
# diverged can continue from its last good checkpoint with a lower --lr.
RESUMABLE_FIELDS = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.learning_rate", "train.lr_schedule", "train.warmup_steps", "train.on_nonfinite",
                    "train.max_consecutive_skips", "train.divergence_", "train.ema_", "train.eval_batch_size",
                    "train.tensorboard", "train.sample_every", "train.sample_grid_size", "train.sample_grid_steps",
                    "sampling.", "preset",
                    "model.conv_impl", "model.compute_dtype")


def restore_latest(manager: ocp.CheckpointManager, template, config_record: dict, check_saved=None):
    """The latest intact saved state, or None if there is none; refuses a checkpoint of another
    config or other data (:class:`ConfigRefusedError`): ``config_record`` is this run's config
    as a plain dict, as :func:`save` takes it. ``check_saved(step, saved_config)`` may
    refuse one more. A damaged checkpoint is moved aside (see :func:`restore_newest_intact`).
    """
    def load(step):
        saved = restore_config(manager, step)
        if check_saved is not None:
            check_saved(step, saved)
        _check_same_run(manager, step, saved.to_dict(), config_record)
        return restore_state(manager, step, template)

    return restore_newest_intact(manager, load)


def restore_newest_intact(manager: ocp.CheckpointManager, load):
    """``load(step)`` of the newest checkpoint that verifies and loads, or None if there is none.

    A damaged checkpoint is moved aside into ``WORKDIR/damaged_checkpoints/`` with one line on stderr,
    and the next newest is tried: one whose files fail :func:`verify_checkpoint`, or one without a
    manifest (saved before they existed) that Orbax cannot read back. A checkpoint whose files verify
    is never moved: an error loading it is raised as it is.
    ``load`` refuses a readable checkpoint of another run by raising :class:`ConfigRefusedError` or
    :class:`CheckpointMismatchError`, which pass through.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        loaded, reason = manifest_lib.load_unless_damaged(step_directory(manager, step),
                                                          lambda _identity, step=step: load(step))
        if reason is None:
            return loaded
        moved = manifest_lib.move_aside(step_directory(manager, step))
        print(f"warning: the checkpoint at step {step} is damaged ({reason}); moved it to {moved} and "
              "looking for an older one", file=sys.stderr, flush=True)
        manager.reload()
    return None


def _check_same_run(manager, step: int, saved: dict, current: dict) -> None:
    saved_dataset, current_dataset = saved.get("dataset", "mnist"), current.get("dataset", "mnist")
    if saved_dataset != current_dataset:
        raise ConfigRefusedError(
            f"{manager.directory} holds a run (step {step}) trained on dataset {saved_dataset!r}, not "
            f"{current_dataset!r}; resuming would train it on other images. Use another --workdir, or "
            f"--dataset {saved_dataset} to resume."
        )
    saved_data, current_data = saved.get("data", {}), current.get("data", {})
    if saved_data.get("fingerprint") and saved_data.get("fingerprint") != current_data.get("fingerprint"):
        raise ConfigRefusedError(
            f"{manager.directory} holds a run (step {step}) trained on other data (data.fingerprint "
            f"{saved_data['fingerprint']}, this data {current_data.get('fingerprint')}); resuming would train it on "
            "different images. Use another --workdir, or point at the same data to resume."
        )
    diffs = [
        d for d in config_differences(saved, current)
        # Fields newer than the checkpoint take their defaults; the fingerprint was compared above.
        if not d.startswith(RESUMABLE_FIELDS) and ": '<missing>' ->" not in d and not d.startswith("data.fingerprint")
    ]
    if diffs:
        raise ConfigRefusedError(
            f"{manager.directory} holds a checkpoint (step {step}) of a different config; fields that differ "
            f"(saved -> now): {'; '.join(diffs)}. Use another --workdir, or the same settings to resume."
        )


def checkpoint_loss(manager: ocp.CheckpointManager, step: int | None) -> float | None:
    """The loss recorded in a checkpoint's manifest when it was saved (None if it has none)."""
    return None if step is None else manifest_lib.checkpoint_loss(step_directory(manager, step))


def load_checkpoint(workdir: str, step: int | None = None, weights: str = "ema") -> DiffusionCheckpoint:
    """Load a trained run from its directory; returns the :class:`DiffusionCheckpoint` that :func:`ddpm_jax.sample` takes.

    Args:
      workdir: the ``--workdir`` of a training run.
      step: which checkpoint; if None, the newest intact one (a damaged newer one is
        skipped with a warning on stderr; see :func:`verify_checkpoint`). An explicit
        step that is damaged raises :class:`CheckpointDamagedError`. Nothing is moved.
      weights: which parameters sampling uses: ``'ema'`` (their exponential moving
        average, the default) or ``'raw'`` (the last step's). Both are loaded;
        switch with ``checkpoint.with_weights(...)`` or ``sample(..., weights=...)``.

    Returns:
      A :class:`DiffusionCheckpoint` (params, ema_params, batch_stats, config, step, and
      ``identity``: the digest of its verified files), on this process's first device.
    """
    if not isinstance(workdir, (str, os.PathLike)):
        raise TypeError(f"workdir must be a path (str or os.PathLike), got {type(workdir).__name__}.")
    if step is not None:  # None: the newest intact checkpoint
        step = check_count("step", step, 0)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}.")
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no checkpoints in {workdir!r} (looked for {directory}); train one with "
            f"`ddpm-jax-train --workdir {workdir}` (`python -m experiments.mnist` in the repository)."
        )
    manager = read_only_manager(workdir)
    try:
        saved_steps = sorted(manager.all_steps(), reverse=True)
        if step is not None and step not in saved_steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; saved steps: {saved_steps[::-1]}.")
        if not saved_steps:
            raise FileNotFoundError(f"no checkpoint in {directory} (a run killed before its first save?).")
        for candidate in [step] if step is not None else saved_steps:
            loaded, reason = manifest_lib.load_unless_damaged(
                step_directory(manager, candidate),
                lambda identity, candidate=candidate: _load_verified(manager, candidate, weights, identity))
            if reason is None:
                return loaded
            if step is not None:
                raise CheckpointDamagedError(
                    f"the checkpoint at step {step} in {directory} is damaged ({reason}); load another "
                    f"step (saved: {saved_steps[::-1]}), or leave step unset for the newest intact one.")
            print(f"warning: skipping the checkpoint at step {candidate} in {directory}: damaged ({reason})",
                  file=sys.stderr, flush=True)
        raise CheckpointDamagedError(f"every checkpoint in {directory} is damaged (steps {saved_steps[::-1]}).")
    finally:
        manager.close()


def _load_verified(manager: ocp.CheckpointManager, step: int, weights: str, identity: str) -> DiffusionCheckpoint:
    """The checkpoint at ``step``, whose files :func:`verify_checkpoint` found intact (``identity``)."""
    config = restore_config(manager, step)
    # The state's structure (optimizer state included) follows from the config alone.
    template = jax.eval_shape(lambda: create_train_state(config))
    state = restore_state(manager, step, template)
    return DiffusionCheckpoint(
        params=state.params,
        batch_stats=state.batch_stats,
        config=config_from_dict(config.to_dict()),
        step=int(state.step),
        ema_params=state.ema_params,
        identity=identity,
    ).with_weights(weights)
