"""A run workdir made from weights trained elsewhere: the checkpoint training would have written, so that
:func:`ddpm_jax.load_checkpoint`, :func:`ddpm_jax.sample` and the evaluation take it like any run.

The state is :func:`ddpm_jax.training.setup.create_train_state`'s structure (checked against it leaf by leaf)
with the given weights as both ``params`` and ``ema_params``, a fresh optimizer state and step 0, saved with
:func:`ddpm_jax.training.checkpoint.save` through :func:`~ddpm_jax.training.checkpoint.make_manager` (Orbax, with
its manifest), and the config as ``WORKDIR/config.json``, as training writes them.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax.configs import config_to_json
from ddpm_jax.training.checkpoint import CHECKPOINT_SUBDIR, finish_manifests, make_manager, save, tree_differences
from ddpm_jax.training.setup import create_train_state, diffusion_optimizer
from ddpm_jax.training.state import new_train_state
from ddpm_jax.training.workdir import WorkdirLock, prepare_workdir


def write_run(workdir: str, config: ml_collections.ConfigDict, params, batch_stats=None) -> str:
    """Save ``params`` (a nested dict of arrays, the network ``config.model`` describes; ``batch_stats`` for a
    BatchNorm network) as step 0 of a new run in ``workdir``; returns the checkpoint's directory.

    ValueError if ``workdir`` already holds checkpoints (nothing is overwritten) or the arrays do not fit the
    network (naming them).
    """
    path = prepare_workdir(workdir)
    directory = os.path.join(path, CHECKPOINT_SUBDIR)
    if os.path.isdir(directory) and os.listdir(directory):
        raise ValueError(f"--workdir {workdir} already holds checkpoints ({directory}); give a new directory.")
    template = jax.eval_shape(lambda: create_train_state(config))  # the structure alone; nothing is initialized
    variables = {"params": jax.tree.map(jnp.asarray, params),
                 "batch_stats": jax.tree.map(jnp.asarray, batch_stats or {})}
    _, run_key = jax.random.split(jax.random.PRNGKey(config.seed))  # create_train_state's run key
    state = new_train_state(variables, diffusion_optimizer(config), run_key, ema=True)
    arrays = lambda s: {"params": s.params, "batch_stats": s.batch_stats, "opt_state": s.opt_state}  # noqa: E731
    diffs = tree_differences(arrays(state), arrays(template))
    if diffs:
        raise ValueError(f"these weights do not fit the network their config describes: {'; '.join(diffs)}.")
    with WorkdirLock(path, what="importing weights"):
        manager = make_manager(path, int(config.train.keep_checkpoints))
        try:
            save(manager, state, config.to_dict())
            manager.wait_until_finished()
            finish_manifests(manager.directory)
        finally:
            manager.close()
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write(config_to_json(config))
    return os.path.join(directory, "0")
