"""The train state every network here is trained with: weights, their average, optimizer, step, key.

One :class:`TrainState` serves the diffusion model and both classifiers (the noise-aware
one that guides sampling, and the feature network of the metrics); what differs between
them is the step function, not the state. The state is a pytree saved whole in every
checkpoint; its settings (``apply_fn``, ``tx``, the EMA's decay, the diffusion objective's
options) are static fields, rebuilt from the config on load
(:func:`ddpm_jax.training.setup.create_train_state` builds the diffusion model's). Nothing here reads a config.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ddpm_jax.configs.checks import LR_SCHEDULES
from ddpm_jax.utils.trees import count_params


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: saved whole in every checkpoint.

    ``key`` is the run's base key (raw uint32); per-step keys are
    ``fold_in``-ed from it and ``step``, so a resumed run draws the same numbers.
    ``ema_params`` is None for a network trained without an average (the classifiers),
    ``batch_stats`` empty for one without BatchNorm.
    """

    step: jnp.ndarray  # int32 scalar: optimizer steps taken
    params: Any
    ema_params: Any  # exponential moving average of params (see ema_decay_at), or None
    batch_stats: Any
    opt_state: Any
    key: jnp.ndarray
    apply_fn: Any = flax.struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.9999)
    ema_warmup: bool = flax.struct.field(pytree_node=False, default=True)
    # lambda of L_hybrid for a learned-variance network; None: the network predicts eps only (L_simple).
    hybrid_lambda: float | None = flax.struct.field(pytree_node=False, default=None)
    # A class-conditional network's classes (0: unconditional) and its label-dropout rate.
    num_classes: int = flax.struct.field(pytree_node=False, default=0)
    p_uncond: float = flax.struct.field(pytree_node=False, default=0.0)
    # gamma of the min-SNR weighting of L_simple (train.loss_weighting='min_snr'); None: unweighted.
    min_snr_gamma: float | None = flax.struct.field(pytree_node=False, default=None)

    def __repr__(self) -> str:
        """One line: the step and the sizes, not the arrays (inside a jitted function the step is abstract)."""
        try:
            step = f"{int(self.step):,}"
        except (TypeError, jax.errors.ConcretizationTypeError):
            step = "traced"
        extras = [f"{self.num_classes} classes" if self.num_classes else "", "EMA" if self.ema_params is not None else "",
                  "BatchNorm" if jax.tree.leaves(self.batch_stats) else ""]
        return f"TrainState(step {step}, {count_params(self.params):,} parameters{''.join(', ' + e for e in extras if e)})"

    def apply_gradients(self, grads, batch_stats=None) -> "TrainState":
        """One optimizer step: new weights, their average (if kept), ``batch_stats`` (if given), step + 1."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        ema_params = self.ema_params
        if ema_params is not None:
            ema_params = ema_update(ema_params, params, ema_decay_at(self.step, self.ema_decay, self.ema_warmup))
        return self.replace(
            step=self.step + 1,
            params=params,
            ema_params=ema_params,
            batch_stats=self.batch_stats if batch_stats is None else batch_stats,
            opt_state=opt_state,
        )


def ema_decay_at(num_updates, max_decay: float, warmup: bool = True):
    """The decay of the ``num_updates``-th EMA update (0-based): ``min(max_decay, (1 + n) / (10 + n))``
    with the warm-up (TensorFlow's ``ExponentialMovingAverage(num_updates=n)``), else ``max_decay``.

    The warm-up makes the average's horizon grow with the run (0.1 at the first update, 0.9 after
    80, 0.99 after 890), so a run of a few thousand steps ends with usable averaged weights rather
    than ones still 0.9999^3000 = 74% made of the random initialization.
    """
    if not warmup:
        return jnp.asarray(max_decay, jnp.float32)
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params, params, decay):
    """``decay * ema + (1 - decay) * params``, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def learning_rate_schedule(peak: float, warmup_steps: int, num_steps: int, kind: str = "cosine") -> optax.Schedule:
    """step -> learning rate: linear warm-up from 0 to ``peak`` over ``warmup_steps``, then constant
    (``kind='constant'``) or cosine decay to 0 at ``num_steps`` (``'cosine'``)."""
    if isinstance(peak, bool) or not isinstance(peak, (int, float, np.integer, np.floating)) \
            or not np.isfinite(peak) or peak <= 0:
        raise ValueError(f"train.learning_rate must be a finite number > 0, got {peak}.")
    if kind == "constant":
        if not warmup_steps:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)], [warmup_steps]
        )
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(num_steps, warmup_steps + 1))
    raise ValueError(f"unknown train.lr_schedule {kind!r}; allowed: {', '.join(LR_SCHEDULES)}.")


