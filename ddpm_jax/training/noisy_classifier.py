"""The noise-aware classifier p_phi(y | x_t, t) that classifier guidance needs (Dhariwal & Nichol 2021, sec. 4).

Guidance shifts each reverse step's mean by ``s * Sigma * grad_x log p_phi(y | x_t, t)``
(D&N Alg. 1), so the classifier must read *noisy* images at every timestep of
the diffusion model it guides: it is trained on ``x_t = q_sample(x_0, t, eps)``
with ``t ~ Uniform{0..T-1}`` under that model's schedule, and is only valid for it
(:func:`check_classifier_matches`).

* :func:`ddpm_jax.training.noisy_classifier_training.train_noisy_classifier` trains one (resuming
  from ``WORKDIR/checkpoints`` if a run was cut short) and saves it with its config;
  ``python -m experiments.noisy_classifier --workdir RUN`` is its command line.
* :func:`load_noisy_classifier` returns a :class:`NoisyClassifierCheckpoint`.
* :func:`classifier_log_probs` / :func:`log_prob_fn` / :func:`class_log_prob_grad` are
  the pure, jit-able functions a guided sampler calls.

Layout of ``WORKDIR`` (e.g. ``RUN/noisy_classifier``): ``checkpoints/<step>/{state,config}``,
``config.json`` (the classifier's ``model`` and ``train`` sections plus the diffusion
run's ``diffusion`` section and ``data.image_size``), ``metrics.jsonl`` and, after an
evaluation, ``accuracy.json``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ddpm_jax.configs import schedule_from_config
from ddpm_jax.cpu.layers import CONV_IMPLS, layer_ops
from ddpm_jax.diffusion.guidance import GuidanceInputs, classifier_grad_fn
from ddpm_jax.diffusion.schedules import DiffusionSchedule
from ddpm_jax.models.noisy_classifier import NoisyClassifier
from ddpm_jax.training import checkpoint as ckpt_lib
from ddpm_jax.training.checkpoint import config_differences
from ddpm_jax.training.manifest import verify_checkpoint
from ddpm_jax.training.state import TrainState, learning_rate_schedule, make_optimizer, new_train_state, warmup_within

DEFAULT_SUBDIR = "noisy_classifier"  # where the command line puts a run's classifier: RUN/noisy_classifier


def noisy_classifier_config() -> ml_collections.ConfigDict:
    """A fresh config: ``model`` (the :class:`NoisyClassifier`'s fields) and ``train``."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    # Cheap guidance: on 2 CPU cores a batch of 100 costs 0.059 s for grad_x log p(y | x_t, t) at these widths
    # (108,074 parameters) against 0.036 s for the cpu preset U-Net's forward pass (0.14 s at widths 32, 64, 128),
    # and 200 training steps reach the same accuracy at either width.
    c.model.stage_channels = (16, 32, 64)
    c.model.time_embed_dim = 32
    c.model.num_classes = 10
    c.model.groups = 8
    c.model.conv_impl = "auto"  # 'auto' | 'xla' | 'matmul': same parameters, see ddpm_jax/cpu/layers.py
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 2000
    c.train.batch_size = 128
    c.train.learning_rate = 2e-3  # AdamW, linear warm-up then cosine decay to 0 at num_steps
    c.train.warmup_steps = 100
    c.train.weight_decay = 1e-4
    c.train.seed = 0
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.eval_batch_size = 500
    return c


def build_noisy_classifier(model_config, conv_impl: str | None = None, *, input_gradients: bool = False
                           ) -> NoisyClassifier:
    """The :class:`NoisyClassifier` a config's ``model`` section describes (``conv_impl``: instead of its own;
    ``input_gradients``: for differentiating with respect to its input in a sampler's loop, see
    :func:`ddpm_jax.cpu.layers.layer_ops`)."""
    conv_impl = conv_impl or model_config.get("conv_impl", "auto")  # configs saved before the field: 'auto'
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl={conv_impl!r} is not one of: {', '.join(CONV_IMPLS)}.")
    return NoisyClassifier(
        stage_channels=tuple(model_config.stage_channels),
        time_embed_dim=model_config.time_embed_dim,
        num_classes=model_config.num_classes,
        groups=model_config.groups,
        ops=layer_ops(conv_impl, input_gradients=input_gradients),
    )


# ---------------------------------------------------------------------------
# What a guided sampler calls
# ---------------------------------------------------------------------------


def classifier_log_probs(model_config, params, x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """``log p_phi(y | x_t, t)`` for every class: float32 ``(B, num_classes)``, log-softmax of the logits.

    Pure and jit-able; differentiable with respect to ``x``. ``model_config`` is Python data:
    close over it, or pass it as a static argument (then it must be hashable: a
    ``FrozenConfigDict``, as ``NoisyClassifierCheckpoint.config.model`` is); ``params`` is a pytree.

    Args:
      model_config: the classifier config's ``model`` section (``checkpoint.config.model``).
      params: the classifier's parameters.
      x: float ``(B, H, W, C)``: x_t at the diffusion model's ``data.image_size`` (data in
        [-1, 1], then noised), exactly what the denoiser is given.
      t: int ``(B,)`` 0-based timesteps of the *training* schedule (a respaced sampler's
        index k stands for ``ddpm_jax.configs.sampling_timesteps(config, K)[k]``).

    On CPU with ``conv_impl='auto'`` the convolutions are computed as matrix products (same
    parameters, same values to float32 rounding): their input gradient inside a sampler's
    ``lax.scan`` is then 3.5x faster than XLA's convolution there.
    """
    logits = build_noisy_classifier(model_config, input_gradients=True).apply({"params": params}, x, t)
    return jax.nn.log_softmax(logits, axis=-1)


def log_prob_fn(model_config) -> Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """:func:`classifier_log_probs` with the model bound: ``fn(params, x, t) -> (B, num_classes)``."""
    return functools.partial(classifier_log_probs, model_config)


def class_log_prob_grad(model_config, params, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """``grad_x log p_phi(y_i | x_i, t_i)`` per image: float32 ``(B, H, W, C)``, the term D&N's Alg. 1 scales.

    The gradient of the batch sum is each image's own gradient: nothing in the network
    mixes images (GroupNorm, no BatchNorm). ``y``: int ``(B,)`` target classes; the
    other arguments as in :func:`classifier_log_probs`. The guided samplers use the same
    rule (:func:`ddpm_jax.diffusion.guidance.classifier_grad_fn`), at s = 1 here.
    """
    inputs = GuidanceInputs(variables=None, labels=y, classifier_params=params, classifier_scale=1.0)
    return classifier_grad_fn(log_prob_fn(model_config))(inputs, x, t)


@flax.struct.dataclass
class NoisyClassifierCheckpoint:
    """A trained noise-aware classifier: ``params`` and the frozen ``config`` it was trained with.

    ``config`` holds ``model`` and ``train`` (see :func:`noisy_classifier_config`), the
    guided diffusion run's ``diffusion`` section and ``data.image_size`` (plus
    ``data.fingerprint`` of the labelled training set). It is a static field, so the
    checkpoint itself can be passed into a jitted function.
    """

    params: Any
    config: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)
    step: int = flax.struct.field(pytree_node=False, default=0)

    @classmethod
    def from_train_state(cls, state, config: ml_collections.ConfigDict) -> "NoisyClassifierCheckpoint":
        """The classifier a train state holds. The config is frozen through JSON, as a checkpoint stores it:
        a trained and a loaded classifier's configs then compare (and hash) equal, so jitted functions
        taking them as static arguments are not traced again."""
        frozen = ml_collections.FrozenConfigDict(json.loads(json.dumps(config.to_dict())))
        return cls(params=state.params, config=frozen, step=int(state.step))

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def num_timesteps(self) -> int:
        return self.config.diffusion.num_timesteps

    @property
    def schedule(self) -> DiffusionSchedule:
        """The diffusion schedule it was trained under."""
        return schedule_from_config(self.config)

    def log_probs(self, x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        """:func:`classifier_log_probs` with this checkpoint's model and parameters."""
        return classifier_log_probs(self.config.model, self.params, x, t)

    def grad_log_prob(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        """:func:`class_log_prob_grad` with this checkpoint's model and parameters."""
        return class_log_prob_grad(self.config.model, self.params, x, t, y)


def check_classifier_matches(classifier: NoisyClassifierCheckpoint, run_config) -> None:
    """Raise ValueError naming the fields that differ if ``classifier`` was trained for another diffusion model.

    It must share the run's whole ``diffusion`` section and its ``data.image_size``:
    its notion of x_t at step t is that schedule's. ``run_config`` is the diffusion
    run's config (or a :class:`ddpm_jax.DiffusionCheckpoint`, whose config is used).
    """
    run_config = getattr(run_config, "config", run_config)
    saved, current = classifier.config.to_dict(), run_config.to_dict()
    diffs = [
        d for d in config_differences(saved["diffusion"], current["diffusion"], "diffusion.")
        # A field newer than the classifier's config: judged by the tables below instead.
        if ": '<missing>' ->" not in d
    ]
    saved_size, run_size = saved["data"]["image_size"], current["data"]["image_size"]
    if saved_size != run_size:
        diffs.append(f"data.image_size: {saved_size!r} -> {run_size!r}")
    if not diffs:
        # The tables themselves, so a schedule field added after the classifier was trained cannot hide a change.
        ours, theirs = schedule_from_config(classifier.config), schedule_from_config(run_config)
        if ours.num_timesteps != theirs.num_timesteps or not np.allclose(ours.betas, theirs.betas, rtol=1e-6):
            diffs.append("diffusion: the betas the two configs give differ")
    if diffs:
        raise ValueError(
            "the noisy classifier was trained for another diffusion model than this run's; fields that differ "
            f"(classifier -> run): {'; '.join(diffs)}. Train one for this run with "
            "`python -m experiments.noisy_classifier --workdir RUN`."
        )


# ---------------------------------------------------------------------------
# Its train state (what a checkpoint holds, so loading needs it too)
# ---------------------------------------------------------------------------


def classifier_learning_rate(config: ml_collections.ConfigDict):
    """step -> learning rate: linear warm-up from 0, then cosine decay to 0 at ``train.num_steps``."""
    t = config.train
    return learning_rate_schedule(t.learning_rate, warmup_within(t.warmup_steps, t.num_steps), t.num_steps)


def create_train_state(config: ml_collections.ConfigDict) -> TrainState:
    """A fresh state for ``config`` (the full classifier config, ``data.image_size`` included): step 0,
    AdamW (decoupled weight decay) on :func:`classifier_learning_rate`, no weight average."""

    def init() -> TrainState:
        init_key, run_key = jax.random.split(jax.random.PRNGKey(config.train.seed))
        size = config.data.image_size
        variables = build_noisy_classifier(config.model).init(
            init_key, jnp.zeros((1, size, size, int(config.data.get("channels", 1))), jnp.float32),
            jnp.zeros((1,), jnp.int32)
        )
        tx = make_optimizer(classifier_learning_rate(config), weight_decay=config.train.weight_decay)
        return new_train_state({"params": variables["params"]}, tx, run_key, ema=False)

    # One compiled program: run eagerly, initialization compiles each of its ~150 small ops (7 s on 2 cores).
    return jax.jit(init)()


def check_is_classifier_checkpoint(manager: ocp.CheckpointManager, step: int, restored) -> None:
    """Refuse, in one line, a diffusion run's checkpoints where a noisy classifier's were expected."""
    if "stage_channels" not in restored.get("model", {}):
        # The same layout as a diffusion run's checkpoints: say so rather than fail on mismatched arrays.
        run = os.path.dirname(str(manager.directory))
        raise ckpt_lib.ConfigRefusedError(
            f"{manager.directory} holds checkpoints of a diffusion run, not of a noisy classifier; its classifier "
            f"goes in {os.path.join(run, DEFAULT_SUBDIR)}."
        )


def _restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    restored = ckpt_lib.restore_config(manager, step)
    check_is_classifier_checkpoint(manager, step, restored)
    return restored


def _restore_state(manager: ocp.CheckpointManager, step: int, config) -> TrainState:
    # The state's structure (optimizer state included) follows from the config alone.
    return ckpt_lib.restore_state(manager, step, jax.eval_shape(lambda: create_train_state(config)))


def load_noisy_classifier(workdir: str, step: int | None = None) -> NoisyClassifierCheckpoint:
    """Load the noise-aware classifier saved in ``workdir`` (e.g. ``RUN/noisy_classifier``); returns it at its latest step, or ``step``.

    Raises FileNotFoundError naming the folder and the command that trains one if there is none.
    """
    directory = os.path.join(os.path.abspath(workdir), ckpt_lib.CHECKPOINT_SUBDIR)
    run = os.path.dirname(os.path.abspath(workdir))
    command = (f"`python -m experiments.noisy_classifier --workdir {run}`"
               if os.path.basename(os.path.abspath(workdir)) == DEFAULT_SUBDIR
               else f"`python -m experiments.noisy_classifier --workdir RUN --out {workdir}`")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no noisy classifier in {workdir!r} (looked for {directory}); train one with {command}.")
    manager = ckpt_lib.read_only_manager(workdir)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(
                f"no noisy-classifier checkpoint for step {step} in {directory} (saved steps: "
                f"{list(manager.all_steps())}); train one with {command}."
            )
        try:
            verify_checkpoint(ckpt_lib.step_directory(manager, step))
        except ckpt_lib.CheckpointDamagedError as e:
            raise ckpt_lib.CheckpointDamagedError(f"the noisy classifier's checkpoint at step {step} is damaged "
                                                  f"({e}); retrain it, or load another step.") from None
        config = _restore_config(manager, step)
        state = _restore_state(manager, step, config)
    finally:
        manager.close()
    return NoisyClassifierCheckpoint.from_train_state(state, config)


def read_accuracy(workdir: str) -> dict:
    """``workdir/accuracy.json``: what :func:`evaluate_noisy_classifier` measured after training, and at which step."""
    with open(os.path.join(os.path.abspath(workdir), "accuracy.json")) as f:
        return json.load(f)
