"""The GPU path, checked without a GPU: the gpu preset and its default, time-boxed runs, the learning
curve's arithmetic, the GPU check's summary, and ``benchmarks.gpu_check --smoke`` end to end on the CPU."""

import argparse
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import gpu_check
from ddpm_jax.configs import get_config, validate_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.training.train import train_and_evaluate
from ddpm_jax.utils.trees import count_params
from ddpm_jax.cli import train as mnist
from experiments import learning_curve
from ddpm_jax.cli.flags import duration_seconds

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
# The report's network as the seed preset builds it, from the report's own count.
REPORT_PARAMS = 12_552_848
# What docs/gpu.md reports for the report's network on one H200 (float32, batch 1000): training images/s.
H200_SEED_IMAGES_PER_S = 40_303


@pytest.mark.parametrize("backend, preset", [("gpu", "gpu"), ("cpu", "cpu"), ("tpu", "cpu")])
def test_a_gpu_gets_the_gpu_preset_and_anything_else_the_cpu_one(backend, preset):
    assert mnist.default_preset(backend) == preset


def test_gpu_preset_is_the_reports_network_conditional_with_a_conv_head_and_fits_its_minutes():
    config, seed = get_config("gpu"), get_config("seed")
    validate_config(config)
    for field in ("image_size",):
        assert config.data[field] == seed.data[field] == 32
    for field in ("name", "base_channels", "levels", "time_embed_dim"):
        assert config.model[field] == seed.model[field]
    assert (config.model.output_head, config.model.num_classes) == ("conv", 10)
    assert count_params(create_train_state(seed).params) == REPORT_PARAMS
    # Its training alone at the measured rate leaves most of the 5 minutes to compilation and evaluation.
    images = config.train.num_steps * config.train.batch_size
    assert images == 5_000_000 and images / H200_SEED_IMAGES_PER_S < 150


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("2", 120), (" 30S ", 30)])
def test_durations_take_a_unit_and_default_to_minutes(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1m", "ten", "nan", "inf", "5d", ""])
def test_bad_durations_are_refused_with_an_example(text):
    with pytest.raises(argparse.ArgumentTypeError, match="10m"):
        duration_seconds(text)


def test_a_time_limited_run_stops_with_a_checkpoint_and_resumes_to_the_uninterrupted_result(
        tiny_config, tmp_path, images):
    config = tiny_config(num_steps=4, checkpoint_every=100)
    straight = train_and_evaluate(config, str(tmp_path / "a"), images=images, progress=False)
    # A limit shorter than any step: the loop ends after its first step, saving it.
    stopped = train_and_evaluate(config, str(tmp_path / "b"), images=images, progress=False, time_limit=1e-9)
    assert int(stopped.step) == 1 and (tmp_path / "b" / "checkpoints" / "1").is_dir()
    resumed = train_and_evaluate(config, str(tmp_path / "b"), images=images, progress=False)
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stop_at_keeps_the_runs_length_and_says_how_to_continue(tmp_path, idx_dir, capsys):
    args = ["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(tmp_path), "--steps", "4", "--no-progress"]
    assert mnist.main([*args, "--stop-at", "2"]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 2 of 4 (--stop-at 2)" in out and "the same command continues" in out
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert mnist.main(args) == 0
    assert "stopped" not in capsys.readouterr().out and (tmp_path / "checkpoints" / "4").is_dir()


def test_bad_stop_at_is_refused_before_the_workdir_is_made(tmp_path, capsys):
    assert mnist.main(["--preset", "tiny", "--workdir", str(tmp_path / "run"), "--stop-at", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --stop-at 0") and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, count", [("1M", 1_000_000), ("250k", 250_000), ("1.5M", 1_500_000),
                                         ("4000000", 4_000_000), ("16", 16), ("2e6", 2_000_000)])
def test_curve_points_are_counts_of_images(text, count):
    assert learning_curve.images_count(text) == count


@pytest.mark.parametrize("text", ["", "1G", "-1M", "0", "many"])
def test_bad_curve_points_are_refused(text):
    with pytest.raises(ValueError, match="--points"):
        learning_curve.images_count(text)


def test_curve_points_become_sorted_steps_within_the_run():
    # The seed preset: batch 1000, 120,000 steps; 1.5k images round up to 2 steps; 'end' is the last step.
    assert learning_curve.point_steps(["16M", "1M", "end", "1500", "1M"], 1000, 120_000) == [2, 1000, 16_000, 120_000]
    assert learning_curve.point_steps(["999M"], 1000, 120_000) == [120_000]


def test_the_power_law_through_exact_points_predicts_the_law():
    # FID = 300 * images^-0.5 exactly: the fit recovers it at 100M images (0.03).
    points = [{"images_seen": n, "measurements": [{"fid": 300 * n**-0.5}]} for n in (10**6, 4 * 10**6, 16 * 10**6)]
    prediction = learning_curve.power_law_prediction(points, 10**8)
    assert prediction["fid"] == pytest.approx(0.03, rel=1e-9) and prediction["exponent"] == pytest.approx(-0.5)
    assert learning_curve.power_law_prediction(points[:1], 10**8) is None


def test_speed_summary_takes_each_sides_best_row_and_the_h200_peak():
    rows = [
        {"preset": "seed", "task": "train", "label": "ours", "train_images_per_s": 40_000.0, "flops_per_image": 1e9},
        {"preset": "seed", "task": "train", "label": "ours, bf16", "train_images_per_s": 80_000.0},
        {"preset": "seed", "task": "train", "label": "torch port", "train_images_per_s": 25_000.0},
        {"preset": "seed", "task": "train", "label": "torch port, compiled + bf16", "train_images_per_s": 50_000.0},
        {"preset": "seed", "task": "train", "label": "torch port, bf16", "error": "failed"},
        {"preset": "seed", "task": "sample", "label": "ours", "samples_per_s": 3000.0},
        {"preset": "seed", "task": "sample", "label": "torch port, channels_last", "samples_per_s": 1000.0},
    ]
    summary = gpu_check.speed_summary(rows, "NVIDIA H200")
    train = summary["seed train"]
    assert train["ours"]["label"] == "ours, bf16" and train["best_torch"]["label"] == "torch port, compiled + bf16"
    assert train["ratio"] == pytest.approx(1.6) and train["tflops"] == pytest.approx(80.0)
    assert train["peak_share"] == pytest.approx(80.0 / 989.4)
    assert summary["seed sample"]["ratio"] == pytest.approx(3.0)
    assert gpu_check.speed_summary(rows, "some other GPU")["seed train"]["peak_share"] is None


def test_gpu_check_refuses_to_run_without_a_gpu_unless_smoke(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "--smoke" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_gpu_check_smoke_runs_every_part_on_the_cpu_and_writes_at_most_8_small_files(tmp_path):
    idx = str(MNIST_DIR) if (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file() else None
    out = tmp_path / "out"
    assert gpu_check.main(["--smoke", "--out", str(out), "--workdir", str(tmp_path / "work"),
                           *(["--idx-dir", idx] if idx else [])]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.FILES) and all((out / f).stat().st_size < 16 * 2**20 for f in files)
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["complete"] and record["smoke"]
    preset = record["preset"]
    assert preset["train"]["exit"] == 0 and preset["measure"]["exit"] == 0
    assert set(preset["goals"]) == {"minutes", "fid", "unreadable", "kl_to_uniform"}
    assert [m["guidance_scale"] for m in preset["measurements"]] == [1.0, 0.5]
    curve = record["curve"]["curve"]
    assert curve["points"] and {m["batchnorm"] for m in curve["points"][0]["measurements"]} == {
        "running", "recalibrated"}
    rows = record["speed"]["rows"]
    assert [(r["task"], r["label"]) for r in rows] == list(gpu_check.SMOKE_SPEED_ROWS)
    assert not [r for r in rows if r.get("error") or r.get("skipped")]
    assert record["speed"]["summary"]["tiny train"]["ratio"] > 0
    summary = (out / "summary.md").read_text()
    for heading in ("## gpu preset", "## seed preset", "## Speed"):
        assert heading in summary


def _measurement(setting, fid, unreadable, kl, w=1.0, batchnorm="running"):
    return {"setting": setting, "fid": fid, "unreadable_rate": unreadable, "kl_to_uniform": kl,
            "sampling_seconds": 4.0, "guidance_scale": w, "batchnorm": batchnorm}


def test_summary_shows_the_goals_precision_curve_and_speed_as_measured():
    floor = {"fid": 3.5, "unreadable_rate": 0.02, "kl_to_uniform": 0.001}
    record = {
        "date": "2026-12-04T00:00:00+00:00", "backend": "gpu", "device_kind": "NVIDIA H200",
        "versions": {"jax": "0.11.2", "torch": None},
        "preset": {"train": {"seconds": 180.0}, "images_seen": 5_000_000, "floor": floor,
                   "test_split": {"unreadable_rate": 0.03}, "images_per_s": 40_000.0,
                   "measurements": [_measurement("running BatchNorm statistics, w = 1", 6.0, 0.035, 0.004)],
                   "goals": {"minutes": {"value": 4.2, "goal": 5.0, "met": True},
                             "fid": {"value": 6.0, "goal": 7.0, "met": True},
                             "unreadable": {"value": 0.035, "goal": 0.04, "met": True},
                             "kl_to_uniform": {"value": 0.02, "goal": 0.01, "met": False}}},
        "precision": {"images_per_s": 70_000.0, "minutes": 2.0,
                      "measurement": _measurement("running BatchNorm statistics, w = 1", 6.5, 0.04, 0.005)},
        "curve": {"curve": {"images_per_s": 41_000.0, "total_images": 120_000_000, "rest_of_run_hours": 0.8,
                            "points": [{"images_seen": 1_000_000, "measurements": [_measurement("running", 90.0, 0.3,
                                                                                                0.1)]}],
                            "prediction_at_end": {"fid": 4.0, "images": 120_000_000, "exponent": -0.4}}},
        "speed": {"rows": [{"preset": "seed", "task": "train", "label": "diffusers", "skipped": "budget"}],
                  "summary": {"seed train": {"ours": {"label": "ours, bf16", "rate": 80_000.0},
                                             "best_torch": {"label": "torch port, compiled + bf16", "rate": 50_000.0},
                                             "ratio": 1.6, "tflops": 80.0, "peak_share": 0.0809}}},
    }
    text = gpu_check.summary_markdown(record)
    assert "NVIDIA H200; versions: jax 0.11.2" in text and "torch None" not in text
    assert "| minutes | 4.20 | 5.00 | yes |" in text and "| kl_to_uniform | 0.0200 | 0.0100 | **no** |" in text
    assert "| float32 | 40,000 | 3.00 | 6.00 | 3.50% | 0.0040 |" in text
    assert "| bfloat16 | 70,000 | 2.00 | 6.50 | 4.00% | 0.0050 |" in text
    assert "| 1,000,000 | running | 90.00 | 30.00% | 0.1000 |" in text and "predicts FID 4.00" in text
    assert "| seed train | 80,000 (ours, bf16) | 50,000 (torch port, compiled + bf16) | 1.60 | 80.0 | 8.1% |" in text
    assert "skipped (budget): seed train diffusers" in text


def test_the_speed_table_times_both_u_nets_training_first_against_every_torch_variant():
    jobs = gpu_check.speed_jobs(smoke=False)
    tasks = [task for _, task, label, *_ in jobs if label != "diffusers"]
    assert tasks == sorted(tasks, key=gpu_check.SPEED_ORDER.index)  # train, then sample, then the rest
    assert {label for *_, label, _, _, _ in jobs[-3:]} == {"diffusers"}
    first = [(preset, label) for preset, task, label, *_ in jobs if task == "train"][:14]
    for preset in ("seed", "gpu"):
        for label in ("ours", "ours, bf16", "torch port", "torch port, bf16", "torch port, channels_last",
                      "torch port, channels_last + bf16", "torch port, compiled + bf16"):
            assert (preset, label) in first
