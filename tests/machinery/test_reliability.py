"""A run that dies loses nothing; a bad step, flag, checkpoint or dataset gets a clear answer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ml_collections import FrozenConfigDict

import ddpm_jax
from ddpm_jax.training import checkpoint as ckpt_lib
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.configs import get_config, schedule_from_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.training.guard import NonFiniteLossError
from ddpm_jax.training import train as train_lib
from ddpm_jax.training.train import train_and_evaluate, train_step
from ddpm_jax.training.state import all_finite, clip_by_global_norm, global_norm
from ddpm_jax.training.loop import TrainingInterrupted
from ddpm_jax.cli import train as mnist

REPO = Path(__file__).resolve().parents[2]

# The killed run: long enough (about 5 ms a step) that there is time to kill it between and during saves.
RUN_FLAGS = ["--preset", "tiny", "--steps", "300", "--set", "train.checkpoint_every=50", "--set", "train.log_every=25",
             "--set", "train.keep_checkpoints=2", "--no-progress"]


def _start(idx_dir, workdir):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.mnist", "--idx-dir", str(idx_dir), "--workdir", str(workdir), *RUN_FLAGS],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _checkpoint_entries(workdir):
    try:
        return os.listdir(Path(workdir) / "checkpoints")
    except FileNotFoundError:
        return []


def _wait_and_signal(process, workdir, ready, sig, timeout=120):
    """Poll the checkpoint folder every millisecond; send ``sig`` as soon as ``ready(entries)`` holds."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        entries = _checkpoint_entries(workdir)
        if ready(entries):
            process.send_signal(sig)
            break
        time.sleep(0.001)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, entries, out + err


def _finished_steps(entries):
    return sorted(int(e) for e in entries if e.isdigit())


def _params(workdir):
    return jax.device_get(ddpm_jax.load_checkpoint(str(workdir)).params)


def _logged_steps(workdir):
    return [json.loads(line)["step"] for line in open(Path(workdir) / "metrics.jsonl")]


def test_killed_and_interrupted_runs_resume_to_the_uninterrupted_result_bit_for_bit(tmp_path, idx_dir):
    straight = _start(idx_dir, tmp_path / "straight")
    killed = tmp_path / "killed"

    # 1. SIGKILL as soon as the first checkpoint is being written (its temporary folder is all there is; should
    #    the save be too quick to see, right after it).
    code, entries, _ = _wait_and_signal(_start(idx_dir, killed), killed, lambda e: bool(e), signal.SIGKILL)
    assert code == -signal.SIGKILL, entries
    # 2. Ctrl-C once the resumed run has saved a checkpoint of its own: it saves where it stands, then stops.
    before = max(_finished_steps(_checkpoint_entries(killed)), default=0)
    code, _, output = _wait_and_signal(_start(idx_dir, killed), killed,
                                       lambda e: max(_finished_steps(e), default=0) > before, signal.SIGINT)
    assert code == 130, output
    assert "stopped by SIGINT after step" in output and "Rerun the same command to resume" in output
    interrupted_at = int(output.split("stopped by SIGINT after step ")[1].split(";")[0])
    assert interrupted_at in _finished_steps(_checkpoint_entries(killed))
    # 3. SIGKILL between saves, once the next run has saved one checkpoint of its own.
    next_save = (interrupted_at // 50 + 1) * 50
    code, _, output = _wait_and_signal(_start(idx_dir, killed), killed,
                                       lambda e: next_save in _finished_steps(e), signal.SIGKILL)
    assert code == -signal.SIGKILL, output
    assert f"resuming from step {interrupted_at}" in output
    # 4. The last run finishes the job.
    final = _start(idx_dir, killed)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, out + err
    assert straight.wait(timeout=300) == 0

    assert not any("tmp" in e for e in _checkpoint_entries(killed))  # leftovers of the killed save are gone
    expected, got = _params(tmp_path / "straight"), _params(killed)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    # Log lines of the killed runs past their last checkpoint were replaced, not duplicated.
    assert _logged_steps(killed) == _logged_steps(tmp_path / "straight") == list(range(25, 301, 25))
    assert (killed / "samples.png").read_bytes() == (tmp_path / "straight" / "samples.png").read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_at_the_current_step_before_stopping(tiny_config, tmp_path, images, sig):
    config = tiny_config(num_steps=100_000, checkpoint_every=100_000, log_every=1)
    metrics = tmp_path / "metrics.jsonl"

    def send_once_training():
        while not (metrics.exists() and metrics.stat().st_size):
            time.sleep(0.005)
        os.kill(os.getpid(), sig)

    handler_before = signal.getsignal(sig)
    threading.Thread(target=send_once_training, daemon=True).start()
    with pytest.raises(TrainingInterrupted) as info:
        train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    step = info.value.step
    assert 1 <= step < 100_000 and info.value.signum == sig
    assert str(step) in os.listdir(tmp_path / "checkpoints")
    assert ddpm_jax.load_checkpoint(str(tmp_path)).step == step
    assert signal.getsignal(sig) == handler_before  # the loop's handlers are gone again


def test_a_half_written_checkpoint_is_never_the_latest_and_is_cleaned_up(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=2, checkpoint_every=2)
    train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    # What a kill during the save of step 4 leaves: Orbax's temporary folder, partly written.
    shutil.copytree(tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1")
    manager = ckpt_lib.make_manager(str(tmp_path), config.train.keep_checkpoints)
    assert manager.latest_step() == 2
    manager.close()
    deadline = time.monotonic() + 30  # Orbax deletes leftovers in the background
    while len(os.listdir(tmp_path / "checkpoints")) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_a_nonfinite_step_changes_nothing_but_the_step_counter(tiny_config, images):
    config = tiny_config()
    state = create_train_state(config)
    batch = jnp.full((8, 28, 28, 1), jnp.nan)
    schedule = schedule_from_config(config)
    new_state, metrics = jax.jit(lambda s, b: train_step(s, b, schedule))(state, batch)
    assert not bool(metrics["finite"])
    assert int(new_state.step) == 1
    for field in ("params", "ema_params", "batch_stats", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(new_state, field), getattr(state, field))


def test_without_keep_last_good_a_nonfinite_step_returns_its_update_and_still_says_so(tiny_config):
    # What train() runs under on_nonfinite='stop': the run stops there, so the step spares the pass that keeps.
    config = tiny_config()
    state = create_train_state(config)
    schedule = schedule_from_config(config)
    new_state, metrics = jax.jit(lambda s, b: train_step(s, b, schedule, keep_last_good=False))(
        state, jnp.full((8, 28, 28, 1), jnp.nan))
    assert not bool(metrics["finite"]) and int(new_state.step) == 1
    assert not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(new_state.params))
    assert not train_lib.keeps_last_good(config) and train_lib.keeps_last_good(tiny_config(on_nonfinite="skip"))


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["kernel", "bias", "scalar", "odd"]), flat_index=st.integers(0, 10_000),
       value=st.sampled_from([np.inf, -np.inf, np.nan]), scale=st.floats(1e-30, 1e30))
