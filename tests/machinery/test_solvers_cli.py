"""``python -m experiments.solvers``: FID against network calls per sampler and spacing, its table, plot and
refusals, resumed from the samples it kept."""

import json
import shutil

import numpy as np

from experiments import solvers


def test_every_sampler_spacing_and_call_count_gets_a_row_the_table_and_the_plot(trained_tiny_run, idx_dir,
                                                                                 monkeypatch, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_tiny_run, run)
    argv = ["--workdir", str(run), "--idx-dir", str(idx_dir), "--num-samples", "8", "--batch-size", "8",
            "--methods", "ddim", "dpm_solver++", "--spacings", "linspace", "trailing", "--calls", "3", "10", "50",
            "--no-progress"]
    assert solvers.main(argv) == 0
    report = json.loads((run / "solvers" / "solvers.json").read_text())
    # K = 3 at both spacings, K = T = 10 once (all timesteps), K = 50 > T dropped; per method.
    assert [(r["method"], r["spacing"], r["calls"]) for r in report["rows"]] == [
        ("ddim", "linspace", 3), ("ddim", "trailing", 3), ("ddim", "linspace", 10),
        ("dpm_solver++", "linspace", 3), ("dpm_solver++", "trailing", 3), ("dpm_solver++", "linspace", 10)]
    assert all(np.isfinite(r["fid"]) for r in report["rows"]) and report["rows"][3]["order"] == 2
    assert "| DPM-Solver++(2M) | trailing | 3 |" in (run / "solvers" / "solvers.md").read_text()
    assert (run / "solvers" / "fid_vs_calls.png").stat().st_size > 0
    assert solvers.main(argv) == 0  # rerun: every batch read back, the same numbers
    again = json.loads((run / "solvers" / "solvers.json").read_text())
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in report["rows"]]
    # Another combination adds its rows to the same table.
    assert solvers.main(argv[:8] + ["--methods", "dpm_solver++", "--spacings", "leading", "--calls", "3",
                                    "--no-progress"]) == 0
    more = json.loads((run / "solvers" / "solvers.json").read_text())["rows"]
    assert len(more) == 7 and (more[-1]["method"], more[-1]["spacing"]) == ("dpm_solver++", "leading")


def test_an_impossible_combination_is_refused_before_anything_is_drawn(trained_tiny_run, idx_dir, capsys):
    assert solvers.main(["--workdir", str(trained_tiny_run), "--idx-dir", str(idx_dir), "--methods", "dpm_solver++",
                         "--order", "3", "--calls", "4"]) == 2
    assert "order=3 needs at least 5 steps" in capsys.readouterr().err
    assert not (trained_tiny_run / "solvers").exists()
