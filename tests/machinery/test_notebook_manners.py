"""What a notebook user meets: one-line reprs, docstrings whose first line says what comes back, the
installed command-line programs, and tqdm.auto bars."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from tqdm import auto as tqdm_auto

import ddpm_jax
from ddpm_jax.utils import progress
from ddpm_jax.cli import sample as sample_cli
from ddpm_jax.configs import PRESETS, get_config
from ddpm_jax.training.setup import create_train_state


def _parameter_count(tree) -> int:  # counted here from the leaves, not through the package's helper
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def test_a_loaded_checkpoints_repr_is_one_short_line_with_its_step_and_size(trained_tiny_run):
    checkpoint = ddpm_jax.load_checkpoint(str(trained_tiny_run))
    text = repr(checkpoint)
    assert "\n" not in text and len(text) < 300
    assert "step 4," in text and f"{_parameter_count(checkpoint.params):,} parameters" in text
    assert "preset 'tiny'" in text and "28x28x1" in text and "EMA weights" in text
    assert "raw weights" in repr(checkpoint.with_weights("raw"))


@pytest.mark.parametrize("preset", PRESETS)
def test_a_configs_repr_is_one_line_and_print_still_shows_every_field(preset):
    config = get_config(preset)
    assert "\n" not in repr(config) and len(repr(config)) < 250 and f"preset {preset!r}" in repr(config)
    assert f"{config.train.num_steps:,} steps at batch {config.train.batch_size}" in repr(config)
    shown = str(config)
    assert all(f"\n{section}:" in f"\n{shown}" for section in config.keys())


def test_a_train_states_repr_is_one_line_also_inside_jit(tiny_config):
    state = create_train_state(tiny_config(), jax.random.PRNGKey(0))
    text = repr(state)
    assert text.startswith("TrainState(step 0, ") and f"{_parameter_count(state.params):,} parameters" in text
    seen = []
    jax.jit(lambda s: (seen.append(repr(s)), s.step)[1])(state)
    assert seen == [text.replace("step 0", "step traced")]


def _public_functions():
    return [name for name in ddpm_jax.__all__ if inspect.isfunction(getattr(ddpm_jax, name))]


@pytest.mark.parametrize("name", _public_functions())
def test_a_public_functions_first_docstring_line_says_what_it_returns(name):
    first = inspect.getdoc(getattr(ddpm_jax, name)).splitlines()[0]
    assert first.endswith(".") and len(first) <= 140, first
    assert "returns" in first, f"{name}: {first!r} does not say what comes back"


def test_every_public_name_has_a_docstring_and_loads():
    for name in ddpm_jax.__all__:
        obj = getattr(ddpm_jax, name)
        if callable(obj) or inspect.ismodule(obj):
            assert (inspect.getdoc(obj) or "").strip(), name
    assert sorted(dir(ddpm_jax)) == sorted(set(dir(ddpm_jax)))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ddpm_jax.nope  # noqa: B018


def test_progress_bars_are_tqdm_auto_which_renders_in_jupyter():
    assert progress.tqdm is tqdm_auto.tqdm


SCRIPTS = {"ddpm-jax-train": "ddpm_jax.cli.train:main", "ddpm-jax-sample": "ddpm_jax.cli.sample:main",
           "ddpm-jax-evaluate": "ddpm_jax.cli.evaluate:main"}


def test_the_console_scripts_are_declared_and_point_at_mains():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; 3.10 reads the same file in the installed check below
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["scripts"]
    assert declared == SCRIPTS
    for target in declared.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_the_installed_scripts_run_from_any_directory(tmp_path):
    """Where the project is installed (CI installs it), the scripts work outside the repository."""
    installed = {e.name for e in importlib.metadata.entry_points(group="console_scripts")}
    if not set(SCRIPTS) <= installed:
        pytest.skip("ddpm-jax is not installed in this environment (pip install -e .)")
    bindir = os.path.dirname(sys.executable)
    for name in SCRIPTS:
        path = shutil.which(name, path=bindir + os.pathsep + os.environ.get("PATH", ""))
        assert path, f"{name} is installed but not on PATH"
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert out.returncode == 0 and out.stdout.startswith(f"usage: {name}"), out.stderr[-2000:]


def test_sample_writes_a_grid_and_the_arrays_the_same_for_the_same_seed(trained_tiny_run, tmp_path, capsys):
    args = ["--workdir", str(trained_tiny_run), "--num", "5", "--no-progress"]
    assert sample_cli.main([*args, "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz")]) == 0
    assert sample_cli.main([*args, "--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (5, 28, 28, 1) and a["images"].dtype == np.uint8
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], -1)
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "5 samples of step 4" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--num", "0"], "--num 0"), (["--label", "3"], "--label 3: this run is unconditional"),
    (["--out", "/nonexistent-dir/x.png"], "does not exist"), (["--seed", "-1"], "--seed -1"),
])
def test_sample_bad_values_get_one_error_line_and_status_2(trained_tiny_run, flags, message, capsys):
    assert sample_cli.main(["--workdir", str(trained_tiny_run), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