def warmup_within(warmup_steps: int, num_steps: int) -> int:
    """The warm-up of a run that may be shorter than it: at most ``num_steps - 1``, so the rate still decays."""
    return min(warmup_steps, max(num_steps - 1, 0))


def make_optimizer(schedule: optax.Schedule, *, grad_clip_norm: float = 0.0,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam on ``schedule`` (AdamW, decoupled weight decay, if ``weight_decay``), after global-norm
    clipping if ``grad_clip_norm > 0``."""
    if weight_decay:  # the classifiers: AdamW alone, the optimizer-state layout their checkpoints hold
        if grad_clip_norm > 0:
            raise ValueError("make_optimizer: clipping with weight decay is not a combination any network here uses.")
        return optax.adamw(schedule, weight_decay=weight_decay)
    clip = [clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
    return optax.chain(*clip, optax.adam(schedule))


def new_train_state(variables: dict, tx: optax.GradientTransformation, key: jax.Array, *, ema: bool,
                    **settings) -> TrainState:
    """Step 0 of a network initialized to ``variables``: optimizer state from ``tx``, the average (if
    ``ema``) starting at the weights. ``settings``: the state's static fields."""
    params = variables["params"]
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        key=key,
        tx=tx,
        **settings,
    )


def _float_leaves(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


# Both whole-state reductions below are matrix products: XLA's CPU backend reduces a whole array through a
# squared (or is-finite) copy and reduce-windows, 3-4x slower for the seed U-Net's 12.5M weights.
def global_norm(tree) -> jnp.ndarray:
    """The L2 norm of all float leaves of ``tree`` together (``optax.tree.norm``'s value, to float32 rounding).

    Each leaf's sum of squares is the trace of the Gram matrix of its elements laid out 16 to
    a row: one matrix product reads the leaf once.
    """
    total = jnp.zeros((), jnp.float32)
    for x in _float_leaves(tree):
        x = x.astype(jnp.float32)
        if x.size % 16:
            total += jnp.vdot(x, x, precision=lax.Precision.HIGHEST)
        else:
            rows = x.reshape(-1, 16)
            total += jnp.trace(jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST))
    return jnp.sqrt(total)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm(max_norm)`` (same state, same scaling) with the norm of :func:`global_norm`."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        within = norm < max_norm
        return jax.tree.map(lambda t: lax.select(within, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def all_finite(tree) -> jnp.ndarray:
    """True (a bool scalar) if every float leaf of ``tree`` is finite.

    Each leaf times a vector of zeros: every product is 0, or NaN where the element is
    Inf or NaN, so the sum is NaN exactly where a leaf holds one; no value can overflow it.
    """
    total = jnp.zeros((), jnp.float32)
    for x in _float_leaves(tree):
        rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
        total += jnp.sum(rows @ jnp.zeros(rows.shape[-1], x.dtype)).astype(jnp.float32)
    return jnp.isfinite(total)


def state_is_finite(state: TrainState) -> jnp.ndarray:
    """True (a bool scalar) if every float array of the state (weights, EMA, statistics, Adam moments) is finite."""
    return all_finite((state.params, state.ema_params, state.batch_stats, state.opt_state))
