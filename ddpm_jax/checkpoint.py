"""Orbax checkpoints: the whole train state plus the run's config, per step.

Layout: ``WORKDIR/checkpoints/<step>/{state,config}``. ``state`` is the
:class:`~ddpm_jax.train.TrainState` pytree (params, batch_stats, opt_state,
step, key); ``config`` is the config as JSON, so :func:`load_checkpoint`
rebuilds everything from the directory alone.

Every finalized checkpoint also gets ``manifest.json``: the size and SHA-256 of
each of its files (written once Orbax has renamed the finished save into
place). Restoring verifies it; a damaged latest checkpoint (a flipped bit, a
truncated or deleted file) is never loaded: training moves it aside into
``WORKDIR/damaged_checkpoints/`` and resumes from the newest intact one,
:func:`load_checkpoint` skips it (or refuses an explicitly asked-for step), each
saying so in one line. The manifest's own digest is the checkpoint's identity
(:attr:`ddpm_jax.DiffusionCheckpoint.identity`), which keys evaluation caches.

Restoring always targets an abstract state built on this process's first
device, so a checkpoint written on a GPU restores on a CPU-only machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time

import jax
import ml_collections
import orbax.checkpoint as ocp

from ddpm_jax import configs as configs_lib
from ddpm_jax.api import DiffusionCheckpoint, tree_differences

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged_checkpoints"
MANIFEST = "manifest.json"
_STATE, _CONFIG = "state", "config"


class CheckpointDamagedError(ValueError):
    """A checkpoint's files do not match its manifest, or cannot be read back."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not fit this config's model (not damage: nothing is moved aside)."""


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files_of(step_dir: str) -> dict[str, dict]:
    """``{relative path: {size, sha256}}`` of every file under ``step_dir`` but the manifest."""
    files = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel != MANIFEST:
                files[rel] = {"size": os.path.getsize(path), "sha256": _file_digest(path)}
    return dict(sorted(files.items()))


def _identity(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(step_dir: str, extra: dict | None = None) -> dict:
    """Checksum every file of a finalized checkpoint into ``step_dir/manifest.json`` (atomically)."""
    files = _files_of(step_dir)
    manifest = {"identity": _identity(files), "files": files, **(extra or {})}
    tmp = os.path.join(step_dir, f".{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(step_dir, MANIFEST))
    return manifest


def read_manifest(step_dir: str) -> dict | None:
    """The manifest of a checkpoint, or None for one saved before manifests existed."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointDamagedError(f"{path} is unreadable ({e})") from None
    return manifest


def verify_checkpoint(step_dir: str) -> str:
    """Check ``step_dir``'s files against its manifest; return the checkpoint's identity.

    A checkpoint without a manifest (saved before they existed, or by a run killed
    between Orbax's rename and the manifest) is hashed as it is. Raises
    :class:`CheckpointDamagedError` naming the first file missing, resized or changed.
    """
    manifest = read_manifest(step_dir)
    if manifest is None:
        return _identity(_files_of(step_dir))
    for rel, expected in manifest["files"].items():
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            raise CheckpointDamagedError(f"{path} is missing")
        size = os.path.getsize(path)
        if size != expected.get("size"):
            raise CheckpointDamagedError(f"{path} has {size} bytes, its manifest says {expected.get('size')}")
        if _file_digest(path) != expected.get("sha256"):
            raise CheckpointDamagedError(f"{path} does not match its checksum")
    identity = _identity(manifest["files"])
    if manifest.get("identity") != identity:
        raise CheckpointDamagedError(f"{os.path.join(step_dir, MANIFEST)} does not match its own digest")
    return identity


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A manager keeping the last ``config.train.keep_checkpoints`` steps."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    # A save is written to a temporary directory and renamed when complete, and latest_step() only sees
    # complete ones, so a process killed mid-save leaves its last finished checkpoint as the latest; the
    # leftover temporary directory is deleted when the next manager opens the workdir.
    # The manifest of a save is written as soon as Orbax has finalized it (and again, if still missing,
    # by finish_manifests): a checksum taken earlier could describe a half-written directory.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints, create=True, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=lambda: finish_manifests(directory)),
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


# Losses at save time, by (checkpoint directory, step), put into the manifest once the save is finalized.
_PENDING_LOSSES: dict[tuple[str, int], float] = {}


def finish_manifests(directory) -> None:
    """Write the manifest of every finalized checkpoint in ``directory`` that has none yet."""
    directory = str(directory)
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        step_dir = os.path.join(directory, name)
        # Orbax finalizes by renaming '<step>.orbax-checkpoint-tmp-*' to '<step>': only plain step names count.
        if name.isdigit() and os.path.isdir(step_dir) and not os.path.exists(os.path.join(step_dir, MANIFEST)):
            loss = _PENDING_LOSSES.pop((directory, int(name)), None)
            write_manifest(step_dir, None if loss is None else {"loss": loss})


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


def save(manager: ocp.CheckpointManager, state, config: ml_collections.ConfigDict, loss: float | None = None) -> None:
    """Save ``state`` and ``config`` at ``state.step`` (asynchronously; no-op if that step exists).

    ``loss``: the state's loss when it was judged good (kept in the manifest, and named
    when a later step fails and this becomes the checkpoint to go back to).
    """
    step = int(state.step)
    if step in manager.all_steps():
        return
    if loss is not None:
        _PENDING_LOSSES[(str(manager.directory), step)] = float(loss)
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
        raise CheckpointMismatchError(
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
                     "train.max_consecutive_skips", "train.divergence_", "train.ema_", "sampling.", "preset", "model.conv_impl",
                     "model.compute_dtype")


