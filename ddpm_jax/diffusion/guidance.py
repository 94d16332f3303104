"""Choosing the class of a sample: label dropout, classifier-free guidance, classifier guidance.

Pure functions of arrays, used by training (:func:`drop_labels`) and by the
samplers of :mod:`ddpm_jax.diffusion.samplers` (through :func:`classifier_free_fn` and
:func:`classifier_grad_fn`, which build the functions the samplers take).

* Class-conditional networks (``model.num_classes = K > 0``) take labels
  ``0..K-1`` and a null label ``K`` meaning "no label". Training replaces each
  label by the null one with probability ``p_uncond`` (:func:`drop_labels`), so
  one network learns eps(x, t, y) and eps(x, t, null) (Ho & Salimans 2022).
* Classifier-free guidance: ``eps = (1 + w) eps(x, t, y) - w eps(x, t, null)``
  (:func:`classifier_free_eps`); w = 0 is plain conditional sampling.
* Classifier guidance (Dhariwal & Nichol 2021, Algorithms 1 and 2): a
  noise-aware classifier p_phi(y | x_t, t) steers any diffusion model, also an
  unconditional one: ancestral steps shift their mean by ``s Sigma grad log
  p_phi(y | x_t, t)`` (:func:`classifier_guided_mean`); DDIM steps use
  ``eps - sqrt(1 - abar_t) s grad log p_phi`` (:func:`classifier_guided_eps`).

The samplers take one opaque pytree of "variables" that they pass to the
network function; for guided sampling it is a :class:`GuidanceInputs`, so the
labels and scales are arguments of the jitted sampler (a sweep over w compiles
once) rather than constants baked into it.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp

from ddpm_jax.diffusion.process import split_learned_variance

# model_fn(variables, x, t, y) -> output: a class-conditional network; y int (B,), the null label allowed.
ConditionalModelFn = Callable[[Any, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
# log_prob_fn(classifier_params, x_t, t) -> (B, num_classes) log p(y | x_t, t).
LogProbFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]


@flax.struct.dataclass
class GuidanceInputs:
    """What a guided sampler's network functions need besides ``x`` and ``t``.

    ``variables``: the diffusion network's; ``labels``: int ``(B,)`` requested
    classes (None for unconditional sampling); ``scale``: w of classifier-free
    guidance (float32 scalar); ``classifier_params`` and ``classifier_scale``
    (s): classifier guidance's.
    """

    variables: Any
    labels: jnp.ndarray | None = None
    scale: jnp.ndarray | float = 0.0
    classifier_params: Any = None
    classifier_scale: jnp.ndarray | float = 0.0


def null_labels(batch: int, num_classes: int) -> jnp.ndarray:
    """``(batch,)`` null labels: index ``num_classes``, "no label"."""
    return jnp.full((batch,), num_classes, dtype=jnp.int32)


def drop_labels(key: jax.Array, labels: jnp.ndarray, p_uncond: float, num_classes: int) -> jnp.ndarray:
    """Each label replaced by the null label (``num_classes``) with probability ``p_uncond``, independently.

    ``labels``: int ``(B,)`` in ``0..num_classes-1``; returns int32 ``(B,)``.
    """
    chex.assert_rank(labels, 1)
    dropped = jax.random.uniform(key, labels.shape) < p_uncond
    return jnp.where(dropped, num_classes, labels).astype(jnp.int32)


def classifier_free_eps(eps_cond: jnp.ndarray, eps_uncond: jnp.ndarray, scale) -> jnp.ndarray:
    """Ho & Salimans' (2022) guided noise ``(1 + w) eps(x, t, y) - w eps(x, t, null)``, with w = ``scale``."""
    chex.assert_equal_shape([eps_cond, eps_uncond])
    return (1.0 + scale) * eps_cond - scale * eps_uncond


def conditional_fn(model_fn: ConditionalModelFn, num_classes: int):
    """``(inputs, x, t) -> output`` of a class-conditional network at ``inputs.labels`` (null if None)."""

    def fn(inputs: GuidanceInputs, x, t):
        labels = null_labels(x.shape[0], num_classes) if inputs.labels is None else inputs.labels
        return model_fn(inputs.variables, x, t, labels)

    return fn


def classifier_free_fn(model_fn: ConditionalModelFn, num_classes: int, learned_variance: bool = False):
    """``(inputs, x, t) -> guided output``: :func:`classifier_free_eps` at ``inputs.scale``.

    Both predictions come from one network call on the batch stacked twice
    (labels, then null labels). A learned-variance network's output (eps and v
    stacked on channels) keeps the conditional v: guidance moves the mean only.
    """

    def fn(inputs: GuidanceInputs, x, t):
        batch = x.shape[0]
        chex.assert_shape(inputs.labels, (batch,))
        labels = jnp.concatenate([inputs.labels.astype(jnp.int32), null_labels(batch, num_classes)])
        both = model_fn(inputs.variables, jnp.concatenate([x, x]), jnp.concatenate([t, t]), labels)
        cond, uncond = both[:batch], both[batch:]
        if not learned_variance:
            return classifier_free_eps(cond, uncond, inputs.scale)
        (eps_c, v_c), (eps_u, _) = split_learned_variance(cond), split_learned_variance(uncond)
        return jnp.concatenate([classifier_free_eps(eps_c, eps_u, inputs.scale), v_c], axis=-1)

    return fn


def classifier_grad_fn(log_prob_fn: LogProbFn):
    """``(inputs, x, t) -> s * grad_x log p_phi(y | x, t)``, s = ``inputs.classifier_scale``, y = ``inputs.labels``.

    The gradient is ``jax.grad`` of the summed log-probabilities of the requested
    labels; the classifier treats images independently, so each image's row is its
    own gradient. Shape: ``x``'s.
    """

    def cond_fn(inputs: GuidanceInputs, x, t):
        chex.assert_shape(inputs.labels, (x.shape[0],))

        def total_log_prob(x):
            log_probs = log_prob_fn(inputs.classifier_params, x, t)
            return jnp.sum(jnp.take_along_axis(log_probs, inputs.labels[:, None].astype(jnp.int32), axis=1))

        return inputs.classifier_scale * jax.grad(total_log_prob)(x.astype(jnp.float32))

    return cond_fn


def classifier_guided_mean(mean: jnp.ndarray, variance, scaled_grad: jnp.ndarray) -> jnp.ndarray:
    """Dhariwal & Nichol's Algorithm 1: ``mu + Sigma s grad log p_phi(y | x_t)`` (``scaled_grad`` = s grad)."""
    return mean + variance * scaled_grad


def classifier_guided_eps(eps: jnp.ndarray, alpha_bar, scaled_grad: jnp.ndarray) -> jnp.ndarray:
    """Dhariwal & Nichol's Algorithm 2 (DDIM): ``eps - sqrt(1 - abar_t) s grad log p_phi(y | x_t)``."""
    return eps - jnp.sqrt(1.0 - alpha_bar) * scaled_grad
