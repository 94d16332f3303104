"""The native convolution kernels compute what XLA's convolution does, and their absence costs speed, not results."""

import os
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_jax.cpu import kernels as cpu_kernels
from ddpm_jax.cpu.layers import (
    AUTO, Conv3x3Plan, batch_norm_matmul, batch_norm_sums_natively, conv3x3_plan, conv3x3_planned, layer_ops,
    upconv2x2_uses_native,
)
from ddpm_jax.models.layers import PLAIN, Conv3x3, UpConv2x2, conv3x3_xla

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or cpu_kernels._compiler() is None
    or os.environ.get("DDPM_JAX_NATIVE_KERNELS") == "0",
    reason="the native kernel is built on a CPU backend with a C++ compiler")


def _xla_weight_grad(x, dy):
    kernel = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), jnp.float32)
    return jax.vjp(lambda k: conv3x3_xla(x, k), kernel)[1](dy)[0]


def _assert_same_weight_grad(x, dy):
    ours = np.asarray(jax.jit(cpu_kernels.conv3x3_weight_grad)(x, dy))
    reference = np.asarray(jax.jit(_xla_weight_grad)(x, dy))
    assert ours.shape == reference.shape == (3, 3, x.shape[-1], dy.shape[-1])
    # Sums of B*H*W products in another order: float32 rounding relative to the gradient's scale.
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-5 * np.abs(reference).max() + 1e-6)


def _assert_same_conv(x, kernel, blocking="auto"):
    ours = np.asarray(jax.jit(cpu_kernels.conv3x3, static_argnums=2)(x, kernel, blocking))
    reference = np.asarray(jax.jit(conv3x3_xla)(x, kernel))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-5 * np.abs(reference).max() + 1e-6)


@needs_kernel
# (4, 28, 32, 16): more whole input vectors than output ones, the weight gradient's operands swapped.
@pytest.mark.parametrize("b, s, cin, cout", [(8, 32, 32, 32), (16, 28, 16, 16), (4, 16, 64, 128), (4, 28, 32, 16)])
def test_native_kernels_equal_xlas_at_the_unets_shapes(b, s, cin, cout):
    kx, kk, kd = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (b, s, s, cin))
    _assert_same_conv(x, jax.random.normal(kk, (3, 3, cin, cout)) * 0.1)
    _assert_same_weight_grad(x, jax.random.normal(kd, (b, s, s, cout)))


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), height=st.integers(1, 9), width=st.integers(1, 30),
       in_channels=st.integers(1, 20), out_blocks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_native_kernels_equal_xlas_convolution_and_weight_grad_at_every_shape_and_edge(
        batch, height, width, in_channels, out_blocks, seed):
    # 1-pixel maps and 1-row images (only the centre taps see the image); widths up to 30: the forward
    # kernel's full 12-, 6- and 4-pixel blocks and every remainder; channel counts that leave a remainder
    # after the weight gradient's 4-, 6- or 8-channel blocks; one to three vector blocks of outputs. The
    # forward pass blocked both ways at every width.
    kx, kk, kd = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (batch, height, width, in_channels))
    kernel = jax.random.normal(kk, (3, 3, in_channels, 16 * out_blocks))
    for blocking in ("rows", "images"):
        _assert_same_conv(x, kernel, blocking)
    _assert_same_weight_grad(x, jax.random.normal(kd, (batch, height, width, 16 * out_blocks)))


def _random_conv(x_shape, out_channels, kernel_scale, seed):
    """Normal x of ``x_shape``, a (3, 3, C, out_channels) kernel times ``kernel_scale``, and a normal dy."""
    kx, kk, kd = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, (3, 3, x_shape[-1], out_channels)) * kernel_scale
    return x, kernel, jax.random.normal(kd, (*x_shape[:-1], out_channels))


