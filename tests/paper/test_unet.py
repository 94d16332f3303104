import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.configs import build_model, get_config
from ddpm_jax.models import ReportUNet, sinusoidal_embedding
from ddpm_jax.utils.trees import count_params


def _abstract_variables(model, size, batch=2):
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, size, size, 1)), jnp.zeros((batch,), jnp.int32))
    )


def test_seed_preset_has_the_reports_12552848_parameters():
    config = get_config("seed")
    variables = _abstract_variables(build_model(config.model), config.data.image_size)
    assert count_params(variables["params"]) == 12_552_848


def test_seed_unet_maps_32x32_inputs_to_the_same_shape_without_running_it():
    model = build_model(get_config("seed").model)
    variables = _abstract_variables(model, 32)
    out = jax.eval_shape(
        lambda v, x, t: model.apply(v, x, t, train=False), variables, jnp.zeros((3, 32, 32, 1)), jnp.zeros((3,), jnp.int32)
    )
    assert out.shape == (3, 32, 32, 1) and out.dtype == jnp.float32


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_output_has_input_shape_for_any_batch_and_time_vector(batch):
    model = ReportUNet(base_channels=4, levels=2, time_embed_dim=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, 28, 28, 1))
    t = jnp.arange(batch, dtype=jnp.int32) * 7 % 100
    variables = model.init(jax.random.PRNGKey(1), x, t)
    out = model.apply(variables, x, t, train=False)
    chex.assert_shape(out, (batch, 28, 28, 1))
    chex.assert_tree_all_finite(out)
    out_train, updates = model.apply(variables, x, t, train=True, mutable=["batch_stats"])
    chex.assert_shape(out_train, (batch, 28, 28, 1))
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_output_depends_on_the_timestep():
    model = ReportUNet(base_channels=4, levels=1, time_embed_dim=8)
    x = jnp.ones((2, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(0), x, jnp.zeros((2,), jnp.int32))
    a = model.apply(variables, x, jnp.array([0, 0]))
    b = model.apply(variables, x, jnp.array([0, 50]))
    np.testing.assert_allclose(a[0], b[0])
    assert float(jnp.max(jnp.abs(a[1] - b[1]))) > 1e-4


def test_running_statistics_are_used_when_not_training():
    # With running averages, an image's output cannot depend on the rest of the batch.
    model = ReportUNet(base_channels=4, levels=1, time_embed_dim=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
    t = jnp.zeros((4,), jnp.int32)
    variables = model.init(jax.random.PRNGKey(1), x, t)
    full = model.apply(variables, x, t, train=False)
    alone = model.apply(variables, x[:1], t[:1], train=False)
    np.testing.assert_allclose(full[:1], alone, rtol=1e-5, atol=1e-5)
    trained_full, _ = model.apply(variables, x, t, train=True, mutable=["batch_stats"])
    trained_alone, _ = model.apply(variables, x[:2], t[:2], train=True, mutable=["batch_stats"])
    assert float(jnp.max(jnp.abs(trained_full[:1] - trained_alone[:1]))) > 1e-4


def test_sizes_not_divisible_by_the_pooling_factor_are_refused_with_the_fix():
    model = ReportUNet(base_channels=4, levels=4)
    with pytest.raises(ValueError, match="divisible by 16.*pad"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))


def test_sinusoidal_embedding_shape_range_and_zero_timestep():
    emb = sinusoidal_embedding(jnp.array([0, 1, 99]), 32)
    assert emb.shape == (3, 32)
    np.testing.assert_allclose(emb[0, :16], 0.0)
    np.testing.assert_allclose(emb[0, 16:], 1.0)
    assert float(jnp.max(jnp.abs(emb))) <= 1.0
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(jnp.array([0]), 7)


def test_conv_output_head_starts_at_zero_and_keeps_the_shape():
    model = ReportUNet(base_channels=4, levels=2, time_embed_dim=8, output_head="conv")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
    t = jnp.array([3, 9])
    variables = model.init(jax.random.PRNGKey(1), x, t)
    out = model.apply(variables, x, t)
    chex.assert_shape(out, (2, 28, 28, 1))
    np.testing.assert_array_equal(out, 0.0)
    with pytest.raises(ValueError, match="block, conv"):
        ReportUNet(base_channels=4, levels=1, output_head="linear").init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
        )