def test_all_finite_finds_any_inf_or_nan_and_no_finite_value_trips_it(name, flat_index, value, scale):
    tree = {"kernel": jnp.full((3, 3, 4, 16), scale), "bias": jnp.full((16,), -scale), "scalar": jnp.asarray(scale),
            "odd": jnp.full((5, 7), np.finfo(np.float32).max), "count": jnp.asarray(3)}
    check = jax.jit(all_finite)
    assert bool(check(tree))
    leaf = tree[name]
    bad = {**tree, name: leaf.reshape(-1).at[flat_index % leaf.size].set(value).reshape(leaf.shape)}
    assert not bool(check(bad))


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.sampled_from([(), (3,), (16,), (5, 7), (3, 3, 2, 16), (64, 33)]), min_size=1, max_size=5),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 1e3]), max_norm=st.floats(0.1, 100.0))
def test_global_norm_and_its_clipping_are_optaxs_to_float32_rounding(shapes, seed, scale, max_norm):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    tree = [scale * jax.random.normal(k, shape) for k, shape in zip(keys, shapes)]
    np.testing.assert_allclose(global_norm(tree), optax.tree.norm(tree), rtol=1e-5)
    ours, _ = clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-30)


# lr 0 for the first step, then 1e30: step 2 makes the weights huge but finite, step 3's loss is NaN.
def _diverging(tiny_config, **train):
    return tiny_config(num_steps=8, checkpoint_every=1, keep_checkpoints=8, lr_schedule="constant", warmup_steps=2,
                 learning_rate=1e30, **train)


def test_a_nonfinite_loss_stops_naming_the_step_and_saves_nothing_it_cannot_vouch_for(tiny_config, tmp_path, images):
    with pytest.raises(NonFiniteLossError) as info:
        train_and_evaluate(_diverging(tiny_config), str(tmp_path), images=images, progress=False)
    # Step 2's weights are finite but give a NaN loss on the next batch: judged before saving, never saved.
    assert info.value.step == 3 and info.value.last_checkpoint == 1
    message = str(info.value)
    assert "non-finite training step 3" in message and "(step 1, loss" in message and "on_nonfinite=skip" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    checkpoint = ddpm_jax.load_checkpoint(str(tmp_path))
    assert checkpoint.step == 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(checkpoint.params)))