def _assert_blockings_agree(x, kernel, dy):
    """Both blockings of the forward pass and of the input gradient give the same floats, and XLA's to rounding."""
    for blocking in ("rows", "images"):
        _assert_same_conv(x, kernel, blocking)
    forward = [np.asarray(jax.jit(cpu_kernels.conv3x3, static_argnums=2)(x, kernel, b)) for b in ("rows", "images")]
    np.testing.assert_array_equal(forward[0], forward[1])
    input_grad = [np.asarray(jax.jit(cpu_kernels.conv3x3_input_grad, static_argnums=2)(dy, kernel, b))
                  for b in ("rows", "images")]
    np.testing.assert_array_equal(input_grad[0], input_grad[1])
    reference = np.asarray(jax.vjp(lambda x_: conv3x3_xla(x_, kernel), x)[1](dy)[0])
    np.testing.assert_allclose(input_grad[1], reference, rtol=0, atol=2e-5 * np.abs(reference).max() + 1e-6)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 30), height=st.integers(1, 8), width=st.integers(1, 8), in_blocks=st.integers(1, 3),
       out_blocks=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_blocking_across_images_gives_the_row_blockings_floats_at_every_small_shape(
        batch, height, width, in_blocks, out_blocks, seed):
    # Batches up to 30: blocks of 12, 4 and 1 images; 1-pixel maps, 1-row and 1-column images (every
    # pixel an edge); 16 to 80 channels written: blocks of two vectors and of one. Both sides whole
    # vectors, as the input gradient writes the forward pass's input channels.
    _assert_blockings_agree(*_random_conv((batch, height, width, 16 * in_blocks), 16 * out_blocks, 0.1, seed))


@needs_kernel
# The seed U-Net's small maps at a sampling batch: inputs of several hundred KiB to 3 MiB, split over
# images and over channel blocks in different proportions.
@pytest.mark.parametrize("b, s, cin, cout", [(100, 8, 128, 128), (100, 4, 512, 256), (100, 2, 512, 512)])
def test_blocking_across_images_gives_the_row_blockings_floats_at_the_unets_small_maps(b, s, cin, cout):
    _assert_blockings_agree(*_random_conv((b, s, s, cin), cout, 0.05, seed=5))


@needs_kernel
@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), height=st.integers(1, 9), width=st.integers(1, 30), in_blocks=st.integers(1, 2),
       out_channels=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_native_weight_grad_of_an_output_layer_equals_xlas_at_every_shape_and_edge(
        batch, height, width, in_blocks, out_channels, seed):
    # One or two output channels: the kernel runs with x and dy swapped and its result flipped back.
    kx, kd = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (batch, height, width, 16 * in_blocks))
    _assert_same_weight_grad(x, jax.random.normal(kd, (batch, height, width, out_channels)))


@needs_kernel
@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), height=st.integers(1, 7), width=st.integers(1, 15), in_blocks=st.integers(1, 3),
       out_channels=st.sampled_from([8, 16, 24, 40]), seed=st.integers(0, 2**16))
def test_native_upconv_gradients_equal_flax_conv_transposes_at_every_shape(
        batch, height, width, in_blocks, out_channels, seed):
    # Widths up to 15: the input gradient's 12- and 4-pixel blocks and every remainder; 2O of one to five
    # vectors: the weight gradient's two- and one-vector blocks.
    kx, kp, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (batch, height, width, 16 * in_blocks))
    reference = nn.ConvTranspose(out_channels, (2, 2), strides=(2, 2), padding="VALID")
    params = reference.init(kp, x)
    g = jax.random.normal(kg, (batch, 2 * height, 2 * width, out_channels))
    assert upconv2x2_uses_native(x, out_channels)
    lowered = jax.jit(jax.grad(lambda p, x_: jnp.sum(UpConv2x2(out_channels, ops=AUTO).apply(p, x_) * g),
                               argnums=(0, 1)))
    assert "ddpm_jax_upconv2x2_weight_grad" in lowered.lower(params, x).as_text()
    ours, ref = (jax.vjp(lambda p, x_: module.apply(p, x_), params, x)
                 for module in (UpConv2x2(out_channels, ops=AUTO), reference))
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max() + 1e-6),
                 ours[1](g), ref[1](g))


