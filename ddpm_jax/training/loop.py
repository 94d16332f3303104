"""One training loop for every network here, and its machinery.

:func:`run_training` steps a jitted ``step_fn(state, *data) -> (state, metrics)`` from
``start`` to ``end``; around it, as each caller asks: metric logging (:class:`MetricLogger`,
JSONL lines summed on the host between log points), the NaN and divergence guard
(:class:`ddpm_jax.training.guard.NonFiniteGuard`), stop signals (Ctrl-C or SIGTERM finish the step,
save, and raise :class:`TrainingInterrupted`), periodic checkpoints judged before they are
saved, and a progress bar. The diffusion model (:mod:`ddpm_jax.training.train`), the noise-aware
classifier (:mod:`ddpm_jax.training.noisy_classifier_training`) and the feature network
(:mod:`ddpm_jax.evaluation.feature_network`) all train through it; resuming is
:func:`ddpm_jax.training.checkpoint.restore_latest`.

Also here: :func:`batch_indices`, the epoch-wise shuffle every step function draws its
batch with inside jit, and the quarters of the timestep range that losses and
accuracies are reported by.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from ddpm_jax.training import checkpoint as ckpt_lib
from ddpm_jax.training.guard import NonFiniteGuard
from ddpm_jax.training.manifest import finish_manifests
from ddpm_jax.utils.progress import progress_bar

# Losses and accuracies are also reported per quarter of the timestep range [0, T).
NUM_QUARTERS = 4


def quarter_of(t: jnp.ndarray, num_timesteps: int) -> jnp.ndarray:
    """Which quarter of ``[0, T)`` each timestep lies in: ``t * 4 // T``."""
    return t * NUM_QUARTERS // num_timesteps


