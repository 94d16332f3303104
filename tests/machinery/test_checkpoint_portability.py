"""A checkpoint written under another device topology restores onto this process's device.

A GPU is not available in CI, so the test writes the checkpoint in a subprocess
that XLA gives two host devices, with the state replicated over both, and
loads it here, on one. That is the same situation as a GPU checkpoint loaded
on a CPU-only machine: the saved sharding names devices this process lacks.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

import ddpm_jax

_WRITER = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from ddpm_jax.training import checkpoint as ckpt_lib
    from ddpm_jax.configs import get_config
    from ddpm_jax.training.setup import create_train_state

    assert jax.device_count() == 2, jax.devices()
    config = get_config("tiny")
    state = create_train_state(config)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(state, replicated)
    manager = ckpt_lib.make_manager(sys.argv[1], config.train.keep_checkpoints)
    ckpt_lib.save(manager, state, config.to_dict())
    manager.wait_until_finished()
    leaf = jax.tree.leaves(state.params)[0]
    np.save(sys.argv[1] + "/first_leaf.npy", np.asarray(leaf))
    """
)


def test_checkpoint_saved_on_two_devices_loads_on_one(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path)], check=True, env=env, timeout=300)

    params = ddpm_jax.load_checkpoint(str(tmp_path))
    leaf = jax.tree.leaves(params.params)[0]
    assert leaf.sharding.device_set == {jax.local_devices()[0]}
    np.testing.assert_array_equal(np.asarray(leaf), np.load(tmp_path / "first_leaf.npy"))
    assert ddpm_jax.sample(params, jax.random.PRNGKey(0), 2).shape == (2, 28, 28, 1)
