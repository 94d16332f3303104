"""python -m experiments.sweep: trains, evaluates and tabulates its variants, resumably."""

import json

import pytest

from ddpm_jax.cli import evaluate
from experiments import sweep

TINY_VARIANTS = (
    {"name": "plain", "what": "unconditional tiny", "preset": "tiny", "steps": 2},
    {"name": "cond", "what": "class-conditional tiny, min-SNR", "preset": "tiny", "steps": 2,
     "set": ["model.num_classes=10", "train.loss_weighting=min_snr"]},
    {"name": "cond_null", "what": "the same at the null label", "eval_of": "cond",
     "eval_args": ["--unconditional", "null"]},
)


@pytest.fixture
def tiny_sweep(monkeypatch, idx_dir):
    monkeypatch.setattr(sweep, "VARIANTS", TINY_VARIANTS)
    calls = []

    def run_in_process(cmd):  # the same entry points, without a new Python process per step
        calls.append(cmd)
        module = {"experiments.mnist": "mnist", "experiments.evaluate": "evaluate"}[cmd[2]]
        from ddpm_jax.cli import train as mnist

        main = mnist.main if module == "mnist" else evaluate.main
        assert main(cmd[3:]) == 0
        return 1.5

    monkeypatch.setattr(sweep, "_run", run_in_process)
    return calls


def test_sweep_trains_evaluates_and_writes_table_json_and_plot(tmp_path, idx_dir, tiny_sweep):
    argv = ["--workdir", str(tmp_path), "--idx-dir", str(idx_dir), "--num-samples", "8", "--cache-dir",
            str(tmp_path / "cache")]
    assert sweep.main(argv) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["plain", "cond", "cond_null"]
    assert rows["cond"]["sampling"]["unconditional"] == "label_prior"
    assert rows["cond_null"]["sampling"]["unconditional"] == "null" and rows["cond_null"]["run"] == "cond"
    assert rows["cond"]["overrides"] == ["model.num_classes=10", "train.loss_weighting=min_snr"]
    assert rows["plain"]["train_seconds"] == 1.5 and rows["plain"]["images_seen"] == 2 * 8
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| cond_null |" in (tmp_path / "sweep.md").read_text()
    # Everything is on disk: a rerun trains and evaluates nothing.
    count = len(tiny_sweep)
    assert sweep.main(argv) == 0 and len(tiny_sweep) == count


def test_sweep_phases_and_unknown_variants(tmp_path, idx_dir, tiny_sweep, capsys):
    base = ["--workdir", str(tmp_path), "--idx-dir", str(idx_dir), "--num-samples", "8"]
    assert sweep.main(base + ["--only", "nope"]) == 2
    assert "--only nope: no such variant" in capsys.readouterr().err
    # An evaluation-only variant brings the run it evaluates into the training phase.
    assert sweep.main(base + ["--phase", "train", "--only", "cond_null"]) == 0
    assert [c[2] for c in tiny_sweep] == ["experiments.mnist"] and "cond" in tiny_sweep[0][tiny_sweep[0].index("--workdir") + 1]
    assert not (tmp_path / "results").exists()
