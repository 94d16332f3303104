"""The fast convolutions compute what Flax's do, with the same parameters."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.cpu.layers import (
    AUTO, MATMUL, Conv3x3Plan, conv3x3_dense, conv3x3_planned, conv3x3_taps, conv3x3_uses_matmul, dense_conv_matrix,
    flipped_kernel, layer_ops,
)
from ddpm_jax.models import ReportUNet
from ddpm_jax.models.layers import (
    PLAIN, BatchNorm, Conv3x3, UpConv2x2, add_per_example_channel_bias, conv3x3_xla, max_pool_2x2,
)

SHAPES = [(2, 2, 2, 16, 8), (3, 4, 4, 8, 8), (2, 8, 8, 1, 4), (2, 6, 10, 3, 5)]  # (B, H, W, C_in, C_out)


@pytest.mark.parametrize("b, h, w, cin, cout", SHAPES)
@pytest.mark.parametrize("impl", ["xla", "matmul", "auto"])
def test_conv3x3_matches_flax_conv_with_the_same_parameters(b, h, w, cin, cout, impl):
    x = jax.random.normal(jax.random.PRNGKey(0), (b, h, w, cin))
    reference = nn.Conv(cout, (3, 3), padding="SAME")
    params = reference.init(jax.random.PRNGKey(1), x)
    ours = Conv3x3(cout, ops=layer_ops(impl))
    assert jax.tree.structure(ours.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "matmul", "auto"])
def test_upconv2x2_matches_flax_conv_transpose_values_and_gradients_with_the_same_parameters(impl):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 6))
    reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID")
    params = reference.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
    weights = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 10, 4))
    out = UpConv2x2(4, ops=layer_ops(impl)).apply(params, x)
    assert out.shape == (2, 6, 10, 4)
    np.testing.assert_allclose(out, reference.apply(params, x), rtol=1e-5, atol=1e-5)
    # Each output row parity's product and the concatenation that interleaves them, differentiated.
    grads = [jax.grad(lambda p, x_: jnp.sum(module.apply(p, x_) * weights), argnums=(0, 1))(params, x)
             for module in (UpConv2x2(4, ops=layer_ops(impl)), reference)]
    jax.tree.map(lambda ours, ref: np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5), *grads)


def _assert_form_is_xlas_convolution_with_its_gradients(form, b, h, w, cin, cout, seed):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    x, kernel, g = (jax.random.normal(kx, (b, h, w, cin)), jax.random.normal(kk, (3, 3, cin, cout)),
                    jax.random.normal(kg, (b, h, w, cout)))
    plan = Conv3x3Plan(form, form, form)
    out, vjp = jax.vjp(lambda x_, k_: conv3x3_planned(x_, k_, plan), x, kernel)
    ref_out, ref_vjp = jax.vjp(conv3x3_xla, x, kernel)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    return x, kernel, ref_out


@pytest.mark.parametrize("h, w", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_conv3x3_dense_is_xlas_convolution_with_the_same_gradients_on_maps_up_to_2x2(h, w):
    _, kernel, _ = _assert_form_is_xlas_convolution_with_its_gradients("dense", 3, h, w, 5, 7, seed=h * 3 + w)
    with pytest.raises(ValueError, match="at most 2x2 pixels, got 3x2"):
        conv3x3_dense(jnp.zeros((1, 3, 2, 5)), kernel)


@pytest.mark.parametrize("h, w, cin, cout", [(1, 1, 3, 1), (1, 5, 1, 2), (3, 4, 6, 1), (5, 5, 2, 7)])
def test_conv3x3_taps_is_xlas_convolution_with_the_same_gradients(h, w, cin, cout):
    x, kernel, ref_out = _assert_form_is_xlas_convolution_with_its_gradients("taps", 2, h, w, cin, cout,
                                                                             seed=h * 7 + w)
    np.testing.assert_allclose(conv3x3_taps(x, kernel), ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h, w", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_dense_matrix_of_the_flipped_kernel_is_the_transpose(h, w):
    # What lets the dense input gradient read the forward pass's matrix instead of building another.
    kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 5, 7))
    np.testing.assert_array_equal(dense_conv_matrix(flipped_kernel(kernel), h, w), dense_conv_matrix(kernel, h, w).T)


def test_a_sampling_loop_builds_the_dense_matrix_once_outside_the_loop():
    # A transpose after the gather would stay in the loop (XLA does not hoist one on its own) and copy
    # the matrix at every step; the gather straight into the matrix's layout is hoisted.
    kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 48, 48))

    def loop(kernel, x):
        return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(conv3x3_dense(x, kernel)), x)

    hlo = jax.jit(loop).lower(kernel, jnp.ones((2, 2, 2, 48))).compile().as_text()
    (body_name,) = re.findall(r"\bwhile\(.*?body=%([\w.\-]+)", hlo)
    body = hlo[hlo.index(f"%{body_name} ("):]
    body = body[: body.index("\n}")]
    # Inside the loop the matrix may only be passed along or viewed (a bitcast), never computed or copied.
    made_in_loop = [line for line in body.splitlines()[1:] if re.search(r"= f32\[192,192\]", line)
                    and not re.search(r"\b(get-tuple-element|parameter|tuple|bitcast)\(", line)]
    assert not made_in_loop, made_in_loop
    assert re.search(r"f32\[192,192\]", body), "the loop no longer reads the matrix: the test checks nothing"


def test_unknown_conv_impl_is_refused():
    with pytest.raises(ValueError, match="conv_impl|impl"):
        conv3x3_uses_matmul(2, 2, 8, "fast")
    with pytest.raises(ValueError, match="conv_impl|impl"):
        layer_ops("fast")


def test_the_switch_hands_xlas_ops_to_xla_and_to_auto_off_the_cpu(monkeypatch):
    assert layer_ops("xla") is PLAIN and layer_ops("matmul") is MATMUL
    assert layer_ops("auto") is (AUTO if jax.default_backend() == "cpu" else PLAIN)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layer_ops("auto") is PLAIN and layer_ops("matmul") is MATMUL


def test_auto_uses_matmul_only_where_xla_cpu_is_slow():
    assert conv3x3_uses_matmul(2, 2, 512) and conv3x3_uses_matmul(32, 32, 1)
    assert not conv3x3_uses_matmul(16, 16, 64) and not conv3x3_uses_matmul(4, 4, 256)


def test_unet_gives_the_same_outputs_and_gradients_with_every_conv_impl():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 1))
    t = jnp.array([0, 3, 7, 9])
    models = {impl: ReportUNet(base_channels=4, levels=3, ops=layer_ops(impl)) for impl in ("xla", "matmul", "auto")}
    variables = {impl: jax.jit(m.init)(jax.random.PRNGKey(1), x, t) for impl, m in models.items()}
    # Identical parameter trees and initial values: checkpoints do not depend on the implementation.
    for impl in ("matmul", "auto"):
        jax.tree.map(np.testing.assert_array_equal, variables[impl], variables["xla"])

    def loss_and_grads(model, v):
        def loss(params):
            out, _ = model.apply({**v, "params": params}, x, t, train=True, mutable=["batch_stats"])
            return jnp.mean(out**2)

        # Jitted: one compile per implementation instead of hundreds of op-by-op dispatches (30 s -> a few).
        return jax.jit(jax.value_and_grad(loss))(v["params"])

    ref_loss, ref_grads = loss_and_grads(models["xla"], variables["xla"])
    reference_out = jax.jit(models["xla"].apply)(variables["xla"], x, t)
    for impl in ("matmul", "auto"):
        out = jax.jit(models[impl].apply)(variables["xla"], x, t)
        np.testing.assert_allclose(out, reference_out, rtol=1e-4, atol=1e-5)
        value, grads = loss_and_grads(models[impl], variables["xla"])
        np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5), grads, ref_grads)


def test_bfloat16_compute_keeps_float32_parameters_and_output():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    t = jnp.array([1, 2])
    model = ReportUNet(base_channels=4, levels=2, dtype=jnp.bfloat16)
    variables = model.init(jax.random.PRNGKey(1), x, t)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables["params"]))
    out = model.apply(variables, x, t)
    assert out.dtype == jnp.float32
    reference = ReportUNet(base_channels=4, levels=2).apply(variables, x, t)
    # bf16 keeps 8 bits of mantissa: the same network to about 1%.
    np.testing.assert_allclose(out, reference, rtol=0.1, atol=0.05)


def test_xla_cpu_flags_are_added_once_and_never_over_the_users_choice():
    from ddpm_jax.cpu import settings as xla_cpu

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.apply_cpu_flags(env, avx512=True) == [xla_cpu.YNN_FLAG, xla_cpu.VECTOR_FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {xla_cpu.YNN_FLAG} {xla_cpu.VECTOR_FLAG}"
    assert xla_cpu.apply_cpu_flags(env, avx512=True) == []  # already there
    without_avx512 = {}
    assert xla_cpu.apply_cpu_flags(without_avx512, avx512=False) == [xla_cpu.YNN_FLAG]
    assert "prefer_vector_width" not in without_avx512["XLA_FLAGS"]
    users = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot --xla_cpu_prefer_vector_width=256"}
    assert xla_cpu.apply_cpu_flags(users, avx512=True) == [] and users["XLA_FLAGS"].endswith("=dot --xla_cpu_prefer_vector_width=256")
    opted_out = {"DDPM_JAX_KEEP_XLA_FLAGS": "1"}
    assert xla_cpu.apply_cpu_flags(opted_out, avx512=True) == [] and "XLA_FLAGS" not in opted_out


def test_avx512_is_read_from_the_processors_flags(tmp_path):
    from ddpm_jax.cpu import settings as xla_cpu

    with_it, without = tmp_path / "a", tmp_path / "b"
    with_it.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512_bf16_not_f\n")
    assert xla_cpu.has_avx512(str(with_it)) and not xla_cpu.has_avx512(str(without))
    assert not xla_cpu.has_avx512(str(tmp_path / "missing"))
    similar = tmp_path / "c"
    similar.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512fp16\n")  # a longer flag name, not avx512f
    assert not xla_cpu.has_avx512(str(similar))


def test_the_loss_and_its_gradient_agree_with_and_without_the_xla_cpu_flags_to_float32_rounding():
    check = Path(__file__).parent / "_xla_flags_check.py"
    runs = {}
    for keep in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"DDPM_JAX_KEEP_XLA_FLAGS": keep}
        out = subprocess.run([sys.executable, str(check)], env=env, capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).parents[2])
        assert out.returncode == 0, out.stderr[-3000:]
        runs[keep] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, plain = runs["0"], runs["1"]
    assert "ynn_fusion_type" in ours["xla_flags"] and plain["xla_flags"] == ""
    # Only the order of float32 operations differs: the loss and every gradient agree to float32 rounding.
    assert ours["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    # Tolerance against the largest gradient: a bias just before a BatchNorm has an exact gradient of zero,
    # so its computed gradient is rounding noise under either flag set.
    assert len(ours["grads"]) > 20
    scale = max(np.abs(b).max() for b in plain["grads"])
    for a, b in zip(ours["grads"], plain["grads"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)


def test_bfloat16_train_step_keeps_float32_state_and_a_finite_loss():
    from ddpm_jax.configs import get_config, schedule_from_config
    from ddpm_jax.training.setup import create_train_state
    from ddpm_jax.training.train import Batching, make_dataset_train_step

    config = get_config("tiny")
    config.model.compute_dtype = "bfloat16"
    state = create_train_state(config)
    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    state, metrics = make_dataset_train_step(schedule_from_config(config), Batching.from_config(config))(state, images)
    assert np.isfinite(float(metrics["loss"]))
    for tree in (state.params, state.opt_state, state.batch_stats):
        assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("impl", ["xla", "matmul", "auto"])
def test_max_pool_matches_flax_values_and_gradient_including_ties(impl):
    # Values on a half-integer grid: many windows hold their maximum twice, as flat background does.
    x = jnp.round(jax.random.normal(jax.random.PRNGKey(0), (3, 8, 6, 4)) * 2) / 2
    g = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 3, 4))

    def reference(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    np.testing.assert_array_equal(max_pool_2x2(x, layer_ops(impl)), reference(x))
    ours = jax.vjp(lambda x: max_pool_2x2(x, layer_ops(impl)), x)[1](g)[0]
    np.testing.assert_array_equal(ours, jax.vjp(reference, x)[1](g)[0])


def _random_batch_norm_variables(x, rng):
    channels = x.shape[-1]
    return {
        "params": {"scale": jnp.asarray(rng.normal(size=channels), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=channels), jnp.float32)},
        "batch_stats": {"mean": jnp.asarray(rng.normal(size=channels), jnp.float32),
                        "var": jnp.asarray(rng.uniform(0.5, 2, size=channels), jnp.float32)},
    }


# A constant channel (variance 0, clipped) and a 1-channel map are the edge cases of the closed-form gradient.
@pytest.mark.parametrize("shape", [(8, 4, 4, 16), (16, 6, 5, 3), (4, 8, 8, 1)])
@pytest.mark.parametrize("impl", ["xla", "matmul", "auto"])
def test_batch_norm_matches_flax_values_gradients_and_running_statistics(shape, impl):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)
    if shape[-1] > 1:
        x = x.at[..., 0].set(2.5)  # variance exactly 0
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
    reference = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    ours = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, ops=layer_ops(impl))
    variables = _random_batch_norm_variables(x, rng)
    assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(variables)

    def grads_and_stats(module):
        def loss(params, x):
            y, updated = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.tanh(y) * weights), (y, updated)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)

    expected, got = grads_and_stats(reference), grads_and_stats(ours)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4), expected, got)
    # Evaluation mode normalizes with the running statistics.
    np.testing.assert_allclose(
        BatchNorm(use_running_average=True, ops=layer_ops(impl)).apply(variables, x),
        nn.BatchNorm(use_running_average=True).apply(variables, x), rtol=1e-5, atol=1e-5)


def test_batch_norm_keeps_float32_statistics_under_bfloat16_compute():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 8)).astype(jnp.bfloat16)
    y, updated = BatchNorm(dtype=jnp.bfloat16, ops=MATMUL).init_with_output(jax.random.PRNGKey(0), x)
    assert y.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updated))


@pytest.mark.parametrize("impl", ["xla", "matmul"])
def test_bias_gradient_is_the_sum_over_all_other_axes(impl):
    y = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4, 6))
    bias = jnp.arange(6.0)
    weights = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    dy, dbias = jax.grad(lambda y, b: jnp.sum(layer_ops(impl).add_bias(y, b) * weights), argnums=(0, 1))(y, bias)
    np.testing.assert_array_equal(dy, weights)
    np.testing.assert_allclose(dbias, weights.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "matmul", "auto"])  # auto: the native sums where they are built
def test_per_example_bias_gradient_is_the_sum_over_height_and_width(impl):
    h = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4, 6))
    v = jax.random.normal(jax.random.PRNGKey(2), (3, 6))
    weights = jax.random.normal(jax.random.PRNGKey(1), h.shape)
    np.testing.assert_array_equal(add_per_example_channel_bias(h, v, layer_ops(impl)), h + v[:, None, None, :])
    dh, dv = jax.grad(lambda h, v: jnp.sum(add_per_example_channel_bias(h, v, layer_ops(impl)) * weights),
                      argnums=(0, 1))(h, v)
    np.testing.assert_array_equal(dh, weights)
    np.testing.assert_allclose(dv, weights.sum(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):  # one value per example and channel
        add_per_example_channel_bias(h, v[:, :4], layer_ops(impl))
