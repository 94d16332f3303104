"""The NaN and divergence guard: judges every step and every state before it is saved.

A training loop pushes each step's metrics into :class:`NonFiniteGuard`, which judges
them one step behind (so the host waits on the device only at log and checkpoint
points), and asks :meth:`NonFiniteGuard.judge_checkpoint` before every save. What it
raises names the last good checkpoint and the loss it was saved with.
"""

from __future__ import annotations

import jax
import numpy as np

from ddpm_jax.training import checkpoint as ckpt_lib
from ddpm_jax.training.manifest import finish_manifests


def _last_good(last_checkpoint: int | None, last_loss: float | None) -> str:
    if last_checkpoint is None:
        return "no checkpoint had been saved yet. Rerun with a lower --lr"
    loss = f", loss {last_loss:.4g} when saved" if last_loss is not None else ""
    return (f"the latest checkpoint (step {last_checkpoint}{loss}) is known good and untouched. To continue from "
            "it, rerun with a lower --lr (the same command meets the same batch again)")


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or Inf loss or gradient, or an update that would leave a NaN or Inf in the state
    (``step``: the update that would have produced that step). Nothing after it was saved."""

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint: int | None, consecutive: int = 1,
                 last_loss: float | None = None):
        self.step, self.last_checkpoint = step, last_checkpoint
        streak = f" ({consecutive} bad steps in a row)" if consecutive > 1 else ""
        super().__init__(
            f"non-finite training step {step}{streak}: loss {loss}, gradient norm {grad_norm} (or the update made a "
            f"weight or Adam moment NaN/Inf). Training stopped without applying it; "
            f"{_last_good(last_checkpoint, last_loss)}, or with --set train.on_nonfinite=skip to skip such batches."
        )


class TrainingDivergedError(RuntimeError):
    """A loss many times the running median of recent losses (``train.divergence_factor``): the weights
    that produced it are not saved, and training stops."""

    def __init__(self, step: int, loss: float, median: float, factor: float, window: int,
                 last_checkpoint: int | None, last_loss: float | None = None, at_checkpoint: bool = False):
        self.step, self.last_checkpoint = step, last_checkpoint
        where = (f"the weights of step {step}, about to be saved, give loss {loss:.4g} on the next batch"
                 if at_checkpoint else f"training step {step} has loss {loss:.4g}")
        super().__init__(
            f"training diverged: {where}, more than train.divergence_factor={factor:g} times the median "
            f"{median:.4g} of the last {window} training losses. Training stopped without saving them; "
            f"{_last_good(last_checkpoint, last_loss)}, or turn this check off with "
            "--set train.divergence_factor=0."
        )


class NonFiniteGuard:
    """Judges each step one step behind the loop, so the host never waits on the device except at log and
    checkpoint points (:meth:`drain`), and judges each state before it is saved (:meth:`judge_checkpoint`).

    A non-finite step (``finite`` metric False): ``'stop'`` raises :class:`NonFiniteLossError` at the first;
    ``'skip'`` reports it and goes on (the step already dropped its update), until more than
    ``max_consecutive`` bad steps in a row. A finite loss more than ``divergence_factor`` times the median of
    the last ``divergence_window`` good losses raises :class:`TrainingDivergedError` (the update is already
    applied, so there is nothing to skip); ``divergence_factor=0`` turns that rule off.
    """

    def __init__(self, policy: str, max_consecutive: int, manager=None, divergence_factor: float = 0.0,
                 divergence_window: int = 200):
        self.policy, self.max_consecutive, self.manager = policy, max_consecutive, manager
        self.divergence_factor, self.divergence_window = divergence_factor, divergence_window
        self._pending: list[tuple[int, dict]] = []
        self._recent: list[float] = []
        self.consecutive = 0

    def push(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))
        while len(self._pending) > 1:
            self._check(*self._pending.pop(0))

    def drain(self) -> None:
        while self._pending:
            self._check(*self._pending.pop(0))

    def _last(self) -> tuple[int | None, float | None]:
        if self.manager is None:
            return None, None
        self.manager.wait_until_finished()  # a save under way is the last good checkpoint once it is whole
        if jax.process_index() == 0:
            finish_manifests(self.manager.directory)
        step = self.manager.latest_step()
        return step, ckpt_lib.checkpoint_loss(self.manager, step)

    def _diverged(self, loss: float) -> float | None:
        """The running median ``loss`` exceeds ``divergence_factor`` times, or None."""
        if not self.divergence_factor or not self._recent:
            return None
        median = float(np.median(self._recent))
        return median if loss > self.divergence_factor * median else None

    def _check(self, step: int, metrics: dict) -> None:
        if bool(metrics["finite"]):
            self.consecutive = 0
            loss = float(metrics["loss"])
            median = self._diverged(loss)
            if median is not None:
                self._pending.clear()
                raise TrainingDivergedError(step, loss, median, self.divergence_factor, len(self._recent),
                                            *self._last())
            self._recent = (self._recent + [loss])[-self.divergence_window:]
            return
        self.consecutive += 1
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if self.policy == "skip" and self.consecutive <= self.max_consecutive:
            print(f"step {step}: loss {loss}, gradient norm {grad_norm}: batch skipped, weights unchanged "
                  f"(train.on_nonfinite=skip; {self.consecutive} in a row)", flush=True)
            return
        self._pending.clear()
        last_checkpoint, last_loss = self._last()
        raise NonFiniteLossError(step, loss, grad_norm, last_checkpoint, self.consecutive, last_loss)

    def judge_checkpoint(self, step: int, probe: dict) -> tuple[bool, float | None]:
        """Whether the state of ``step`` may be saved, and its loss on the next batch (``probe``, from
        :func:`probe_loss`). Raises unless every array is finite and that loss is finite and not diverged;
        under ``'skip'`` a non-finite loss (finite weights, a batch or weights that give NaN) only withholds
        this save."""
        self.drain()
        loss = float(probe["loss"])
        if not bool(probe["state_finite"]) or (not np.isfinite(loss) and self.policy == "stop"):
            # Asked only when failing: _last() waits for the save under way and writes its manifest.
            last_checkpoint, last_loss = self._last()
            raise NonFiniteLossError(step + 1, loss, float("nan"), last_checkpoint, 1, last_loss)
        if not np.isfinite(loss):
            print(f"step {step}: not saved: its loss on the next batch is {loss} (train.on_nonfinite=skip)", flush=True)
            return False, None
        median = self._diverged(loss)
        if median is not None:
            raise TrainingDivergedError(step, loss, median, self.divergence_factor, len(self._recent),
                                        *self._last(), at_checkpoint=True)
        return True, loss

