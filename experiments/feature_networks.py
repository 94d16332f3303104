"""Train the feature networks that ship with the package: ``python -m experiments.feature_networks --dataset mnist``.

For the dataset and each feature space of ``--spaces``, trains the classifier
:func:`ddpm_jax.configs.classifier.feature_network_config` describes on the training split,
measures its accuracy on the test split, and writes it to ``--out`` (default: the package's
``ddpm_jax/evaluation/weights/``) as ``<dataset>-<space>.safetensors`` with its entry in
``manifest.json`` (SHA-256, size, test accuracy, config, data fingerprints, library versions).
Deterministic given the config's seed and the same libraries. The shipped files were made with::

    python -m experiments.feature_networks --dataset mnist --idx-dir ../shared/data/mnist
    python -m experiments.feature_networks --dataset fashion_mnist --idx-dir ../shared/data/fashion-mnist
"""

from __future__ import annotations

import argparse
import sys

import flax
import jax
import ml_collections

from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.configs.classifier import FEATURE_SPACES, feature_network_config
from ddpm_jax.evaluation.feature_network import FeatureNetwork, train_classifier
from ddpm_jax.evaluation.shipped import WEIGHTS_DIR, save_shipped


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.feature_networks", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, choices=[d for d, i in data_lib.DATASETS.items()],
                   help="the dataset whose feature networks to train")
    p.add_argument("--spaces", nargs="+", choices=FEATURE_SPACES, default=list(FEATURE_SPACES),
                   help="feature spaces (default: all)")
    p.add_argument("--idx-dir", default=None, help="read the dataset from its four IDX files in this folder")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--out", default=str(WEIGHTS_DIR), help="where the files and manifest go (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    args = parse_args(argv)
    try:
        info = data_lib.dataset_info(args.dataset)
        train_images, train_labels = data_lib.load_dataset(args.dataset, "train", data_dir=args.data_dir,
                                                           idx_dir=args.idx_dir)
        test_images, test_labels = data_lib.load_dataset(args.dataset, "test", data_dir=args.data_dir,
                                                         idx_dir=args.idx_dir)
    except (ValueError, FileNotFoundError, data_lib.IDXFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for space in args.spaces:
        config = feature_network_config(args.dataset, space, train_images.shape[1:], len(info.class_names))
        print(f"{info.title}, '{space}' feature network: {len(train_images):,} training images, "
              f"{config.train.num_epochs} epochs", flush=True)
        params, history = train_classifier(train_images, train_labels, config, progress=not args.no_progress)
        network = FeatureNetwork(params, ml_collections.FrozenConfigDict(config.to_dict()), 0.0, {})
        accuracy = network.accuracy(test_images, test_labels)
        info_fields = {**history, "test_examples": len(test_labels),
                       "test_fingerprint": data_lib.fingerprint(test_images, test_labels),
                       "train_examples": len(train_labels),
                       "train_fingerprint": data_lib.fingerprint(train_images, train_labels),
                       "jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend()}
        entry = save_shipped(FeatureNetwork(network.params, network.config, accuracy, info_fields), args.dataset,
                             space, args.out)
        rows.append(entry)
        print(f"  test accuracy {accuracy:.2%} after {history['train_seconds']:.0f} s; wrote {entry['file']} "
              f"({entry['bytes'] / 1e6:.2f} MB, sha256 {entry['sha256'][:16]}...)", flush=True)
    print("| network | parameters | test accuracy | sha256 |\n| --- | --- | --- | --- |")
    for e in rows:
        print(f"| `{e['file']}` | {e['num_parameters']:,} | {e['test_accuracy']:.2%} | `{e['sha256'][:16]}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
