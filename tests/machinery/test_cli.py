import json

import pytest

from ddpm_jax.cli import train as mnist


def test_main_job_trains_checkpoints_and_writes_the_figures(tmp_path, idx_dir, capsys):
    workdir = tmp_path / "run"
    code = mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(workdir), "--steps", "3",
                       "--set", "sampling.strip_every=4", "--no-progress"])
    assert code == 0
    for name in ("samples.png", "samples_raw.png", "reverse_process.png", "metrics.jsonl", "config.json",
                 "sampling.json"):
        assert (workdir / name).is_file(), name
    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 3
    assert json.loads((workdir / "config.json").read_text())["sampling"]["strip_every"] == 4
    assert [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()] == [2, 3]
    assert (workdir / "checkpoints" / "3").is_dir()


def test_epochs_are_converted_to_whole_steps(tmp_path, idx_dir):
    args = mnist.parse_args(["--preset", "tiny", "--epochs", "0.5"])
    assert args.epochs == 0.5
    code = mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(tmp_path), "--epochs", "0.5",
                       "--no-progress"])
    assert code == 0
    # 40 images at batch 8: half an epoch is 2.5 steps, rounded up to 3.
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", "diffusion.num_timesteps=0"], "num_timesteps"),
        (["--set", "diffusion.schedule=quadratic"], "linear, cosine"),
        (["--lr", "0"], "learning_rate"),
        (["--batch-size", "0"], "batch_size"),
        (["--batch-size", "2000000"], "train.batch_size=2000000 is not allowed: an integer in 1..1000000"),
        (["--set", "model.levels=3"], "image_size"),
        (["--set", "model.chanels=3"], "unknown field 'chanels'"),
        (["--set", "modle.levels=3"], "unknown config section 'modle'"),
        (["--set", "model.levels=two"], "expected an int"),
        (["--set", "model.levels"], "FIELD=VALUE"),
        (["--set", "train.loss_weighting=snr"], "train.loss_weighting='snr' is not allowed: none or min_snr"),
        (["--set", "train.min_snr_gamma=0.0"], "train.min_snr_gamma=0.0 is not allowed"),
        (["--set", "train.min_snr_gamma=nan"], "expected a float"),
        (["--set", "train.min_snr_gamma=1e999"], "train.min_snr_gamma=inf is not allowed"),
        (["--set", "model.learn_variance=True", "--set", "train.loss_weighting=min_snr"],
         "'none' for a learned-variance network"),
        (["--set", "sampling.unconditional=prior"], "sampling.unconditional='prior' is not allowed"),
        (["--set", "sampling.batchnorm=mixed"], "sampling.batchnorm='mixed' is not allowed: running or batch"),
        # Fields nothing reads: refused by name, with what reads them and the preset, at any value.
        (["--set", "model.dropout=0.5"], "model.dropout=0.5 is read only with model.name='ddpm_unet', which this "
                                         "config (preset tiny) is not"),
        (["--set", "model.attention_resolutions=(7,)"], "model.attention_resolutions=(7,) is read only with"),
        (["--set", "diffusion.beta_end=0.02"], "read only with diffusion.schedule='linear'"),
        (["--set", "train.p_uncond=0.2"], "read only with a class-conditional network"),
        (["--preset", "ddpm", "--set", "model.output_head=conv"], "read only with model.name='report_unet'"),
        (["--set", "preset=cifar10"], "the preset is chosen with --preset, not set as a field"),
        (["--set", "model=3"], "model is a section; set one of its fields"),
    ],
)
def test_bad_config_values_get_one_line_and_exit_status_2(flags, message, capsys, tmp_path):
    assert mnist.main(["--preset", "tiny", "--workdir", str(tmp_path)] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "checkpoints").exists()


def test_batch_larger_than_the_dataset_is_refused_and_leaves_no_workdir(tmp_path, idx_dir, capsys):
    workdir = tmp_path / "run"
    assert mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(workdir), "--batch-size", "41"]) == 2
    assert "train.batch_size=41 is not allowed: at most the 40 training images" in capsys.readouterr().err
    assert mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(workdir), "--batch-size", "9",
                       "--set", "data.max_train_examples=8"]) == 2
    assert "at most the 8 training images" in capsys.readouterr().err and not workdir.exists()


def test_missing_dataset_names_both_ways_to_get_mnist(tmp_path, capsys):
    assert mnist.main(["--preset", "tiny", "--idx-dir", str(tmp_path / "nowhere"), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--idx-dir" in err and "--data-dir" in err


def test_unknown_preset_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mnist.parse_args(["--preset", "huge"])
    assert exit_info.value.code == 2
    assert "cpu" in capsys.readouterr().err


def test_a_signal_while_drawing_the_figures_ends_with_the_usual_message(tmp_path, idx_dir, capsys, monkeypatch):
    import os
    import signal
    import time

    def interrupted_figures(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("the signal did not stop the figures")

    monkeypatch.setattr(mnist, "write_figures", interrupted_figures)
    workdir = tmp_path / "run"
    assert mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(workdir), "--steps", "2",
                       "--no-progress"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM while drawing the figures; the run itself is saved" in err and err.count("\n") == 1
    assert (workdir / "checkpoints" / "2").is_dir()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again


@pytest.mark.parametrize("preset, steps, side", [("cpu", 9000, 10), ("cpu", 50, 3), ("seed", 10, 5), ("tiny", 4, 2),
                                                 ("seed", 1, 2)])
def test_the_figures_grid_shrinks_to_a_tenth_of_a_short_runs_work(preset, steps, side):
    from ddpm_jax.configs import figure_grid_size, get_config

    # cpu, 50 steps: 0.1 x 3 x 50 x 64 = 960 evaluations, over T = 100 steps: 9.6 samples, a 3x3 grid.
    # seed, 10 steps: 0.1 x 3 x 10 x 1000 / 100 = 30 samples, 5x5. Never below 2x2.
    config = get_config(preset)
    config.train.num_steps = steps
    assert figure_grid_size(config) == side