def test_upconv_gradients_are_native_only_where_auto_and_whole_vectors(monkeypatch):
    x = jnp.zeros((2, 7, 7, 64))
    assert not upconv2x2_uses_native(x, 4)  # 2O = 8: no whole vector
    assert not upconv2x2_uses_native(jnp.zeros((2, 7, 7, 24)), 32)
    assert not upconv2x2_uses_native(x, 32, "matmul") and not upconv2x2_uses_native(x, 32, "xla")
    assert not upconv2x2_uses_native(x.astype(jnp.bfloat16), 32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not upconv2x2_uses_native(x, 32)


N, X, M, T = "native", "xla", "matmul", "taps"
PLAN_CASES = [  # (input shape, features, impl, plan), from python -m benchmarks.conv_shapes (both presets)
    ((4, 16, 16, 16), 32, "auto", (N, N, N)),
    ((4, 14, 14, 32), 16, "auto", (N, N, N)),  # twice as many input channels
    ((4, 28, 28, 32), 8, "auto", (X, N, X)),  # 8 output channels: no whole vector but the input gradient's
    ((4, 16, 16, 128), 64, "auto", (N, N, N)),
    ((4, 16, 16, 256), 64, "auto", (X, N, X)),  # four times as many: XLA's forward pass
    ((4, 28, 28, 1), 16, "auto", (N, T, N)),  # the first layer: its input gradient writes one channel
    ((4, 12, 12, 8), 32, "auto", (X, X, N)),  # under 14x14
    # At most 8 pixels wide: the native convolution blocks pixels across images (both passes that write
    # whole vectors); the weight gradient as before.
    ((4, 7, 7, 32), 64, "auto", (N, N, N)),
    ((4, 8, 8, 128), 128, "auto", (N, N, N)),
    ((4, 8, 8, 256), 128, "auto", (N, N, X)),
    ((4, 4, 4, 128), 256, "auto", (N, N, X)),
    ((4, 32, 32, 32), 1, "auto", (T, N, N)),  # an output layer: both gradients native, the weight gradient swapped
    ((4, 28, 28, 16), 2, "auto", (T, N, N)),
    ((4, 6, 6, 32), 1, "auto", (T, N, T)),  # under 7x7, but a small map: the input gradient native
    ((4, 28, 28, 8), 1, "auto", (T, M, T)),  # 8 input channels: no whole vector either way
    ((4, 32, 32, 1), 1, "auto", (T, T, T)),  # one channel in and out
    ((4, 3, 4, 2), 2, "auto", (T, T, T)),
    ((4, 1, 4, 64), 64, "auto", (N, N, M)),  # a map of 4 pixels, not 2x2
    ((4, 2, 2, 64), 64, "auto", (N, N, M)),  # 2x2: native where the kernels are built, else dense
    ((4, 1, 2, 512), 512, "auto", (N, N, M)),
    ((4, 16, 16, 16), 32, "xla", (X, X, X)),
    ((4, 16, 16, 16), 32, "matmul", (M, M, M)),
]


@needs_kernel
@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 9), height=st.integers(1, 12), width=st.integers(1, 12), channels=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_example_channel_sums_are_the_float64_sums_to_float32_rounding(batch, height, width, channels, seed):
    # Up to 144 positions per example: one 64-position block or several, and remainders; any channel count.
    a = np.random.default_rng(seed).normal(size=(batch, height, width, channels)).astype(np.float32) * 3 + 1
    got = np.asarray(jax.jit(cpu_kernels.example_channel_sums)(a), np.float64)
    expected = a.astype(np.float64).sum((1, 2))
    assert got.shape == (batch, channels)
    assert np.all(np.abs(got - expected) <= 1e-6 * np.abs(a).astype(np.float64).sum((1, 2)) + 1e-6)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 40), height=st.integers(1, 9), width=st.integers(1, 9), channels=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_channel_moments_are_the_float64_sums_to_float32_rounding(batch, height, width, channels, seed):
    # Up to 3,240 positions: one part or several, whole 64-row blocks and remainders; any channel count.
    rng = np.random.default_rng(seed)
    a, b = (rng.normal(size=(batch, height, width, channels)).astype(np.float32) * 3 + 1 for _ in range(2))
    shift = rng.normal(size=channels).astype(np.float32)
    total, dot = jax.jit(cpu_kernels.channel_moments)(a, b, shift)
    a64, centered64 = a.astype(np.float64), b.astype(np.float64) - shift
    for got, expected, magnitude in ((total, a64, np.abs(a64)), (dot, a64 * centered64, np.abs(a64 * centered64))):
        # Per channel, relative to the sum of magnitudes: float32 rounding of the block sums.
        error = np.abs(np.asarray(got, np.float64) - expected.sum((0, 1, 2)))
        assert np.all(error <= 1e-6 * magnitude.sum((0, 1, 2)) + 1e-6), error.max()


@needs_kernel
def test_batch_norm_with_native_sums_is_the_matmul_form_to_float32_rounding():
    # A cpu-preset-sized map: 25,088 positions, so the sums run in several parts on both threads.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(32, 28, 28, 16)) * 2 + 0.5, jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=16), jnp.float32) for _ in range(2))
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss_and_grads(native):
        def loss(x, scale, bias):
            y, mean, var = batch_norm_matmul(x, scale, bias, 1e-5, native)
            return jnp.sum(jnp.tanh(y) * weights), (y, mean, var)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)

    assert batch_norm_sums_natively("auto") and not batch_norm_sums_natively("matmul")
    for got, expected in zip(jax.tree.leaves(loss_and_grads(True)), jax.tree.leaves(loss_and_grads(False))):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@needs_kernel
