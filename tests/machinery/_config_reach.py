"""Follow the config through training: ``python tests/machinery/_config_reach.py WORKDIR IDX_DIR OUT``.

Runs ``python -m experiments.mnist --preset tiny`` in this process and watches every call
into this checkout's files (``sys.setprofile``). A call *carries the config* when one of its
arguments is the config or a section of it (an ``ml_collections.ConfigDict``, frozen or
not). Writes JSON to ``OUT``: the files whose functions are called with the config, during
training (``train_and_evaluate``) and during the whole command (figures included); the files
that read a field of the config (any ``ConfigDict`` attribute or item read, traced to the
first caller outside ml_collections), during training and during the whole command; and the
calls carrying it that climb back up the layers of ``tests/machinery/test_layering.py`` (a lower
module calling a higher one; each caller -> callee pair of functions once). Run from a
checkout's root: it measures that checkout, so the same script counts any commit.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections

ROOT = os.getcwd()
sys.path.insert(0, ROOT)  # the checkout being measured, not an installed copy
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_layering import LAYER_OF  # noqa: E402

# Modules of older layouts, placed where their code now lives.
LAYER_OF = {**LAYER_OF, "api": LAYER_OF["generate"], "classifier": LAYER_OF["feature_network"]}
_phase = {"name": "setup"}
_files: dict[str, set] = {}
_climbs: set = set()
_reads: dict[str, set] = {}


def _record_reads(name):
    original = getattr(ml_collections.ConfigDict, name)

    def reading(self, *args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None and "ml_collections" in frame.f_code.co_filename:
            frame = frame.f_back
        if frame is not None and _module(frame.f_code.co_filename) is not None:
            _reads.setdefault(_phase["name"], set()).add(os.path.relpath(frame.f_code.co_filename, ROOT))
        return original(self, *args, **kwargs)

    setattr(ml_collections.ConfigDict, name, reading)


def _module(path: str) -> str | None:
    rel = os.path.relpath(path, ROOT)
    if rel.startswith("ddpm_jax" + os.sep):
        return ".".join(p for p in rel[len("ddpm_jax/"):-3].split(os.sep) if p != "__init__")
    return "experiments" if rel.startswith("experiments" + os.sep) else None


def _carries_config(frame) -> bool:
    code = frame.f_code
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    return any(isinstance(frame.f_locals.get(n), ml_collections.ConfigDict) for n in names)


def _profile(frame, event, arg):
    if event != "call" or not frame.f_code.co_filename.startswith(ROOT):
        return
    callee = _module(frame.f_code.co_filename)
    if callee is None or not _carries_config(frame):
        return
    _files.setdefault(_phase["name"], set()).add(os.path.relpath(frame.f_code.co_filename, ROOT))
    caller_frame = frame.f_back
    caller = _module(caller_frame.f_code.co_filename) if caller_frame is not None else None
    if caller not in (None, "experiments") and callee != "experiments" \
            and LAYER_OF.get(callee, -1) > LAYER_OF.get(caller, 99):
        _climbs.add(f"{caller}.{caller_frame.f_code.co_name} -> {callee}.{frame.f_code.co_name}")


def main() -> None:
    workdir, idx_dir, out = sys.argv[1:4]
    from ddpm_jax.training import train
    from ddpm_jax.cli import train as mnist

    original = train.train_and_evaluate

    def traced(*args, **kwargs):
        _phase["name"] = "training"
        try:
            return original(*args, **kwargs)
        finally:
            _phase["name"] = "after"

    train.train_and_evaluate = traced
    for name in ("__getattr__", "__getitem__", "get"):
        _record_reads(name)
    sys.setprofile(_profile)
    try:
        code = mnist.main(["--preset", "tiny", "--idx-dir", idx_dir, "--workdir", workdir, "--no-progress"])
    finally:
        sys.setprofile(None)
    everything = set().union(*_files.values())
    with open(out, "w") as f:
        json.dump({"exit": code, "training": sorted(_files.get("training", ())), "command": sorted(everything),
                   "climbs": sorted(_climbs), "reads_in_training": sorted(_reads.get("training", ())),
                   "reads_in_command": sorted(set().union(*_reads.values()))}, f, indent=1)


if __name__ == "__main__":
    main()
