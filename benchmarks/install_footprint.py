"""What installing and importing ddpm-jax costs: installed size and ``import`` time, environment against environment.

``python -m benchmarks.install_footprint --env before=/tmp/venv-before/bin/python --env after=/tmp/venv-after/bin/python``

For each environment (a Python interpreter with ddpm-jax installed in it): the size of everything
installed in its site-packages (the sum of the files every installed distribution lists), whether
TensorFlow is there, the five largest distributions, and the wall time of a fresh process that runs
``import ddpm_jax`` and of one that goes on to load what sampling needs (``ddpm_jax.sample``). The
processes alternate between environments, round by round, so a drift of the machine's speed falls on
both; the table gives each figure's median and range. The processes run outside the repository so
that each imports its environment's installed copy. Prints a table and writes
``benchmarks/results/install-footprint.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SIZES = r"""
import json, os
from importlib import metadata
sizes = {}
for dist in metadata.distributions():
    total = 0
    for f in dist.files or []:
        try:
            total += os.path.getsize(dist.locate_file(f))
        except OSError:
            pass
    sizes[dist.metadata["Name"]] = sizes.get(dist.metadata["Name"], 0) + total
print(json.dumps(sizes))
"""
IMPORTS = {"import ddpm_jax": "import ddpm_jax",
           "import ddpm_jax; ddpm_jax.sample": "import ddpm_jax; ddpm_jax.sample"}


def _environment_sizes(python: str, cwd: str) -> dict[str, int]:
    out = subprocess.run([python, "-c", SIZES], capture_output=True, text=True, check=True, cwd=cwd)
    return json.loads(out.stdout)


def _time(python: str, code: str, cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-c", code], check=True, cwd=cwd, capture_output=True)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.install_footprint", description=__doc__.splitlines()[0])
    p.add_argument("--env", action="append", required=True, metavar="NAME=PYTHON",
                   help="an environment: a name and its Python interpreter (give two or more)")
    p.add_argument("--rounds", type=int, default=7, help="fresh processes per environment and import (default: 7)")
    p.add_argument("--out", default="benchmarks/results/install-footprint.json")
    args = p.parse_args(argv)
    envs = dict(e.split("=", 1) for e in args.env)
    cwd = tempfile.mkdtemp(prefix="install_footprint_")
    results = {}
    for name, python in envs.items():
        sizes = _environment_sizes(python, cwd)
        version = subprocess.run([python, "-c", "import sys, importlib.metadata as m; print(sys.version.split()[0], "
                                  "m.version('ddpm-jax'), m.version('jax'))"], capture_output=True, text=True,
                                 check=True, cwd=cwd).stdout.split()
        results[name] = {"python": version[0], "ddpm_jax": version[1], "jax": version[2],
                         "installed_mb": round(sum(sizes.values()) / 1e6, 1), "distributions": len(sizes),
                         "tensorflow": any(n.lower().replace("_", "-") in ("tensorflow", "tensorflow-cpu")
                                           for n in sizes),
                         "largest_mb": {n: round(s / 1e6, 1) for n, s in sorted(sizes.items(), key=lambda x: -x[1])[:5]},
                         "import_seconds": {}}
        for label, code in IMPORTS.items():  # one untimed warm-up each: the file cache, .pyc files written
            _time(python, code, cwd)
    times = {name: {label: [] for label in IMPORTS} for name in envs}
    for _ in range(args.rounds):
        for label, code in IMPORTS.items():
            for name, python in envs.items():
                times[name][label].append(_time(python, code, cwd))
    for name in envs:
        for label, values in times[name].items():
            results[name]["import_seconds"][label] = {"median": round(statistics.median(values), 3),
                                                      "min": round(min(values), 3), "max": round(max(values), 3)}
    print(f"{'environment':<12} {'python':<8} {'installed':>10} {'TF':>4}  " +
          "  ".join(f"{label + ' (s)':>36}" for label in IMPORTS))
    for name, r in results.items():
        cells = [f"{r['import_seconds'][label]['median']:.2f} [{r['import_seconds'][label]['min']:.2f}, "
                 f"{r['import_seconds'][label]['max']:.2f}]" for label in IMPORTS]
        print(f"{name:<12} {r['python']:<8} {r['installed_mb']:>8.0f} MB {'yes' if r['tensorflow'] else 'no':>4}  " +
              "  ".join(f"{c:>36}" for c in cells))
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {platform.system()}", "rounds": args.rounds,
              "method": "wall time of fresh processes, alternating between environments round by round; median and "
                        "range", "environments": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
