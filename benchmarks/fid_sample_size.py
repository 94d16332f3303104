"""How many samples a FID needs: FID of N real training images against the test split, for growing N.

``python -m benchmarks.fid_sample_size --idx-dir ../shared/data/mnist``

Real images are what a perfect model would produce, so every number here is
a floor, and how it falls with N is the small-sample bias of FID (a Gaussian
fit to few samples has a noisy covariance, which only ever adds distance).
Each N is measured on several disjoint random subsets; the table gives the
median and the range, the standard deviation over the subsets, and beside it
the bootstrap spread the evaluation reports (100 resamples of the first subset):
how well that spread estimates the one of independent draws. In every feature
space (``--spaces``). Prints a table and writes
``benchmarks/results/fid-sample-size.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import jax
import numpy as np

from ddpm_jax import cpu
from ddpm_jax import data as data_lib
from ddpm_jax.configs.classifier import FEATURE_SPACES
from ddpm_jax.evaluation import evaluate as evaluation
from ddpm_jax.evaluation import metrics
from ddpm_jax.evaluation.shipped import feature_networks

SIZES = (100, 250, 500, 1000, 2000, 5000, 10_000)


def main(argv=None) -> dict:
    cpu.configure()  # the CPU speed settings, before the first JAX computation (ddpm_jax/cpu/settings.py)
    p = argparse.ArgumentParser(prog="python -m benchmarks.fid_sample_size", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--idx-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--subsets", type=int, default=5, help="random subsets per N (fewer where the data runs out)")
    p.add_argument("--spaces", nargs="+", choices=FEATURE_SPACES, default=list(FEATURE_SPACES))
    p.add_argument("--out", default="benchmarks/results/fid-sample-size.json")
    args = p.parse_args(argv)

    train_x, train_y = data_lib.load_mnist("train", data_dir=args.data_dir, idx_dir=args.idx_dir)
    test_x, test_y = data_lib.load_mnist("test", data_dir=args.data_dir, idx_dir=args.idx_dir)
    networks = feature_networks("mnist", train_x, train_y, test_x, test_y, spaces=args.spaces,
                                cache_dir=args.cache_dir, progress=True)
    result = {
        "what": "FID of N real MNIST training images against the full test split, in each feature network's features",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "train_examples": len(train_x),
        "reference_examples": len(test_x),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "bootstrap_resamples": evaluation.NUM_RESAMPLES,
        "spaces": {},
    }
    for space, network in networks.items():
        _, test_features = evaluation.cached_features(network, test_x, args.cache_dir)
        _, train_features = evaluation.cached_features(network, train_x, args.cache_dir)
        reference = metrics.gaussian_statistics(test_features)
        rng = np.random.default_rng(0)
        rows = []
        for n in SIZES:
            if n > len(train_features):
                break
            perm = rng.permutation(len(train_features))
            subsets = max(1, min(args.subsets, len(train_features) // n))
            fids = [metrics.fid(train_features[perm[i * n : (i + 1) * n]], test_features) for i in range(subsets)]
            first = train_features[perm[:n]]
            boot = metrics.bootstrap(
                lambda i: metrics.frechet_distance(*metrics.gaussian_statistics(first[i]), *reference), n,
                num_resamples=evaluation.NUM_RESAMPLES)
            rows.append({"n": n, "subsets": subsets, "fid_median": float(np.median(fids)),
                         "fid_min": float(np.min(fids)), "fid_max": float(np.max(fids)), "fids": fids,
                         "fid_std_subsets": float(np.std(fids, ddof=1)) if subsets > 1 else None,
                         "fid_std_bootstrap": float(boot.std(ddof=1))})
        result["spaces"][space] = {"classifier": network.name, "classifier_test_accuracy": network.test_accuracy,
                                   "rows": rows}
        print(f"'{space}' space: FID floor against the {len(test_x):,} test images, by sample count "
              f"(classifier {network.name}, test accuracy {network.test_accuracy:.2%})")
        print(f"{'N':>7} {'subsets':>8} {'median':>8} {'min':>8} {'max':>8} {'sd subsets':>11} {'sd bootstrap':>13}")
        for r in rows:
            sd = "-" if r["fid_std_subsets"] is None else f"{r['fid_std_subsets']:.3g}"
            print(f"{r['n']:>7,} {r['subsets']:>8} {r['fid_median']:>8.3g} {r['fid_min']:>8.3g} {r['fid_max']:>8.3g} "
                  f"{sd:>11} {r['fid_std_bootstrap']:>13.3g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