def timestep_quarters(num_timesteps: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each quarter: the t with ``t * 4 // T == q`` (empty when T < 4)."""
    bounds = [-(-q * num_timesteps // NUM_QUARTERS) for q in range(NUM_QUARTERS + 1)]  # ceil(q T / 4)
    return [(bounds[q], bounds[q + 1]) for q in range(NUM_QUARTERS)]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return num_examples // batch_size


class EpochOrder(NamedTuple):
    """An epoch's permutation of the training set, computed once (:class:`EpochOrders`) and handed to
    every step of that epoch: ``jax.random.permutation`` of 60,000 items costs about 50 ms on a
    2-core CPU, as much as a small network's whole train step. ``key`` is the raw data key it was
    drawn with, ``epoch`` an int32 scalar, ``permutation`` int32 ``(N,)``."""

    key: jnp.ndarray
    epoch: jnp.ndarray
    permutation: jnp.ndarray


def _raw_key(key: jax.Array) -> jnp.ndarray:
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def epoch_permutation(key: jax.Array, num_examples: int, epoch) -> jnp.ndarray:
    """Epoch ``epoch``'s order of ``num_examples`` items: a permutation drawn with ``fold_in(key, epoch)``."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def batch_indices(key: jax.Array, num_examples: int, step: jnp.ndarray, batch_size: int,
                  order: EpochOrder | None = None) -> jnp.ndarray:
    """Indices of the ``step``-th batch of an epoch-wise shuffled pass over ``num_examples`` items.

    Every epoch is a fresh permutation (:func:`epoch_permutation`) cut into
    ``num_examples // batch_size`` full batches; the leftover items of that
    permutation are skipped, so every batch has the same shape and nothing
    recompiles. The batch depends only on ``(key, step)``: a resumed run sees
    the same data order. ``order``: this epoch's permutation computed beforehand
    (:class:`EpochOrders`); one drawn for another key or epoch is not used (the
    permutation is drawn here instead), so it can make a step faster, never different.
    """
    epoch, position = divmod(step, steps_per_epoch(num_examples, batch_size))
    if order is None:
        perm = epoch_permutation(key, num_examples, epoch)
    else:
        fits = jnp.logical_and(order.epoch == epoch, jnp.all(order.key == _raw_key(key)))
        perm = jax.lax.cond(fits, lambda: order.permutation, lambda: epoch_permutation(key, num_examples, epoch))
    return jax.lax.dynamic_slice_in_dim(perm, position * batch_size, batch_size)


class EpochOrders:
    """The :class:`EpochOrder` for each step of a run, drawn once per epoch outside the step.

    ``key``: the data key the step draws its batches with; ``sharding``: where the step wants
    its arguments (e.g. replicated over the data mesh).
    """

    def __init__(self, key: jax.Array, num_examples: int, batch_size: int, sharding=None):
        self.key = key
        self.per_epoch = steps_per_epoch(num_examples, batch_size)
        self._draw = jax.jit(
            lambda key, epoch: EpochOrder(_raw_key(key), epoch, epoch_permutation(key, num_examples, epoch)),
            out_shardings=sharding)
        self._epoch, self._order = None, None

    def at(self, step: int) -> EpochOrder:
        """The order the ``step``-th step (0-based, as ``state.step`` before it) draws its batch from."""
        epoch = step // self.per_epoch
        if epoch != self._epoch:
            self._order, self._epoch = self._draw(self.key, jnp.asarray(epoch, jnp.int32)), epoch
        return self._order


class MetricLogger:
    """Collects step metrics (device arrays) between log points and writes one JSONL line per point.

    ``summarize(fetched)`` turns the fetched metrics of the steps since the last line into
    the line's fields (``loss`` first); ``path=None`` writes no file.
    """

    def __init__(self, path: str | None, summarize: Callable[[list[dict]], dict]):
        self.path, self.summarize = path, summarize
        self._pending: list[dict] = []

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run rewrites what a killed one logged after its last checkpoint.

        Every record of a step up to ``step`` is kept, wherever it stands in the file. A line that is
        not a record (cut short by a kill, blank, edited by hand) is never deleted: it is moved to
        ``metrics.jsonl.unreadable`` beside the log, with a line saying so.
        """
        if self.path is None or not os.path.exists(self.path):
            return
        with open(self.path, errors="replace") as f:
            lines = f.readlines()
        kept, unreadable = [], []
        for line in lines:
            if not line.strip():
                continue  # a blank line holds nothing to keep
            try:
                record_step = json.loads(line)["step"]
                if isinstance(record_step, bool) or not isinstance(record_step, (int, float)):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                unreadable.append(line if line.endswith("\n") else line + "\n")
                continue
            if record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if unreadable:
            side = self.path + ".unreadable"
            with open(side, "a") as f:
                f.writelines(unreadable)
            print(f"moved {len(unreadable)} unreadable line(s) of {self.path} to {side}", flush=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)  # a kill during the rewrite leaves the old log, not half of it

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)  # device arrays; fetched together at flush

    def flush(self, step: int, extra: dict) -> dict:
        fetched = jax.device_get(self._pending)
        self._pending = []
        record = {"step": step, **self.summarize(fetched), **extra}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


@dataclasses.dataclass(frozen=True)
class Hook:
    """Work on the state between steps: ``fn(step, state)`` after every ``every``-th step (``every`` 0: never).

    What a sample grid during training is (:class:`ddpm_jax.evaluation.previews.SampleGrids`). Its time is left
    out of the logged ``images_per_s``, which stays the training's own speed.
    """

    every: int
    fn: Callable[[int, object], None]

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM reached the training loop, which saved a checkpoint at ``step`` and stopped."""

    def __init__(self, signum: int, step: int, checkpoint_dir: str | None, saved_step: int | None = None):
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        saved_step = step if saved_step is None and checkpoint_dir else saved_step
        where = (f"checkpoint saved in {checkpoint_dir}" if saved_step == step else
                 f"the latest good checkpoint is step {saved_step} in {checkpoint_dir}" if checkpoint_dir else
                 "no good checkpoint could be saved")
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where}. Rerun the same "
                         "command to resume.")


class StopSignals:
    """Within ``with``, SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) set ``signum`` instead of
    killing the process, so the loop can finish its step and save first; or, with ``on_signal``, call it
    with the signal's number (which may raise, to stop work that has nothing to save). Outside the main
    thread (where Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_signal: Callable[[int], None] | None = None):
        self._on_signal = on_signal

    def __enter__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self._on_signal is not None:
            self.signum = signum
            self._on_signal(signum)
            return
        if self.signum is None:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping", flush=True)
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


class _NoSignals:
    signum = None


def _past(deadline: float | None, done: int, log_every: int) -> bool:
    """Whether the loop's time is up after step ``done``. One process asks its own clock after every
    step; several processes ask process 0's at log steps only, so that all of them stop at the same step."""
    if deadline is None:
        return False
    if jax.process_count() == 1:
        return time.perf_counter() >= deadline
    if log_every < 1 or done % log_every:
        return False
    return bool(multihost_utils.broadcast_one_to_all(time.perf_counter() >= deadline))


def run_training(
    state,
    step_fn: Callable,
    data: tuple,
    *,
    end: int,
    batch_size: int,
    logger: MetricLogger | None = None,
    log_every: int = 0,
    log_fields: Callable[[int], dict] = lambda done: {},
    manager=None,
    config_record: dict | None = None,
    checkpoint_every: int = 0,
    guard: NonFiniteGuard | None = None,
    probe_fn: Callable | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
    hooks: tuple[Hook, ...] = (),
    postfix: Callable[[dict, float | None], dict] | None = None,
    progress: bool = True,
    desc: str = "training",
    smoothing: float = 0.1,
    is_main: bool = True,
    orders: EpochOrders | None = None,
    time_limit: float | None = None,
):
    """Step ``state`` with ``step_fn(state, *data)`` from its ``step`` to ``end``; return the last state.

    With ``time_limit`` (seconds), the loop also ends after the first step that finishes that long
    after the loop began, saving a checkpoint there as at ``end``: a time-boxed run that the same
    call resumes. The returned state's ``step`` says where it stopped.

    With ``orders`` (:class:`EpochOrders`), ``step_fn`` and ``probe_fn`` also get the epoch's order
    of the step they draw a batch for: ``step_fn(state, *data, order)``.

    Args:
      logger: writes a line every ``log_every`` steps and at ``end``: its summary of the steps
        since the last line, then ``log_fields(done)``, ``images_per_s`` (from ``batch_size``) and
        ``first_step_seconds`` (the first step, compile included; on the first line only).
      manager: with ``config_record`` (the config as a dict, as :func:`ddpm_jax.training.checkpoint.save`
        takes it), saves the state every ``checkpoint_every`` steps, at ``end`` and on a stop
        signal (:class:`StopSignals`, then :class:`TrainingInterrupted`); closed
        when the loop ends, its last save completed and given its manifest. None: no
        checkpoints and no signal handling.
      guard: judges every step's metrics (their ``finite`` and ``loss``) and, with ``probe_fn(state,
        *data)``, every state before it is saved: a failing one is not saved, and the guard raises.
      on_step: called with ``(step, metrics)`` after every step (metrics still on the device).
      on_log: called with every line the logger writes (e.g. :meth:`ddpm_jax.training.tensorboard.EventWriter.scalars`).
      hooks: :class:`Hook` s, each called with ``(step, state)`` after its every-th step, once the step is
        logged and saved (on the main process only).
      postfix: the progress bar's fields from a logged line and the rate.
      is_main: the process that writes files and logs (several processes run the same loop).
    """
    start = int(state.step)
    bar = None
    if progress and is_main and start < end:
        bar = progress_bar(total=end, initial=start, unit="step", desc=desc, dynamic_ncols=True, smoothing=smoothing)
    last_time, last_step = time.perf_counter(), start
    deadline = None if time_limit is None else last_time + time_limit
    compile_seconds = None
    stops = StopSignals() if manager is not None else contextlib.nullcontext(_NoSignals())
    try:
        with stops as stop:
            for step in range(start, end):
                extra = () if orders is None else (orders.at(step),)
                state, metrics = step_fn(state, *data, *extra)
                done = step + 1
                out_of_time = _past(deadline, done, log_every)
                if guard is not None:
                    guard.push(done, metrics)  # checks the step before this one, which has finished by now
                if logger is not None and is_main:
                    logger.add(metrics)
                if on_step is not None:
                    on_step(done, metrics)
                if compile_seconds is None:
                    jax.block_until_ready(metrics["loss"])
                    compile_seconds = time.perf_counter() - last_time
                    last_time, last_step = time.perf_counter(), done
                if logger is not None and is_main and (done % log_every == 0 or done == end or out_of_time):
                    if guard is not None:
                        guard.drain()
                    now = time.perf_counter()
                    rate = (done - last_step) * batch_size / max(now - last_time, 1e-9) if done > last_step else None
                    record = logger.flush(done, {
                        **log_fields(done),
                        "images_per_s": rate,
                        "first_step_seconds": compile_seconds if last_step == start + 1 else None,
                    })
                    last_time, last_step = now, done
                    if on_log is not None:
                        on_log(record)
                    if bar is not None and postfix is not None and record["loss"] is not None:
                        bar.set_postfix(**postfix(record, rate))
                if manager is not None and (done % checkpoint_every == 0 or done == end or out_of_time
                                            or stop.signum is not None):
                    good, loss = True, None
                    if guard is not None and probe_fn is not None:
                        # Only a state known good is saved: every array finite, its loss on the next batch sane.
                        extra = () if orders is None else (orders.at(done),)
                        good, loss = guard.judge_checkpoint(done, probe_fn(state, *data, *extra))
                    if good:
                        ckpt_lib.save(manager, state, config_record, loss=loss)
                for hook in hooks:
                    if is_main and hook.due(done) and stop.signum is None:
                        jax.block_until_ready(metrics["loss"])  # the steps dispatched so far count as training
                        began = time.perf_counter()
                        hook.fn(done, state)
                        last_time += time.perf_counter() - began  # the rate stays the training's own
                if bar is not None:
                    bar.update(1)
                if stop.signum is not None:
                    manager.wait_until_finished()
                    latest = manager.latest_step()
                    raise TrainingInterrupted(stop.signum, done, None if latest is None else
                                              ckpt_lib.step_directory(manager, latest), latest)
                if out_of_time:
                    break
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.wait_until_finished()  # a save already under way completes: the latest checkpoint stays whole
            if is_main:
                finish_manifests(manager.directory)
            manager.close()
    return state
