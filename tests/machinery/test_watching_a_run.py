"""Watching a run: TensorBoard event files (the log lines' scalars, the sample grids), the grids' PNG files, the
grids' time left out of the logged speed, ``loss.png``, and several runs' curves on one figure."""

import json
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax.cli import train as train_cli
from ddpm_jax.configs import config_to_json, get_config, validate_config
from ddpm_jax.evaluation.previews import SampleGrids, grid_path
from ddpm_jax.sampling.generate import sample
from ddpm_jax.training import tensorboard as tensorboard_lib
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.training.loop import Hook, MetricLogger, run_training
from ddpm_jax.training.setup import create_train_state
from experiments import compare


def _events(workdir):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(workdir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_opens_a_resumed_run_with_each_log_line_once_and_its_grids(tmp_path, idx_dir):
    workdir = tmp_path / "run"
    flags = ["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(workdir), "--steps", "4",
             "--set", "train.sample_every=2", "--no-progress"]
    assert train_cli.main(flags + ["--stop-at", "2"]) == 0
    # What a run killed after its checkpoint at step 2 had already written: a line at step 3, never saved.
    killed = tensorboard_lib.EventWriter(str(workdir / "tensorboard"), 10)
    killed.start(0)
    killed.scalars({"step": 3, "loss": 99.0})
    killed.close()
    assert train_cli.main(flags) == 0

    events = _events(workdir)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4]
    assert set(tensorboard_lib.scalar_tags(10).values()) <= set(events.Tags()["scalars"])
    losses = events.Scalars("loss/all_t")
    assert [s.step for s in losses] == [2, 4]  # the killed run's line at step 3 is gone
    np.testing.assert_allclose([s.value for s in losses], [r["loss"] for r in logged], rtol=1e-6)
    quarter = events.Scalars("loss/t_0-2")  # T = 10: t * 4 // 10 == 0 for t in 0..2
    np.testing.assert_allclose([s.value for s in quarter], [r["loss_t_q0"] for r in logged], rtol=1e-6)

    grids = events.Images("samples")
    assert [g.step for g in grids] == [2, 4]
    side = get_config("tiny").train.sample_grid_size
    assert (grids[0].width, grids[0].height) == (side * 30 + 2, side * 30 + 2)  # 28-pixel images, 2-pixel gaps
    for step in (2, 4):
        saved = Image.open(grid_path(str(workdir), step))
        assert saved.size == (3 * (side * 30 + 2),) * 2
    recorded = json.loads((workdir / "samples" / "grids.json").read_text())["grids"]
    assert [g["step"] for g in recorded] == [2, 4] and all(g["seconds"] > 0 for g in recorded)
    assert (workdir / "loss.png").is_file()


def test_grids_are_the_ema_weights_samples_from_one_fixed_key(tmp_path):
    config = get_config("tiny")
    (tmp_path / "config.json").write_text(config_to_json(config))
    state = create_train_state(config)
    state = state.replace(ema_params=jax.tree.map(lambda p: p + 0.05, state.params))  # EMA and raw weights differ
    grids = SampleGrids(str(tmp_path))
    first = grids(7, state)
    again = grids(8, state)
    np.testing.assert_array_equal(first, again)  # the same key for every grid
    side = config.train.sample_grid_size
    assert first.shape == (side * side, 28, 28, 1)
    assert config.train.sample_grid_steps >= config.diffusion.num_timesteps  # the tiny grid takes all T steps
    checkpoint = DiffusionCheckpoint.from_train_state(state, config)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x67726964)
    ema = np.asarray(sample(checkpoint, key, side * side, batch_size=side * side))
    raw = np.asarray(sample(checkpoint, key, side * side, batch_size=side * side, weights="raw"))
    np.testing.assert_array_equal(first, ema)
    assert np.abs(first - raw).max() > 1e-3
    assert grid_path(str(tmp_path), 7) == str(tmp_path / "samples" / "step_000007.png")


class _Counter(NamedTuple):
    step: jax.Array


def test_grid_time_is_left_out_of_the_logged_images_per_s():
    """A hook that sleeps 0.2 s after every step: were it counted, 8 images per step could not exceed 40/s."""
    step_fn = jax.jit(lambda state: (_Counter(state.step + 1), {"loss": state.step * 0.0 + 1.0}))
    logger = MetricLogger(None, lambda fetched: {"loss": float(np.mean([m["loss"] for m in fetched]))})
    records, calls = [], []
    hook = Hook(1, lambda step, state: (calls.append(step), time.sleep(0.2)))
    final = run_training(_Counter(jax.numpy.int32(0)), step_fn, (), end=7, batch_size=8, logger=logger, log_every=3,
                         on_log=records.append, hooks=(hook,), progress=False)
    assert int(final.step) == 7 and calls == list(range(1, 8))
    assert [r["step"] for r in records] == [3, 6, 7]
    assert all(r["images_per_s"] > 200 for r in records[1:]), records


def test_compare_draws_several_runs_curves_on_one_figure(trained_tiny_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert compare.main(["--curves", str(trained_tiny_run), str(trained_tiny_run), "--labels", "a", "b",
                         "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 600
    assert compare.main(["--curves", str(trained_tiny_run), "--labels", "a", "b", "--out", str(out)]) == 2
    assert "give one per run" in capsys.readouterr().err
    assert compare.main(["--curves", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "config.json not found" in capsys.readouterr().err


def test_writing_events_imports_neither_tensorflow_nor_torch(tmp_path):
    code = ("import sys\nimport numpy as np\nfrom ddpm_jax.training.tensorboard import EventWriter\n"
            f"w = EventWriter({str(tmp_path)!r}, 10)\nw.start(0)\nw.scalars({{'step': 1, 'loss': 1.0}})\n"
            "w.image('samples', 1, np.zeros((4, 4), np.uint8))\nw.close()\n"
            "print(sorted(m for m in ('tensorflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1


def test_a_run_goes_on_without_event_files_when_tensorboard_is_missing(monkeypatch, tmp_path):
    config = get_config("tiny")
    assert tensorboard_lib.open_events(str(tmp_path), config) is not None
    monkeypatch.setattr(tensorboard_lib, "RecordWriter", None)
    assert tensorboard_lib.open_events(str(tmp_path), config) is None
    config.train.tensorboard = False
    monkeypatch.undo()
    assert tensorboard_lib.open_events(str(tmp_path), config) is None


@pytest.mark.parametrize("field, value", [("sample_every", -1), ("sample_grid_size", 0), ("sample_grid_size", 33),
                                                 ("sample_grid_steps", 0)])
def test_bad_grid_and_tensorboard_settings_are_refused_by_name(field, value):
    config = get_config("tiny")
    config.train[field] = value
    with pytest.raises(ValueError, match=f"train.{field}="):
        validate_config(config)


def test_every_preset_draws_about_ten_grids():
    for preset in ("cpu", "gpu", "quick", "seed", "ddpm", "cifar10"):
        train = get_config(preset).train
        assert 8 <= train.num_steps // train.sample_every <= 12, preset
    assert get_config("tiny").train.sample_every == 0