@pytest.mark.parametrize("shape, features, impl, plan", PLAN_CASES)
def test_conv3x3_plan_is_native_only_where_it_was_measured_faster(shape, features, impl, plan):
    assert conv3x3_plan(jnp.zeros(shape), features, impl) == plan
    assert set(conv3x3_plan(jnp.zeros(shape, jnp.bfloat16), features, impl)) <= {X, M, T, "dense"}


@pytest.mark.parametrize("shape, features", [((4, 2, 2, 64), 64), ((4, 16, 16, 16), 32), ((4, 32, 32, 1), 32)])
def test_conv3x3_plan_on_another_backend_is_xlas_everywhere(shape, features, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert conv3x3_plan(jnp.zeros(shape), features) == (X, X, X)
    assert layer_ops("auto") is PLAIN  # and the network is handed XLA's own operations there


@needs_kernel
# Every form in every pass, and (T, M, T): the forms of an output layer.
@pytest.mark.parametrize("plan", [(N, M, X), (M, X, N), (X, N, M), (T, T, T), (T, M, T)])
def test_every_form_of_every_pass_gives_xlas_convolution_and_gradients(plan):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(3), 3)
    x, kernel = jax.random.normal(kx, (2, 14, 14, 16)), jax.random.normal(kk, (3, 3, 16, 32))
    g = jax.random.normal(kg, (2, 14, 14, 32))
    out, vjp = jax.vjp(lambda x_, k_: conv3x3_planned(x_, k_, Conv3x3Plan(*plan)), x, kernel)
    ref_out, ref_vjp = jax.vjp(conv3x3_xla, x, kernel)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4)
    for ours, ref in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("shape, features", [((2, 16, 16, 16), 32), ((2, 14, 14, 3), 16), ((2, 12, 12, 8), 32),
                                             ((2, 14, 14, 32), 16), ((2, 8, 8, 32), 1)])
def test_conv3x3_auto_gives_xlas_outputs_and_gradients(shape, features):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    dy = jax.random.normal(jax.random.PRNGKey(2), (*shape[:3], features))
    params = Conv3x3(features, ops=layer_ops("xla")).init(jax.random.PRNGKey(1), x)

    def outputs_and_grads(impl):
        def loss(p, x):
            return jnp.sum(Conv3x3(features, ops=layer_ops(impl)).apply(p, x) * dy)
        out = jax.jit(Conv3x3(features, ops=layer_ops(impl)).apply)(params, x)
        return out, jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    ours_out, (ours_params, ours_x) = outputs_and_grads("auto")
    ref_out, (ref_params, ref_x) = outputs_and_grads("xla")
    np.testing.assert_allclose(ours_out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_x, ref_x, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), ours_params, ref_params)


def test_without_a_compiler_the_kernel_is_off_with_a_warning_that_names_the_fix(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-ddpm-jax")
    monkeypatch.delenv("DDPM_JAX_NATIVE_KERNELS", raising=False)
    cpu_kernels.kernels_available.cache_clear()
    try:
        fix = "Install a C\\+\\+ compiler or name one in \\$CXX"
        with pytest.warns(RuntimeWarning, match=f"no C\\+\\+ compiler.*{fix}"):
            assert not cpu_kernels.kernels_available()
        assert conv3x3_plan(jnp.ones((2, 16, 16, 16)), 16, "auto") == ("xla", "xla", "xla")
        monkeypatch.setenv("DDPM_JAX_NATIVE_KERNELS", "0")
        cpu_kernels.kernels_available.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # turned off on purpose: silent
            assert not cpu_kernels.kernels_available()
    finally:
        cpu_kernels.kernels_available.cache_clear()


@needs_kernel
def test_the_built_kernel_is_cached_and_not_compiled_again(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_JAX_CACHE_DIR", str(tmp_path))
    compiler = cpu_kernels._compiler()
    first = cpu_kernels._build(compiler)
    assert first.parent == tmp_path and first.stat().st_size > 0
    built_at = first.stat().st_mtime_ns
    assert cpu_kernels._build(compiler) == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


@needs_kernel
def test_with_several_devices_the_convolutions_stay_xlas_which_it_partitions():
    # XLA cannot split a custom call over the batch; it would repeat the whole batch's work on every device.
    code = ("import jax, jax.numpy as jnp\n"
            "from ddpm_jax.cpu import kernels as cpu_kernels\n"
            "from ddpm_jax.cpu.layers import conv3x3_plan\n"
            "assert jax.device_count() == 2\n"
            "print(cpu_kernels.kernels_available(), *conv3x3_plan(jnp.zeros((4, 16, 16, 16)), 32))\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "xla", "xla", "xla"]
