"""experiments.likelihood: every bad flag ends in one ``error:`` line and exit status 2, before any computation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import likelihood

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fixed_variance_run(trained_tiny_run, tmp_path_factory):
    """A copy of the shared tiny run, whose network has a fixed variance (model.learn_variance off)."""
    workdir = tmp_path_factory.mktemp("likelihood_cli") / "run"
    shutil.copytree(trained_tiny_run, workdir)
    return workdir


def run_main(argv) -> int:
    """``likelihood.main``'s exit status, also when argparse ends it with SystemExit."""
    try:
        return likelihood.main(argv)
    except SystemExit as e:
        return e.code


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_variance_learned_on_a_fixed_variance_network_is_one_error_line(fixed_variance_run, idx_dir, capsys):
    capsys.readouterr()
    code = run_main(["--workdir", str(fixed_variance_run), "--idx-dir", str(idx_dir), "--variance", "learned",
                     "--no-progress"])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--variance learned" in line and "model.learn_variance" in line and "beta_tilde" in line
    assert not (fixed_variance_run / "likelihood.json").exists()


def test_variance_learned_ends_in_an_error_line_not_a_traceback_from_the_shell(fixed_variance_run, idx_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-m", "experiments.likelihood", "--workdir", str(fixed_variance_run),
                          "--idx-dir", str(idx_dir), "--variance", "learned", "--no-progress"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        line for line in out.stderr.splitlines() if "--variance learned" in line]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "nan"], "argument --batch-size: invalid int value: 'nan'"),
        (["--batch-size", "inf"], "invalid int value: 'inf'"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--batch-size", "-5"], "--batch-size -5"),
        (["--num-images", "0"], "--num-images 0"),
        (["--num-images", "1e3"], "argument --num-images: invalid int value: '1e3'"),
        (["--step", "-1"], "--step -1"),
        (["--step", "999"], "999"),
        (["--seed", "-1"], "--seed -1"),
        (["--seed", str(2**64)], f"--seed {2**64}"),
        (["--variance", "huge"], "argument --variance: invalid choice: 'huge'"),
        (["--weights", "best"], "argument --weights: invalid choice: 'best'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_flags_are_one_error_line_and_status_2(fixed_variance_run, idx_dir, flags, message, capsys):
    capsys.readouterr()
    assert run_main(["--workdir", str(fixed_variance_run), "--idx-dir", str(idx_dir), "--no-progress"] + flags) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (fixed_variance_run / "likelihood.json").exists()


@pytest.mark.parametrize("workdir", ["", "missing", "a-file"])
def test_a_missing_or_wrong_workdir_is_one_error_line(tmp_path, idx_dir, workdir, capsys):
    (tmp_path / "a-file").write_text("not a run")
    path = str(tmp_path / workdir) if workdir else ""
    assert run_main(["--workdir", path, "--idx-dir", str(idx_dir)]) == 2
    one_error_line(capsys.readouterr().err)


def test_no_workdir_flag_is_one_error_line(capsys):
    assert run_main([]) == 2
    assert "--workdir" in one_error_line(capsys.readouterr().err)


def test_missing_test_images_are_one_error_line(fixed_variance_run, tmp_path, capsys):
    capsys.readouterr()
    assert run_main(["--workdir", str(fixed_variance_run), "--idx-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    # data.DatasetNotFoundError's message goes on to list both ways to get MNIST, on lines of their own.
    assert err.startswith("error: MNIST IDX folder") and "--idx-dir" in err and "Traceback" not in err
