"""Class-conditional runs end to end: labels checked when training starts, the label frequencies a run
records and samples from, and the guidance sweep's outputs and refusals."""

import json

import jax
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax.training.checkpoint import load_checkpoint
from ddpm_jax.configs import get_config
from ddpm_jax.data import load_mnist
from ddpm_jax.sampling.generate import sample
from ddpm_jax.training.train import train_and_evaluate
from experiments import guidance as sweep

NUM_CLASSES = 10


def _conditional_config():
    config = get_config("tiny")
    config.model.num_classes = NUM_CLASSES
    return config


def test_training_a_conditional_network_needs_valid_labels(tmp_path, images):
    config = _conditional_config()
    with pytest.raises(ValueError, match="needs the images' labels"):
        train_and_evaluate(config, str(tmp_path / "a"), images=images, progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        train_and_evaluate(config, str(tmp_path / "b"), images=images, labels=np.full(len(images), 10),
                           progress=False)
    with pytest.raises(ValueError, match=r"shape \(40,\)"):
        train_and_evaluate(config, str(tmp_path / "c"), images=images, labels=np.zeros(3, int),
                           progress=False)


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, idx_dir):
    workdir = tmp_path_factory.mktemp("conditional_run")
    images, labels = load_mnist("train", idx_dir=str(idx_dir))
    train_and_evaluate(_conditional_config(), str(workdir), images=images, labels=labels, progress=False)
    return workdir


def test_a_conditional_run_records_its_label_frequencies_and_samples_from_them(conditional_run, idx_dir):
    _, labels = load_mnist("train", idx_dir=str(idx_dir))
    saved = json.loads((conditional_run / "config.json").read_text())["data"]["label_frequencies"]
    np.testing.assert_allclose(saved, np.bincount(labels, minlength=NUM_CLASSES) / len(labels), atol=1e-6)
    checkpoint = load_checkpoint(str(conditional_run))
    key = jax.random.PRNGKey(2)
    drawn = ddpm_jax.prior_labels(checkpoint, key, 5)
    assert set(drawn.tolist()) <= set(np.flatnonzero(np.asarray(saved) > 0).tolist())
    np.testing.assert_array_equal(sample(checkpoint, key, 5), sample(checkpoint, key, 5, labels=drawn))


def test_guidance_sweep_writes_its_table_plots_and_digit_grids(conditional_run, idx_dir, monkeypatch, capsys):
    argv = ["--workdir", str(conditional_run), "--idx-dir", str(idx_dir), "--num-samples", "20", "--scales", "0",
            "2", "--batch-size", "10", "--no-progress"]
    assert sweep.main(argv) == 0
    out = conditional_run / "guidance"
    report = __import__("json").loads((out / "guidance.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["unconditional (null label)", "classifier-free guidance w=0",
                                                   "classifier-free guidance w=2"]
    for row in report["rows"][1:]:
        assert 0.0 <= row["accuracy"] <= 1.0 and np.isfinite(row["fid"])
    for png in ("digits_w0.png", "digits_w2.png", "fid_vs_accuracy.png", "unconditional_histogram.png"):
        assert (out / png).stat().st_size > 0
    assert "| the report (unconditional, seed U-Net) | 2 | 40 |" in (out / "guidance.md").read_text()
    # Rerun: every sample batch is read back, and the table is the same.
    assert sweep.main(argv) == 0
    again = __import__("json").loads((out / "guidance.json").read_text())
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in report["rows"]]


def test_guidance_sweep_refuses_an_unconditional_run_and_bad_scales(tmp_path, idx_dir, capsys):
    images, _ = load_mnist("train", idx_dir=str(idx_dir))
    train_and_evaluate(get_config("tiny"), str(tmp_path / "plain"), images=images, progress=False)
    assert sweep.main(["--workdir", str(tmp_path / "plain"), "--idx-dir", str(idx_dir)]) == 2
    assert "unconditional run (model.num_classes=0)" in capsys.readouterr().err
    assert sweep.main(["--workdir", str(tmp_path / "plain"), "--scales", "-1"]) == 2
    assert "--scales -1: guidance scales must be finite and >= 0" in capsys.readouterr().err
