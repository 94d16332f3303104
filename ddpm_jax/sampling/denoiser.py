"""A trained network joined to the diffusion math: the denoiser functions the samplers and bounds call.

The math modules (:mod:`~ddpm_jax.diffusion.samplers`, :mod:`~ddpm_jax.diffusion.likelihood`) take an
``eps_fn(variables, x_t, t)``; :mod:`~ddpm_jax.models` knows nothing of diffusion. This
module is where one becomes the other, for every way a network is evaluated: at its null
label, at given labels, with classifier-free guidance, with BatchNorm's running or batch
statistics, with or without a learned variance.
"""

from __future__ import annotations

from ddpm_jax.configs import BATCHNORM_MODES, build_model
from ddpm_jax.diffusion.guidance import GuidanceInputs, classifier_free_fn, conditional_fn
from ddpm_jax.diffusion.process import split_learned_variance

CONDITIONINGS = ("none", "labels", "classifier_free")


def _eps_half(output, split: bool):
    return split_learned_variance(output)[0] if split else output


def denoiser_fn(model_config, with_learned_variance: bool):
    """The network as ``(variables, x, t) -> output`` in evaluation mode (a class-conditional one at its null label).

    A learned-variance network's output stacks eps and v (2C channels): with
    ``with_learned_variance`` it is returned whole, otherwise (DDIM, a fixed
    variance) its eps half alone. Other networks return eps either way.
    """
    fn = guided_denoiser_fn(model_config, with_learned_variance, "none")
    return lambda variables, x, t: fn(GuidanceInputs(variables), x, t)


def guided_denoiser_fn(model_config, with_learned_variance: bool, conditioning: str, batchnorm: str = "running"):
    """The network as ``(inputs, x, t) -> output``, ``inputs`` a :class:`ddpm_jax.diffusion.guidance.GuidanceInputs`.

    ``conditioning``: ``'none'`` (unconditional; a class-conditional network at its null label),
    ``'labels'`` (at ``inputs.labels``) or ``'classifier_free'`` (guided at ``inputs.scale``).
    ``batchnorm``: ``'running'`` (BatchNorm's running averages, as networks are usually evaluated)
    or ``'batch'`` (the statistics of the batch being denoised, all at one timestep while
    sampling; the running averages are left as they are). Networks without BatchNorm ignore it.
    Output as :func:`denoiser_fn`'s.
    """
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"unknown batchnorm={batchnorm!r}; allowed: {', '.join(BATCHNORM_MODES)}.")
    model = build_model(model_config)
    learned = bool(model_config.get("learn_variance", False))
    split = learned and not with_learned_variance
    num_classes = int(model_config.get("num_classes", 0))

    def network(variables, x, t, y=None):
        # Only a network with BatchNorm statistics runs in training mode (which would also turn on dropout).
        if batchnorm == "batch" and variables.get("batch_stats"):
            return model.apply(variables, x, t, y=y, train=True, mutable=["batch_stats"])[0]
        return model.apply(variables, x, t, y=y, train=False)

    if conditioning == "none":
        fn = lambda inputs, x, t: network(inputs.variables, x, t)  # noqa: E731
    elif conditioning == "labels":
        fn = conditional_fn(network, num_classes)
    elif conditioning == "classifier_free":
        fn = classifier_free_fn(network, num_classes, learned_variance=learned)
    else:
        raise ValueError(f"unknown conditioning {conditioning!r}; allowed: {', '.join(CONDITIONINGS)}.")
    return lambda inputs, x, t: _eps_half(fn(inputs, x, t), split)
