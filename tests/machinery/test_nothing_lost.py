"""What a run that goes wrong gets (docs/reliability.md): a guard that protects checkpoints, verified checkpoints with a fallback, a workdir
lock, an evaluation cache that cannot go stale, and bad inputs that end in one `error:` line, exit 2."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddpm_jax
from ddpm_jax.training import checkpoint as ckpt_lib
from ddpm_jax.training import manifest as manifest_lib
from ddpm_jax.configs import schedule_from_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.training.guard import NonFiniteGuard, NonFiniteLossError, TrainingDivergedError
from ddpm_jax.training.train import summarize_steps, train_and_evaluate, train_step
from ddpm_jax.training.loop import MetricLogger
from ddpm_jax.training.workdir import WorkdirBusyError, WorkdirLock, prepare_workdir
from ddpm_jax.cli import evaluate
from ddpm_jax.cli import train as mnist

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def trained(trained_tiny_run):
    return trained_tiny_run


def _copy(trained, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(trained, target)
    return target


# ---- the guard judges the update, and saves only states known good ----

def test_a_learning_rate_that_is_not_a_finite_positive_number_is_refused_before_compute(tmp_path, idx_dir, capsys):
    for lr in ("nan", "inf", "-inf", "0", "-1e-3"):
        workdir = tmp_path / lr
        assert mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(workdir), f"--lr={lr}",
                           "--no-progress"]) == 2, lr
        err = capsys.readouterr().err
        assert err.startswith("error: train.learning_rate=") and err.count("\n") == 1, err
        assert not (workdir / "checkpoints").exists()


def test_an_update_that_makes_weights_nonfinite_is_dropped_even_when_loss_and_gradient_are_finite(tiny_config):
    config = tiny_config()
    state = create_train_state(config)
    state = state.replace(tx=optax.adam(float("nan")))  # what --lr nan did before it was refused up front
    state = state.replace(opt_state=state.tx.init(state.params))
    batch = jax.random.uniform(jax.random.PRNGKey(0), (8, 28, 28, 1), minval=-1, maxval=1)
    new_state, metrics = jax.jit(lambda s, b: train_step(s, b, schedule_from_config(config)))(state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"])
    jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)


def test_a_huge_learning_rate_never_leaves_a_checkpoint_with_exploded_weights(tiny_config, tmp_path, images):
    config = tiny_config(num_steps=8, checkpoint_every=1, keep_checkpoints=8, lr_schedule="constant",
                         warmup_steps=0, learning_rate=1e6)
    with pytest.raises((TrainingDivergedError, NonFiniteLossError)) as info:
        train_and_evaluate(config, str(tmp_path), images=images, progress=False)
    message = str(info.value)
    assert "lower --lr" in message
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    # Whatever was saved is as good as the start: its weights are of the size of the initial ones.
    initial = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(create_train_state(config).params))
    for step in steps:
        params = ddpm_jax.load_checkpoint(str(tmp_path), step=step).params
        assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(params)) < 10 * initial + 1, step
    assert info.value.last_checkpoint == (steps[-1] if steps else None)


def test_the_divergence_rule_stops_at_a_loss_many_times_the_running_median():
    guard = NonFiniteGuard("stop", 0, divergence_factor=10.0, divergence_window=5)
    ok = {"finite": True, "grad_norm": 1.0}
    for step, loss in enumerate([1.0, 0.8, 0.9, 0.7, 0.5, 3.0], start=1):  # 3.0 is 4x the median: fine
        guard.push(step, {**ok, "loss": loss})
    guard.drain()
    guard.push(7, {**ok, "loss": 9.5})
    with pytest.raises(TrainingDivergedError, match=r"divergence_factor=10 times the median 0\.8 of the last 5"):
        guard.drain()
    off = NonFiniteGuard("stop", 0, divergence_factor=0.0)
    for step, loss in enumerate([1.0, 1e9], start=1):
        off.push(step, {**ok, "loss": loss})
    off.drain()


def test_metrics_truncation_keeps_every_record_up_to_the_checkpoint_and_moves_unreadable_lines_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": 1}), "", json.dumps({"step": 2}), "{cut short", json.dumps({"step": 3}),
             json.dumps({"step": 4}), json.dumps({"nostep": 1}), json.dumps({"step": 2.5})]
    path.write_text("\n".join(lines) + "\n")
    MetricLogger(str(path), summarize_steps).truncate_after(3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 2.5]
    side = (tmp_path / "metrics.jsonl.unreadable").read_text().splitlines()
    assert side == ["{cut short", json.dumps({"nostep": 1})]


# ---- checksums, verification and fallback ----

def _latest_data_file(workdir: Path, step: int = 4) -> Path:
    files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)  # the array data, not a small metadata file


def test_every_finalized_checkpoint_has_a_manifest_whose_digest_is_its_identity(trained):
    for step in (2, 4):
        step_dir = trained / "checkpoints" / str(step)
        manifest = json.loads((step_dir / "manifest.json").read_text())
        assert manifest["identity"] == manifest_lib.verify_checkpoint(str(step_dir))
        assert "state/_METADATA" in manifest["files"] or any(f.startswith("state/") for f in manifest["files"])
        assert np.isfinite(manifest["loss"])
    assert ddpm_jax.load_checkpoint(str(trained)).identity == json.loads(
        (trained / "checkpoints" / "4" / "manifest.json").read_text())["identity"]


def _flip_a_bit(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped bit": lambda run: _flip_a_bit(_latest_data_file(run)),
    "truncated data": lambda run: _latest_data_file(run).write_bytes(_latest_data_file(run).read_bytes()[:10]),
    "random bytes": lambda run: _latest_data_file(run).write_bytes(os.urandom(_latest_data_file(run).stat().st_size)),
    "no config/metadata": lambda run: (run / "checkpoints" / "4" / "config" / "metadata").unlink(),
    "no config": lambda run: shutil.rmtree(run / "checkpoints" / "4" / "config"),
    "no state": lambda run: shutil.rmtree(run / "checkpoints" / "4" / "state"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_skipped_by_load_checkpoint_and_refused_by_step(trained, tmp_path, damage,
                                                                                       capsys, snapshot):
    run = _copy(trained, tmp_path)
    DAMAGE[damage](run)
    before = snapshot(run)
    loaded = ddpm_jax.load_checkpoint(str(run))
    assert loaded.step == 2
    err = capsys.readouterr().err
    assert "skipping the checkpoint at step 4" in err and err.count("\n") == 1
    with pytest.raises(ckpt_lib.CheckpointDamagedError, match="step 4 .* is damaged"):
        ddpm_jax.load_checkpoint(str(run), step=4)
    assert snapshot(run) == before  # loading moves nothing


def test_resuming_over_a_damaged_checkpoint_moves_it_aside_and_resumes_from_the_newest_intact_one(
        trained, tmp_path, idx_dir, capsys, snapshot):
    run = _copy(trained, tmp_path)
    _flip_a_bit(_latest_data_file(run))
    damaged_files = snapshot(run / "checkpoints" / "4")
    assert mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(run), "--steps", "4",
                       "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "the checkpoint at step 4 is damaged" in out.err and "resuming from step 2" in out.out
    (moved,) = list((run / "damaged_checkpoints").iterdir())
    assert moved.name.startswith("4-") and snapshot(moved) == damaged_files  # kept byte for byte
    # The resumed run rewrote step 4 from step 2: bit for bit the pristine run's step 4.
    jax.tree.map(np.testing.assert_array_equal, ddpm_jax.load_checkpoint(str(run)).params,
                 ddpm_jax.load_checkpoint(str(trained), step=4).params)


# ---- the workdir lock ----

def _hold_lock(directory: Path):
    code = ("import sys, time; from ddpm_jax.training.workdir import WorkdirLock; "
            "l = WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_on_a_workdir_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(
        trained, tmp_path, idx_dir, capsys, snapshot):
    run = _copy(trained, tmp_path)
    holder = _hold_lock(run)
    try:
        before = snapshot(run)
        assert mnist.main(["--preset", "tiny", "--idx-dir", str(idx_dir), "--workdir", str(run), "--steps", "6",
                           "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"process {holder.pid} is training there" in err and err.count("\n") == 1
        assert snapshot(run) == before
    finally:
        holder.kill()  # SIGKILL: no chance to unlock; the kernel drops the lock
        holder.wait()
    with WorkdirLock(str(run)):
        pass


def test_the_lock_refuses_a_second_holder_in_the_same_process_too(tmp_path):
    with WorkdirLock(str(tmp_path), what="training"):
        with pytest.raises(WorkdirBusyError, match=f"process {os.getpid()} is training there"):
            WorkdirLock(str(tmp_path)).acquire()


@pytest.mark.parametrize("kind", ["empty", "blank", "a file", "under /proc", "under a file"])
def test_a_workdir_that_cannot_hold_a_run_is_one_error_line(tmp_path, kind, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("precious")
    (tmp_path / "a_file").write_text("precious")
    workdir = {"empty": "", "blank": "  ", "a file": str(tmp_path / "a_file"), "under /proc": "/proc/ddpm_jax_run",
               "under a file": str(tmp_path / "a_file" / "run")}[kind]
    assert mnist.main(["--preset", "tiny", "--workdir", workdir, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workdir") and err.count("\n") == 1, err
    assert (tmp_path / "config.json").read_text() == "precious" and (tmp_path / "a_file").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "config.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_workdir_is_one_error_line(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot write there"):
            prepare_workdir(str(tmp_path / "run"))
    finally:
        tmp_path.chmod(0o755)


# ---- bad values of flags and fields: one line, exit 2, before compute ----

@pytest.mark.parametrize("flags, names", [
    (["--epochs", "nan"], "--epochs"), (["--epochs", "inf"], "--epochs"), (["--epochs", "0"], "--epochs"),
    (["--epochs", "-1"], "--epochs"), (["--seed", str(2**64)], "seed="), (["--steps", "0"], "train.num_steps"),
    (["--steps", str(2**40)], "train.num_steps"), (["--batch-size", "0"], "train.batch_size"),
    (["--set", "model.time_embed_dim=0"], "model.time_embed_dim"),
    (["--set", "model.time_embed_dim=7"], "model.time_embed_dim"),
    (["--preset", "ddpm", "--set", "model.num_heads=0"], "model.num_heads"),
    (["--preset", "ddpm", "--set", "model.num_heads=3"], "model.num_heads"),
    (["--preset", "ddpm", "--set", "model.channel_mult=(1,'a',2)"], "model.channel_mult"),
    (["--preset", "ddpm", "--set", "model.norm_groups=5"], "model.norm_groups"),
    (["--set", "sampling.grid_size=0"], "sampling.grid_size"), (["--set", "sampling.strip_every=0"], "sampling.strip_every"),
    (["--set", "sampling.guidance_scale=1e999"], "sampling.guidance_scale"),
    (["--set", "train.batch_size=True"], "train.batch_size"), (["--set", "model.base_channels=100000"], "model.base_channels"),
    (["--set", "train.divergence_factor=0.5"], "train.divergence_factor"),
    (["--set", "diffusion.num_timesteps=1000000000"], "diffusion.num_timesteps"),
])
def test_named_bad_inputs_get_one_error_line_naming_the_field_and_exit_2(flags, names, tmp_path, capsys):
    argv = ["--workdir", str(tmp_path / "run"), "--no-progress"] + ([] if "--preset" in flags else ["--preset", "tiny"])
    assert mnist.main(argv + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and names in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sample_refuses_nonfinite_eta_accepts_numpy_numbers_and_refuses_what_cannot_fit(trained):
    checkpoint = ddpm_jax.load_checkpoint(str(trained))
    key = jax.random.PRNGKey(0)
    for eta in (float("inf"), float("nan"), -0.5, np.float32("inf")):
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            ddpm_jax.sample(checkpoint, key, 2, method="ddim", eta=eta)
    a = ddpm_jax.sample(checkpoint, key, 2, method="ddim", eta=np.float32(0.5), steps=np.int64(5))
    b = ddpm_jax.sample(checkpoint, key, np.int32(2), method="ddim", eta=0.5, steps=5)
    np.testing.assert_array_equal(a, b)
    start = time.monotonic()
    with pytest.raises(ValueError, match="GiB for its results.*stream to disk"):
        ddpm_jax.sample(checkpoint, key, 10**9)
    assert time.monotonic() - start < 5


def test_evaluate_refuses_a_nonfinite_eta(trained, tmp_path, capsys):
    assert evaluate.main(["--workdir", str(trained), "--method", "ddim", "--eta", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --eta nan") and err.count("\n") == 1


def test_a_traceback_never_reaches_a_user_of_the_cli_processes(tmp_path, trained):
    """Whole processes, for what in-process calls cannot see (exit paths, threads, atexit)."""
    cases = [
        ["experiments.mnist", "--preset", "tiny", "--workdir", "", "--no-progress"],
        ["experiments.mnist", "--preset", "tiny", "--workdir", str(tmp_path / "r"), "--lr", "nan"],
        ["experiments.evaluate", "--workdir", str(trained), "--method", "ddim", "--eta", "inf"],
    ]
    for argv in cases:
        out = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (argv, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.startswith("error: "), (argv, out.stderr)
