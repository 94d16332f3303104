"""Checkpoint integrity: a manifest of checksums per saved step, verified before anything is loaded.

Every finalized checkpoint gets ``manifest.json``: the size and SHA-256 of each of its files
(written once Orbax has renamed the finished save into place: a checksum taken earlier could
describe a half-written directory). :func:`verify_checkpoint` checks them; a checkpoint that
fails is damaged (a flipped bit, a truncated or deleted file) and is never loaded: training
moves it aside into ``WORKDIR/damaged_checkpoints/`` (:func:`move_aside`) and resumes from the
newest intact one. The manifest's own digest is the checkpoint's identity, which keys
evaluation caches. Nothing here knows what a checkpoint holds: see :mod:`ddpm_jax.training.checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax

DAMAGED_SUBDIR = "damaged_checkpoints"
MANIFEST = "manifest.json"


class CheckpointDamagedError(ValueError):
    """A checkpoint's files do not match its manifest, or cannot be read back."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not fit this config's model (not damage: nothing is moved aside)."""


class ConfigRefusedError(ValueError):
    """A readable checkpoint of another config or other data: refused, not damaged."""


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


# Losses at save time, by (checkpoint directory, step), put into the manifest once the save is finalized.
_PENDING_LOSSES: dict[tuple[str, int], float] = {}


def remember_loss(directory, step: int, loss: float) -> None:
    """Record the loss a save was judged by, for its manifest once Orbax has finalized it."""
    _PENDING_LOSSES[(str(directory), step)] = float(loss)


def checkpoint_loss(step_dir: str) -> float | None:
    """The loss recorded in a checkpoint's manifest when it was saved (None if it has none)."""
    try:
        manifest = read_manifest(step_dir)
    except CheckpointDamagedError:
        return None
    return None if manifest is None else manifest.get("loss")


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


def load_unless_damaged(step_dir: str, load):
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


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if isinstance(e, CheckpointDamagedError) else f"{type(e).__name__}: {text[:300]}"


def move_aside(step_dir: str) -> str:
    """Move the damaged checkpoint in ``WORKDIR/checkpoints/<step>`` out of its manager's sight, into
    ``WORKDIR/damaged_checkpoints/<step>-<time>``; never delete it."""
    source, step = step_dir, os.path.basename(os.path.normpath(step_dir))
    target_root = os.path.join(os.path.dirname(os.path.dirname(os.path.normpath(step_dir))), DAMAGED_SUBDIR)
    os.makedirs(target_root, exist_ok=True)
    target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 0
    while os.path.exists(target + (f"-{suffix}" if suffix else "")):
        suffix += 1
    target += f"-{suffix}" if suffix else ""
    shutil.move(source, target)
    return target


