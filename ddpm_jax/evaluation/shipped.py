"""The feature networks that ship with the package, and the one call that gives a dataset's networks.

MNIST's and Fashion-MNIST's feature networks, one per feature space
(:data:`ddpm_jax.configs.classifier.FEATURE_SPACES`), are trained once by
``python -m experiments.feature_networks`` and shipped in ``ddpm_jax/evaluation/weights/`` as
safetensors files. ``manifest.json`` beside them holds each file's SHA-256, its test accuracy and
the config and data it was trained with. :func:`load_shipped` checks the checksum before it
returns a network, so two machines measure in the same feature space whatever their library
versions; :func:`feature_networks` falls back to training (and caching, as
:func:`ddpm_jax.evaluation.feature_network.load_or_train_feature_network` does) only where nothing
ships (a folder of your own images, CIFAR-10) or when asked to (``retrain=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from ddpm_jax.configs.classifier import FEATURE_SPACES, feature_network_config
from ddpm_jax.evaluation.feature_network import FeatureNetwork, abstract_params, load_or_train_feature_network

WEIGHTS_DIR = Path(__file__).resolve().with_name("weights")
MANIFEST = "manifest.json"


class ShippedWeightsError(ValueError):
    """A shipped weights file that is missing, altered, or does not fit its network."""


def entry_name(dataset: str, space: str) -> str:
    """The manifest key and file stem of a dataset's network in one feature space, e.g. ``'mnist-cnn'``."""
    return f"{dataset}-{space}"


def read_manifest(directory: str | os.PathLike = WEIGHTS_DIR) -> dict:
    """``{entry name: entry}`` of the networks shipped in ``directory`` (empty if there is no manifest)."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text())["networks"] if path.is_file() else {}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_shipped(network: FeatureNetwork, dataset: str, space: str,
                 directory: str | os.PathLike = WEIGHTS_DIR) -> dict:
    """Write ``network`` as ``directory/<dataset>-<space>.safetensors`` and record it in the manifest.

    The file holds the parameters as float32 tensors named by their path (``'Conv_0/kernel'``) and, in
    its header, the dataset, the space and the config. The manifest entry adds the file's SHA-256 and
    size, the test accuracy and what the network was trained on. Both are written atomically.
    Returns the entry.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = entry_name(dataset, space)
    config = json.loads(json.dumps(network.config.to_dict()))  # as the manifest holds it: lists, not tuples
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(
        jax.device_get(network.params), sep="/").items()}
    path = directory / f"{name}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp), metadata={"dataset": dataset, "space": space,
                                        "config": json.dumps(config, sort_keys=True)})
    os.chmod(tmp, 0o644)  # readable by all, as an installed package's files are
    os.replace(tmp, path)
    keep = ("test_accuracy", "test_examples", "test_fingerprint", "train_examples", "train_fingerprint", "steps",
            "epochs", "train_seconds", "train_loss", "train_accuracy", "jax", "flax", "backend")
    entry = {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size,
             "num_parameters": int(sum(v.size for v in flat.values())),
             **{k: network.info[k] for k in keep if k in network.info},
             "test_accuracy": network.test_accuracy, "dataset": dataset, "space": space, "config": config}
    manifest = read_manifest(directory)
    manifest[name] = entry
    manifest_path = directory / MANIFEST
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"networks": dict(sorted(manifest.items()))}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)
    return entry


def load_shipped(dataset: str, space: str, directory: str | os.PathLike = WEIGHTS_DIR) -> FeatureNetwork | None:
    """The shipped network of ``dataset`` in ``space``, its checksum verified; None if none ships.

    Raises :class:`ShippedWeightsError` when the manifest names a file that is missing, whose
    SHA-256 differs from the manifest's, or whose tensors do not fit the network its config builds.
    """
    name = entry_name(dataset, space)
    entry = read_manifest(directory).get(name)
    if entry is None:
        return None
    path = Path(directory) / entry["file"]
    fix = ("reinstall ddpm-jax, or pass --retrain-features to train the network on your machine "
           "(its figures are then not comparable with the shipped network's)")
    if not path.is_file():
        raise ShippedWeightsError(f"the shipped feature network {path} is missing; {fix}.")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise ShippedWeightsError(f"the shipped feature network {path} has SHA-256 {digest}, but the manifest says "
                                  f"{entry['sha256']}: the file was altered or damaged; {fix}.")
    config = ml_collections.FrozenConfigDict(entry["config"])
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in load_file(str(path)).items()}, sep="/")
    got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract_params(config.model))
    if got != want:
        raise ShippedWeightsError(f"the shipped feature network {path} does not fit the network its config builds; "
                                  f"{fix}.")
    info = {**entry, "name": f"{name}-{digest[:12]}", "path": str(path), "shipped": True}
    return FeatureNetwork(params, config, float(entry["test_accuracy"]), info)


def feature_networks(
    dataset: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    spaces: Sequence[str] = FEATURE_SPACES,
    retrain: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    num_classes: int = 10,
    directory: str | os.PathLike = WEIGHTS_DIR,
) -> dict[str, FeatureNetwork]:
    """Load (or, where none ships, train once) a dataset's feature networks; returns ``{space: FeatureNetwork}``.

    The shipped network where one exists (:func:`load_shipped`), with its test accuracy measured
    again if ``test_images`` are not the split it was scored on. Otherwise, or with ``retrain``, the
    network :func:`ddpm_jax.configs.classifier.feature_network_config` describes, trained on
    ``train_images`` once and cached (:func:`load_or_train_feature_network`).
    """
    networks = {}
    for space in spaces:
        network = None if retrain else load_shipped(dataset, space, directory)
        if network is None:
            config = feature_network_config(dataset, space, train_images.shape[1:], num_classes)
            network = load_or_train_feature_network(train_images, train_labels, test_images, test_labels,
                                                    cache_dir=cache_dir, config=config, progress=progress, log=log)
        else:
            network = network.scored_on(test_images, test_labels)
            log(f"feature network '{space}': shipped {network.info['file']} "
                f"(test accuracy {network.test_accuracy:.2%})")
        networks[space] = network
    return networks
