"""The feature network for the sample-quality metrics: train once, cache with Orbax, reuse.

:func:`load_or_train_feature_network` returns a :class:`FeatureNetwork` for a
given training set and classifier config: from the cache if one was trained
before, otherwise trained here (about 2.5 minutes on 2 CPU cores for 10,000
images) and saved. The cache entry's name is a hash of the classifier config
and of the training images and labels, so a different dataset or config never
picks up a stale network. Its test accuracy is stored with it.

Cache location: :func:`ddpm_jax.utils.cache.cache_dir` (``$DDPM_JAX_CACHE_DIR``, else ``~/.cache/ddpm_jax``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from ddpm_jax.configs import get_classifier_config
from ddpm_jax.data import fingerprint, pad_to_batch, preprocess, random_flip
from ddpm_jax.models.classifier import MNISTClassifier, ResNetClassifier
from ddpm_jax.training.checkpoint import on_local_device
from ddpm_jax.training.loop import EpochOrder, EpochOrders, MetricLogger, batch_indices, run_training
from ddpm_jax.training.state import TrainState, learning_rate_schedule, make_optimizer, new_train_state, warmup_within
from ddpm_jax.utils import cache

_PARAMS, _META = "params", "meta"
_DATA_STREAM, _AUGMENT_STREAM, _DROPOUT_STREAM, _FLIP_STREAM, _CUTOUT_STREAM = 0, 1, 2, 3, 4



def build_classifier(model_config) -> MNISTClassifier | ResNetClassifier:
    """The network a classifier config's ``model`` section describes: ``name`` 'resnet', else the MNIST CNN."""
    network = ResNetClassifier if model_config.get("name", "cnn") == "resnet" else MNISTClassifier
    return network(
        stage_channels=tuple(model_config.stage_channels),
        feature_dim=model_config.feature_dim,
        num_classes=int(model_config.get("num_classes", 10)),
        dropout_rate=model_config.dropout_rate,
    )


def input_shape(model_config) -> tuple[int, int, int]:
    """``(H, W, C)`` of the images a classifier config's network takes (MNIST's when unsaid)."""
    return tuple(int(d) for d in model_config.get("input_shape", (28, 28, 1)))


def abstract_params(model_config) -> Any:
    """The shapes and dtypes of the parameters the network of ``model_config`` has (nothing computed)."""
    model = build_classifier(model_config)
    dummy = jnp.zeros((1, *input_shape(model_config)))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy)["params"])