def test_skip_policy_skips_bad_batches_and_still_stops_a_diverged_run(tiny_config, tmp_path, images, capsys):
    config = _diverging(tiny_config, on_nonfinite="skip", max_consecutive_skips=3)
    with pytest.raises(NonFiniteLossError, match="4 bad steps in a row") as info:
        train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    assert info.value.step == 6
    out = capsys.readouterr().out
    assert out.count("batch skipped, weights unchanged") == 3
    # Step 2's weights give NaN on every batch after it: the skipped steps keep them, and no save vouches for them.
    assert out.count("not saved: its loss on the next batch is nan") == 4
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def test_cli_exits_3_on_a_nonfinite_loss(tmp_path, idx_dir, capsys):
    code = mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(tmp_path), "--steps", "8",
                       "--set", "train.checkpoint_every=1", "--set", "train.lr_schedule=constant",
                       "--set", "train.warmup_steps=2", "--lr", "1e30", "--no-progress"])
    assert code == mnist.EXIT_NONFINITE
    assert capsys.readouterr().err.startswith("error: non-finite training step 3")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", "diffusion.num_timesteps=0"], "diffusion.num_timesteps=0"),
        (["--set", "diffusion.schedule=linear", "--set", "diffusion.beta_end=1.5"], "beta_end < 1, got beta_start=0.0001, beta_end=1.5"),
        (["--set", "diffusion.schedule=linear", "--set", "diffusion.beta_start=0.0"], "0 < beta_start"),
        (["--set", "diffusion.max_beta=1.0"], "max_beta"),
        (["--set", "train.log_every=0"], "train.log_every=0"),
        (["--set", "train.checkpoint_every=-5"], "train.checkpoint_every=-5"),
        (["--set", "train.on_nonfinite=ignore"], "stop or skip"),
        (["--set", "train.lr_schedule=step"], "constant, cosine"),
        (["--set", "sampling.variance=large"], "beta or beta_tilde"),
        (["--set", "data.image_size=30", "--set", "model.levels=2"], "divisible by 2**model.levels=4"),
        (["--set", "model.levels=0"], "model.levels=0"),
        (["--set", "model.conv_impl=fast"], "auto, xla, matmul"),
    ],
)
def test_each_bad_config_value_gets_one_line_naming_field_value_and_allowed(flags, message, capsys, tmp_path):
    assert mnist.main(["--preset", "tiny", "--workdir", str(tmp_path)] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "checkpoints").exists()


def test_an_unknown_flag_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mnist.parse_args(["--stepz", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err


def test_a_workdir_trained_on_other_data_is_refused_not_resumed(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=2)
    train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    with pytest.raises(ValueError, match="trained on other data"):
        train_and_evaluate(tiny_config(num_steps=4), str(tmp_path), images=255 - images, progress=False)
    assert ddpm_jax.load_checkpoint(str(tmp_path)).step == 2


def test_restoring_into_another_model_names_the_arrays_that_differ(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=1)
    train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    other = tiny_config(num_steps=1)
    other.model.base_channels = 8
    manager = ckpt_lib.make_manager(str(tmp_path), config.train.keep_checkpoints)
    with pytest.raises(ValueError, match=r"does not fit the model this config builds: params/ConvTranspose_0/bias: "
                                         r"saved \(4,\), this config's model \(8,\)"):
        ckpt_lib.restore_state(manager, 1, create_train_state(other))
    manager.close()


def test_sampling_params_of_another_config_names_the_arrays_that_differ(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=1)
    train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    loaded = ddpm_jax.load_checkpoint(str(tmp_path))
    other = get_config("tiny")
    other.model.levels = 2
    mismatched = DiffusionCheckpoint(loaded.params, loaded.batch_stats, FrozenConfigDict(other.to_dict()), loaded.step)
    with pytest.raises(ValueError, match=r"do not fit the network their config describes \(model.base_channels=4, "
                                         r"model.levels=2, data.image_size=28\): params/ConvTranspose_0/bias: saved \(4,\), "
                                         r"this config's model \(8,\)"):
        ddpm_jax.sample(mismatched, jax.random.PRNGKey(0), 2)


def test_same_seed_and_config_give_the_same_weights_and_samples(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=3)
    runs = [train_and_evaluate(config, str(tmp_path / name), images=images, progress=False)
            for name in ("a", "b")]
    jax.tree.map(np.testing.assert_array_equal, runs[0].params, runs[1].params)
    first, second = (ddpm_jax.sample(ddpm_jax.load_checkpoint(str(tmp_path / n)), jax.random.PRNGKey(7), 4)
                     for n in ("a", "b"))
    np.testing.assert_array_equal(first, second)