def restore_latest(manager: ocp.CheckpointManager, template, config: ml_collections.ConfigDict):
    """The latest intact saved state, or None if there is none; refuses a checkpoint of another config.

    A damaged checkpoint is moved aside (see :func:`restore_newest_intact`).
    """
    def load(step):
        _check_same_run(manager, step, restore_config(manager, step).to_dict(), config)
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
        loaded, reason = _load_unless_damaged(step_directory(manager, step), lambda _identity, step=step: load(step))
        if reason is None:
            return loaded
        moved = move_aside(manager, step)
        print(f"warning: the checkpoint at step {step} is damaged ({reason}); moved it to {moved} and "
              "looking for an older one", file=sys.stderr, flush=True)
        manager.reload()
    return None


def _load_unless_damaged(step_dir: str, load):
    """``(load(identity), None)``, or ``(None, reason)`` when the checkpoint in ``step_dir`` is damaged.

    The one rule for damage: its files fail :func:`verify_checkpoint`, or it has no manifest (saved
    before they existed) and loading it fails. A checkpoint whose files verify is never damaged: an
    error loading it passes through, as do the refusals :class:`ConfigRefusedError` and
    :class:`CheckpointMismatchError`.
    """
    verified = False
    try:
        verified = read_manifest(step_dir) is not None
        identity = verify_checkpoint(step_dir)
        return load(identity), None
    except (CheckpointMismatchError, ConfigRefusedError):
        raise
    except CheckpointDamagedError as e:
        return None, _reason(e)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes Orbax or TensorStore raise
        if verified:
            raise  # every file is as it was saved: not damage
        return None, _reason(e)


class ConfigRefusedError(ValueError):
    """A readable checkpoint of another config or other data: refused, not damaged."""


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if isinstance(e, CheckpointDamagedError) else f"{type(e).__name__}: {text[:300]}"


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Move a damaged checkpoint out of the manager's sight, into ``WORKDIR/damaged_checkpoints/``; never delete it."""
    source = step_directory(manager, step)
    target_root = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_SUBDIR)
    os.makedirs(target_root, exist_ok=True)
    target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 0
    while os.path.exists(target + (f"-{suffix}" if suffix else "")):
        suffix += 1
    target += f"-{suffix}" if suffix else ""
    shutil.move(source, target)
    return target


def _check_same_run(manager, step: int, saved: dict, config: ml_collections.ConfigDict) -> None:
    saved_data, current_data = saved.get("data", {}), config.to_dict().get("data", {})
    if saved_data.get("fingerprint") and saved_data.get("fingerprint") != current_data.get("fingerprint"):
        raise ConfigRefusedError(
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
        raise ConfigRefusedError(
            f"{manager.directory} holds a checkpoint (step {step}) of a different config; fields that differ "
            f"(saved -> now): {'; '.join(diffs)}. Use another --workdir, or the same settings to resume."
        )


def checkpoint_loss(manager: ocp.CheckpointManager, step: int | None) -> float | None:
    """The loss recorded in a checkpoint's manifest when it was saved (None if it has none)."""
    if step is None:
        return None
    try:
        manifest = read_manifest(step_directory(manager, step))
    except CheckpointDamagedError:
        return None
    return None if manifest is None else manifest.get("loss")


def load_checkpoint(workdir: str, step: int | None = None, weights: str = "ema"):
    """Load what :func:`ddpm_jax.sample` needs from a run directory.

    Args:
      workdir: the ``--workdir`` of a training run.
      step: which checkpoint; if None, the newest intact one (a damaged newer one is
        skipped with a warning on stderr; see :func:`verify_checkpoint`). An explicit
        step that is damaged raises :class:`CheckpointDamagedError`. Nothing is moved.
      weights: which parameters sampling uses: ``'ema'`` (their exponential moving
        average, the default) or ``'raw'`` (the last step's). Both are loaded;
        switch with ``checkpoint.with_weights(...)`` or ``sample(..., weights=...)``.

    Returns:
      A :class:`ddpm_jax.DiffusionCheckpoint` (params, ema_params, batch_stats,
      config, step, and ``identity``: the digest of its verified files), on this
      process's first device.
    """
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no checkpoints in {workdir!r} (looked for {directory}); train one with "
            f"`python -m experiments.mnist --workdir {workdir}`."
        )
    manager = read_only_manager(workdir)
    try:
        saved_steps = sorted(manager.all_steps(), reverse=True)
        if step is not None and step not in saved_steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; saved steps: {saved_steps[::-1]}.")
        if not saved_steps:
            raise FileNotFoundError(f"no checkpoint in {directory} (a run killed before its first save?).")
        for candidate in [step] if step is not None else saved_steps:
            loaded, reason = _load_unless_damaged(
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


def _load_verified(manager: ocp.CheckpointManager, step: int, weights: str, identity: str):
    """The checkpoint at ``step``, whose files :func:`verify_checkpoint` found intact (``identity``)."""
    from ddpm_jax.train import create_train_state  # train imports this module: import at call time

    config = restore_config(manager, step)
    # The state's structure (optimizer state included) follows from the config alone.
    template = jax.eval_shape(lambda: create_train_state(config))
    state = restore_state(manager, step, template)
    return DiffusionCheckpoint(
        params=state.params,
        batch_stats=state.batch_stats,
        config=configs_lib.config_from_dict(config.to_dict()),
        step=int(state.step),
        ema_params=state.ema_params,
        identity=identity,
    ).with_weights(weights)