@functools.lru_cache(maxsize=8)
def _compiled_apply(model_config: ml_collections.FrozenConfigDict) -> Callable:
    model = build_classifier(model_config)

    @jax.jit
    def apply(params, images_u8):
        logits, features = model.apply({"params": params}, preprocess(images_u8, images_u8.shape[1]))
        return jax.nn.softmax(logits), features

    return apply


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    """A trained classifier: class probabilities and FID features of uint8 images.

    Attributes:
      params: the classifier's parameters.
      config: the classifier config it was trained with (:func:`ddpm_jax.configs.get_classifier_config`).
      test_accuracy: accuracy on the test split it was evaluated on (``info['test_fingerprint']``).
      info: what the cache stores beside it: training-set size and fingerprint, training time, cache path.
    """

    params: Any
    config: ml_collections.FrozenConfigDict
    test_accuracy: float
    info: dict

    @property
    def feature_dim(self) -> int:
        return self.config.model.feature_dim

    @property
    def num_classes(self) -> int:
        return int(self.config.model.get("num_classes", 10))

    @property
    def name(self) -> str:
        """The cache entry's name: identifies the feature space a FID was computed in."""
        return self.info.get("name", "uncached")

    def __call__(self, images_u8: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities ``(N, num_classes)`` and features ``(N, feature_dim)`` of uint8 images
        ``(N, H, W, C)`` of the shape it was trained on (MNIST: ``(N, 28, 28, 1)``).

        The images are what a saved PNG holds (0..255); quantize generated
        [-1, 1] images with :func:`ddpm_jax.evaluation.plotting.to_uint8` first. The last
        batch is padded so one compiled shape serves every N.
        """
        images_u8 = np.asarray(images_u8)
        shape = input_shape(self.config.model)
        if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[1:] != shape:
            raise ValueError(
                f"the feature network takes uint8 images of shape (N, {', '.join(map(str, shape))}), got "
                f"{images_u8.dtype} {images_u8.shape}; quantize [-1, 1] samples with ddpm_jax.evaluation.plotting.to_uint8 first."
            )
        apply = _compiled_apply(ml_collections.FrozenConfigDict(self.config.model))
        n = len(images_u8)
        batch = max(1, min(batch_size, n))
        probs, feats = [], []
        for start in range(0, n, batch):
            p, f = apply(self.params, pad_to_batch(images_u8[start : start + batch], batch))
            probs.append(np.asarray(p))
            feats.append(np.asarray(f))
        if not probs:
            return np.zeros((0, self.num_classes), np.float32), np.zeros((0, self.feature_dim), np.float32)
        return np.concatenate(probs)[:n], np.concatenate(feats)[:n]

    def scored_on(self, test_images: np.ndarray, test_labels: np.ndarray) -> FeatureNetwork:
        """This network with its test accuracy on these images: itself if they are the split it was scored on
        (``info['test_fingerprint']``), else a copy scored on them."""
        test_fp = fingerprint(test_images, test_labels)
        if self.info.get("test_fingerprint") == test_fp:
            return self
        return dataclasses.replace(self, test_accuracy=self.accuracy(test_images, test_labels),
                                   info={**self.info, "test_fingerprint": test_fp, "test_examples": len(test_labels)})

    def accuracy(self, images_u8: np.ndarray, labels: np.ndarray) -> float:
        probs, _ = self(images_u8)
        return float(np.mean(np.argmax(probs, axis=-1) == np.asarray(labels)))


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def random_shift(key: jax.Array, x: jnp.ndarray, max_shift: int) -> jnp.ndarray:
    """Translate each ``(B, H, W, C)`` image by up to ``max_shift`` pixels, filling with background (-1)."""
    if max_shift == 0:
        return x
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
    return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)


def random_cutout(key: jax.Array, x: jnp.ndarray, size: int) -> jnp.ndarray:
    """Set a ``size`` x ``size`` square of each ``(B, H, W, C)`` image to background (-1), at a random place
    that may reach past the border (DeVries & Taylor 2017's cutout); ``size`` 0: unchanged."""
    if size == 0:
        return x
    b, h, w, _ = x.shape
    corners = jax.random.randint(key, (b, 2), 0, jnp.array([h, w])) - size // 2  # the square's top-left pixel
    rows = jnp.arange(h)[None, :] - corners[:, :1]
    cols = jnp.arange(w)[None, :] - corners[:, 1:]
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    inside = inside[..., None]
    return jnp.where(inside, -1.0, x)


def _make_train_step(model, batch_size: int, max_shift: int, flip: bool = False, cutout: int = 0):
    def step(state: TrainState, images_u8: jnp.ndarray, labels: jnp.ndarray, order: EpochOrder | None = None):
        idx = batch_indices(jax.random.fold_in(state.key, _DATA_STREAM), images_u8.shape[0], state.step, batch_size,
                            order)
        step_key = jax.random.fold_in(state.key, state.step)
        x = random_shift(
            jax.random.fold_in(step_key, _AUGMENT_STREAM), preprocess(images_u8[idx], images_u8.shape[1]), max_shift
        )
        if flip:
            x = random_flip(jax.random.fold_in(step_key, _FLIP_STREAM), x)
        x = random_cutout(jax.random.fold_in(step_key, _CUTOUT_STREAM), x, cutout)
        y = labels[idx]

        def loss_fn(params):
            logits, _ = model.apply(
                {"params": params}, x, train=True, rngs={"dropout": jax.random.fold_in(step_key, _DROPOUT_STREAM)}
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, jnp.mean(jnp.argmax(logits, -1) == y)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads), {"loss": loss, "accuracy": acc}

    return jax.jit(step, donate_argnums=0)


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    config: ml_collections.ConfigDict | None = None,
    *,
    num_epochs: float | None = None,
    progress: bool = False,
) -> tuple[Any, dict]:
    """Train the classifier on uint8 ``(N, H, W, C)`` images (its config's input shape) with int labels ``(N,)``.

    AdamW with warm-up and cosine decay, dropout on the feature layer and random
    translations, through the shared loop (:func:`ddpm_jax.training.loop.run_training`;
    no checkpoints: the trained network is cached whole). Deterministic given the config's seed.

    Returns:
      ``(params, history)``: history holds the steps taken, the final training
      loss and accuracy (mean of the last 50 steps) and the wall time.
    """
    config = config or get_classifier_config(train_images.shape[1:])
    chex.assert_rank(train_images, 4)
    if tuple(train_images.shape[1:]) != input_shape(config.model):
        raise ValueError(f"the classifier config takes images of shape {input_shape(config.model)}, got "
                         f"{tuple(train_images.shape[1:])}; use get_classifier_config(image_shape=...).")
    chex.assert_shape(train_labels, (train_images.shape[0],))
    tc = config.train
    num_epochs = tc.num_epochs if num_epochs is None else num_epochs
    if not len(train_images):
        raise ValueError("the classifier needs training images; got none.")
    batch_size = min(tc.batch_size, len(train_images))  # a small folder of images: all of them each step
    per_epoch = len(train_images) // batch_size
    num_steps = max(1, round(num_epochs * per_epoch))
    model = build_classifier(config.model)
    init_key, run_key = jax.random.split(jax.random.PRNGKey(tc.seed))
    variables = model.init(init_key, jnp.zeros((1, *input_shape(config.model)), jnp.float32))
    schedule = learning_rate_schedule(tc.learning_rate, warmup_within(tc.warmup_steps, num_steps), num_steps)
    state = new_train_state({"params": variables["params"]}, make_optimizer(schedule, weight_decay=tc.weight_decay),
                            run_key, ema=False)
    recent = []  # the metrics of the last 50 steps, which the history reports

    def keep_recent(done: int, metrics: dict) -> None:
        if done > num_steps - 50:
            recent.append(metrics)

    start = time.perf_counter()
    state = run_training(
        state, _make_train_step(model, batch_size, tc.max_shift, bool(tc.get("random_flip", False)),
                                int(tc.get("cutout", 0))),
        (jnp.asarray(train_images), jnp.asarray(train_labels, jnp.int32)),
        orders=EpochOrders(jax.random.fold_in(state.key, _DATA_STREAM), len(train_images), batch_size),
        end=num_steps, batch_size=batch_size,
        logger=MetricLogger(None, lambda fetched: {"loss": float(np.mean([m["loss"] for m in fetched]))}),
        log_every=50, on_step=keep_recent, postfix=lambda record, rate: {"loss": f"{record['loss']:.3f}"},
        progress=progress, desc="training the feature classifier",
    )
    jax.block_until_ready(state.params)
    recent = jax.device_get(recent)
    history = {
        "steps": num_steps,
        "epochs": num_steps / per_epoch,
        "train_loss": float(np.mean([m["loss"] for m in recent])),
        "train_accuracy": float(np.mean([m["accuracy"] for m in recent])),
        "train_seconds": time.perf_counter() - start,
    }
    return state.params, history


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


def _manager(directory: Path, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
    return ocp.CheckpointManager(directory, options=options, item_names=(_PARAMS, _META))


def _restore(directory: Path, config: ml_collections.ConfigDict) -> tuple[Any, dict] | None:
    if not directory.is_dir():
        return None
    with _manager(directory, create=False) as manager:
        step = manager.latest_step()  # only finalized checkpoints count: a half-written one is never picked
        if step is None:
            return None
        abstract = on_local_device(abstract_params(config.model))
        restored = manager.restore(
            step, args=ocp.args.Composite(**{_PARAMS: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()})
        )
    return restored[_PARAMS], dict(restored[_META])


def load_or_train_feature_network(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    cache_dir: str | os.PathLike | None = None,
    config: ml_collections.ConfigDict | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    num_classes: int = 10,
) -> FeatureNetwork:
    """Load this training set's feature network from the cache, or train and cache it; returns the :class:`FeatureNetwork`.

    Args:
      train_images, train_labels: the training split (uint8 ``(N, H, W, C)``, int ``(N,)``),
        the same data the diffusion model trains on.
      test_images, test_labels: the split its accuracy is measured on (the full test split).
      cache_dir: where trained networks live (default :func:`ddpm_jax.utils.cache.cache_dir`).
      config: the classifier config (default :func:`ddpm_jax.configs.get_classifier_config` for the
        images' shape and ``num_classes``).
      progress: progress bar while training.
      log: where one-line messages go.

    Returns:
      A :class:`FeatureNetwork` with its test accuracy on ``test_images``.
    """
    config = config or get_classifier_config(train_images.shape[1:], num_classes)
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    train_fp = fingerprint(train_images, train_labels)
    test_fp = fingerprint(test_images, test_labels)
    name = "classifier-" + hashlib.sha256((config_json + train_fp).encode()).hexdigest()[:12]
    directory = Path(cache_dir or cache.cache_dir()).expanduser().absolute() / name
    restored = _restore(directory, config)
    frozen = ml_collections.FrozenConfigDict(config.to_dict())
    if restored is not None:
        params, meta = restored
        network = FeatureNetwork(params, frozen, float(meta["test_accuracy"]),
                                 {**meta, "path": str(directory)}).scored_on(test_images, test_labels)
        log(f"feature classifier: {directory} (test accuracy {network.test_accuracy:.2%})")
        return network

    log(f"training the feature classifier on {len(train_labels):,} images (once; cached in {directory})")
    params, history = train_classifier(train_images, train_labels, config, progress=progress)
    network = FeatureNetwork(params, frozen, 0.0, {})
    accuracy = network.accuracy(test_images, test_labels)
    meta = {
        "name": name,
        "test_accuracy": accuracy,
        "test_examples": len(test_labels),
        "test_fingerprint": test_fp,
        "train_examples": len(train_labels),
        "train_fingerprint": train_fp,
        "config": config.to_dict(),
        **history,
    }
    with _manager(directory) as manager:
        manager.save(
            history["steps"],
            args=ocp.args.Composite(**{_PARAMS: ocp.args.StandardSave(params), _META: ocp.args.JsonSave(meta)}),
        )
        manager.wait_until_finished()
    log(f"feature classifier: test accuracy {accuracy:.2%} after {history['epochs']:.0f} epochs "
        f"({history['train_seconds']:.0f} s); saved to {directory}")
    return FeatureNetwork(params, frozen, accuracy, {**meta, "path": str(directory)})
