"""The PyTorch peers of benchmarks/peers.py: the port matches ReportUNet (counts, shapes, outputs); its options
(channels-last memory format, bf16 autocast, torch.compile) keep the function and report themselves."""

import copy
import json
import math
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import peers  # noqa: E402
from ddpm_jax.data import preprocess  # noqa: E402
from ddpm_jax.models.unet import ReportUNet, sinusoidal_embedding  # noqa: E402


def test_param_counts_match_the_flax_model():
    assert peers.count_params(peers.TorchReportUNet()) == 12_552_848
    assert peers.count_params(peers.TorchReportUNet(base_channels=16, levels=2, output_head="conv")) == 199_025
    peers.self_check()


@pytest.mark.parametrize("output_head", ["block", "conv"])
def test_output_shapes(output_head):
    model = peers.TorchReportUNet(base_channels=4, levels=2, output_head=output_head).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 1, 28, 28), torch.tensor([0, 99]))
    assert out.shape == (2, 1, 28, 28) and out.dtype == torch.float32
    if output_head == "conv":
        assert not out.any()  # zero-initialized head


def test_report_model_output_shape():
    model = peers.TorchReportUNet().eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 1, 32, 32), torch.tensor([3])).shape == (1, 1, 32, 32)


def test_rejects_sizes_not_divisible_by_the_poolings():
    with pytest.raises(ValueError, match="divisible by 16"):
        peers.TorchReportUNet(base_channels=4)(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.int64))


def test_sinusoidal_embedding_matches_jax():
    t = np.array([0, 1, 7, 50, 99, 999])
    ours = np.asarray(sinusoidal_embedding(jnp.asarray(t), 32))
    port = peers.sinusoidal_embedding(torch.tensor(t), 32).numpy()
    assert port.shape == (6, 32) and port.dtype == np.float32
    np.testing.assert_allclose(port, ours, rtol=0, atol=1e-5)


def test_preprocess_matches_ddpm_jax():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 28, 28, 1), dtype=np.uint8)
    for size in (28, 32):
        ours = np.asarray(preprocess(jnp.asarray(images), size)).transpose(0, 3, 1, 2)
        port = peers._preprocess(torch.tensor(images.transpose(0, 3, 1, 2)), size).numpy()
        np.testing.assert_allclose(port, ours, atol=1e-6)


def _load_flax_variables(model, params, batch_stats):
    """Copy ReportUNet's variables into the port (NHWC/HWIO -> NCHW/OIHW)."""

    def tensor(a):
        return torch.tensor(np.ascontiguousarray(a))

    def conv(m, p):
        m.weight.data, m.bias.data = tensor(np.asarray(p["kernel"]).transpose(3, 2, 0, 1)), tensor(p["bias"])

    def norm(m, p, s):
        m.weight.data, m.bias.data = tensor(p["scale"]), tensor(p["bias"])
        m.running_mean.data, m.running_var.data = tensor(s["mean"]), tensor(s["var"])

    blocks = [*model.down, model.deepest, model.bottleneck, *model.up]
    if model.output_head == "block":
        blocks.append(model.head)
    for i, block in enumerate(blocks):
        p, s = params[f"TimeConditionedBlock_{i}"], batch_stats[f"TimeConditionedBlock_{i}"]
        conv(block.conv0, p["Conv_0"])
        conv(block.conv1, p["Conv_1"])
        norm(block.norm0, p["BatchNorm_0"], s["BatchNorm_0"])
        norm(block.norm1, p["BatchNorm_1"], s["BatchNorm_1"])
        block.time.weight.data, block.time.bias.data = tensor(np.asarray(p["Dense_0"]["kernel"]).T), tensor(
            p["Dense_0"]["bias"]
        )
    for i, upconv in enumerate(model.upconvs):
        # Flax's ConvTranspose applies its kernel flipped: torch's W[c, o, a, b] = kernel[1 - a, 1 - b, c, o].
        p = params[f"ConvTranspose_{i}"]
        upconv.weight.data = tensor(np.flip(np.asarray(p["kernel"]), (0, 1)).transpose(2, 3, 0, 1))
        upconv.bias.data = tensor(p["bias"])
    if model.output_head == "conv":
        conv(model.head, params["Conv_0"])


def test_port_computes_the_same_function_as_report_unet():
    flax_model = ReportUNet(base_channels=4, levels=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
    t = jnp.array([0, 5, 99])
    variables = flax_model.init(jax.random.PRNGKey(0), x, t)
    # Running statistics away from (0, 1), so that eval mode really uses them.
    stats = jax.tree_util.tree_map(lambda a: a + 0.3, variables["batch_stats"])
    port = peers.TorchReportUNet(base_channels=4, levels=2)
    _load_flax_variables(port, variables["params"], stats)
    xt, tt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)), torch.tensor(np.asarray(t))
    for train in (False, True):
        ours = flax_model.apply({"params": variables["params"], "batch_stats": stats}, x, t, train=train,
                                mutable=["batch_stats"] if train else False)
        ours = np.asarray(ours[0] if train else ours).transpose(0, 3, 1, 2)
        with torch.no_grad():
            theirs = port.train(train)(xt, tt).numpy()
        np.testing.assert_allclose(theirs, ours, atol=2e-5, err_msg=f"train={train}")


def test_tiny_measurements_return_their_keys():
    train = peers.torch_train_throughput(4, 2, "conv", 28, batch=2, steps=1, warmup_steps=0, num_timesteps=5)
    assert set(train) >= {"train_images_per_s", "step_seconds", "first_step_seconds", "params", "threads"}
    assert len(train["step_seconds"]) == 1 and train["train_images_per_s"] > 0
    sample = peers.torch_sample_throughput(4, 2, "block", 8, n=2, num_timesteps=5, steps_to_time=2)
    assert sample["extrapolated"] and sample["samples_per_s"] > 0
    full = peers.torch_sample_throughput(4, 2, "block", 8, n=2, num_timesteps=3)
    assert not full["extrapolated"]


def test_diffusers_peer_size():
    pytest.importorskip("diffusers")
    unet, scheduler = peers._diffusers_unet_and_scheduler(100)
    assert peers.count_params(unet) == peers.DIFFUSERS_PARAMS
    assert len(scheduler.timesteps) == 100


def test_device_defaults_to_cpu(capsys):
    assert peers.build_parser().parse_args(["torch-train"]).device == "cpu"
    assert peers.main(["torch-train", "--json", "--base-channels", "4", "--levels", "2", "--output-head", "conv",
                       "--image-size", "28", "--batch", "2", "--steps", "1", "--warmup-steps", "0",
                       "--num-timesteps", "5"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["device"] == "cpu" and r["amp"] is None and r["threads"] >= 1 and "device_peak_mb" not in r
    assert r["channels_last"] is False and r["compile"] is None and r["compile_seconds"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        peers.main(["torch-train", "--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda: this PyTorch" in err and "sees no CUDA device" in err and "Traceback" not in err
    # As the suite runs it: its own process, whose last stderr line is the row's error.
    out = subprocess.run([sys.executable, "-m", "benchmarks.peers", "torch-sample", "--device", "cuda", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "sees no CUDA device" in out.stderr.strip().splitlines()[-1]


def test_amp_bf16_train_step_and_its_scope():
    train = peers.torch_train_throughput(4, 2, "conv", 28, batch=2, steps=1, warmup_steps=0, num_timesteps=5,
                                         amp=True)
    assert train["amp"] == "bf16" and train["device"] == "cpu" and train["train_images_per_s"] > 0
    for refused in (["diffusers-sample", "--amp", "bf16"], ["diffusers-train", "--channels-last"],
                    ["diffusers-sample", "--compile"], ["self-check", "--compile"]):
        with pytest.raises(SystemExit):
            peers.main(refused)


# A model small enough for a few seconds a run on a 2-core CPU (compiled: see test_compile_on_the_cpu).
TINY = ["--base-channels", "4", "--levels", "1", "--output-head", "conv", "--image-size", "28", "--num-timesteps", "3"]
TINY_RUNS = {"torch-train": ["torch-train", "--json", *TINY, "--batch", "4", "--steps", "1"],
             "torch-sample": ["torch-sample", "--json", *TINY, "--n", "4"]}


def _json_row(capsys, argv):
    assert peers.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_channels_last_computes_the_same_function():
    torch.manual_seed(0)
    model = peers.TorchReportUNet(base_channels=4, levels=2)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.5, 1.5)  # so that eval mode uses them
    fast = peers._prepare_port(copy.deepcopy(model), peers.CPU, channels_last=True)
    assert fast.down[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast.down[0].conv1.weight.is_contiguous()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 99])
    x_last = x.contiguous(memory_format=torch.channels_last)
    for train in (False, True):
        with torch.no_grad():
            ours, theirs = model.train(train)(x, t), fast.train(train)(x_last, t)
        np.testing.assert_allclose(theirs.numpy(), ours.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"train={train}")


@pytest.mark.parametrize("what", sorted(TINY_RUNS))
def test_channels_last_and_bf16_from_the_command_line(what, capsys):
    r = _json_row(capsys, [*TINY_RUNS[what], "--channels-last", "--amp", "bf16"])
    rate = r["train_images_per_s" if what == "torch-train" else "samples_per_s"]
    assert r["channels_last"] is True and r["amp"] == "bf16"
    assert r["compile"] is None and r["compile_seconds"] is None
    assert math.isfinite(rate) and rate > 0


def test_amp_bf16_sample_autocasts_the_forward_pass_only(monkeypatch):
    dtypes = []
    forward = peers.TorchReportUNet.forward

    def recording_forward(self, x, t):
        out = forward(self, x, t)
        dtypes.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(peers.TorchReportUNet, "forward", recording_forward)
    sample = peers.torch_sample_throughput(4, 1, "block", 8, n=2, num_timesteps=3, amp=True)
    assert sample["amp"] == "bf16" and math.isfinite(sample["samples_per_s"]) and sample["samples_per_s"] > 0
    # The model ran under autocast; the sampler's arithmetic stayed float32 (each step's x, fed to the next forward).
    assert len(dtypes) == 1 + 3 and set(dtypes) == {(torch.float32, torch.bfloat16)}
    assert peers.torch_sample_throughput(4, 1, "block", 8, n=2, num_timesteps=2)["amp"] is None


def _check_compile_error(capsys, argv, message):
    assert peers.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""  # no JSON for a run that did not happen
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: torch.compile failed: ")
    assert message in err.strip().splitlines()[-1]


@pytest.mark.parametrize("what", sorted(TINY_RUNS))
@pytest.mark.parametrize("when", ["wrapping", "first call"])
def test_compile_failure_is_a_one_line_error(what, when, monkeypatch, capsys):
    class FailsWhenCalled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args):
            raise RuntimeError("no backend for this\nsecond line of the message")

    def failing_compile(model, mode=None):
        if when == "wrapping":
            raise RuntimeError("no backend for this\nsecond line of the message")
        return FailsWhenCalled(model)

    monkeypatch.setattr(torch, "compile", failing_compile)
    _check_compile_error(capsys, [*TINY_RUNS[what], "--compile"], "RuntimeError: no backend for this")
    # Without --compile the same failure is a bug, not a compile failure: it is not turned into a one-line error.
    monkeypatch.setattr(peers.TorchReportUNet, "forward", FailsWhenCalled.forward)
    with pytest.raises(RuntimeError, match="no backend"):
        peers.main(TINY_RUNS[what])


def test_compile_flags_and_their_scope(capsys):
    parse = peers.build_parser().parse_args
    assert parse(["torch-train"]).compile is False and parse(["torch-train"]).compile_mode is None
    assert parse(["torch-sample", "--compile", "--compile-mode", "max-autotune"]).compile_mode == "max-autotune"
    for refused in (["torch-train", "--compile-mode", "reduce-overhead"], ["torch-train", "--compile-mode", "fast"],
                    ["torch-train", "--compile", "--warmup-steps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            peers.main(refused)
        assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="warmup_steps >= 1"):
        peers.torch_train_throughput(4, 1, "conv", 28, batch=2, steps=1, warmup_steps=0, compile_mode="default")


@pytest.fixture
def fresh_dynamo(monkeypatch):
    """Dynamo without earlier tests' compiled code, and a recompilation as an error (one would land in the timing)."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    yield
    torch._dynamo.reset()


# The smallest network (no pooling level): compiling it cold (an empty Inductor cache) took 18-25 s for torch-sample
# and 19-35 s for torch-train on a 2-core CPU (Inductor's C++ kernels, most of it a fixed ~20 s the first time in a
# process); 2-3 s each with Inductor's on-disk cache warm.
TINY_COMPILED = {"torch-train": ["torch-train", "--json", *TINY, "--levels", "0", "--batch", "4", "--steps", "2"],
                 "torch-sample": ["torch-sample", "--json", *TINY, "--levels", "0", "--image-size", "8", "--n", "4"]}


@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor's CPU backend needs a C++ compiler (g++)")
@pytest.mark.parametrize("what", sorted(TINY_COMPILED))
def test_compile_on_the_cpu(what, capsys, fresh_dynamo):
    r = _json_row(capsys, [*TINY_COMPILED[what], "--compile", "--channels-last"])
    rate = r["train_images_per_s" if what == "torch-train" else "samples_per_s"]
    assert r["compile"] == "default" and r["channels_last"] is True and math.isfinite(rate) and rate > 0
    first = r["first_step_seconds" if what == "torch-train" else "first_forward_seconds"]
    assert r["compile_seconds"] == first > 0


def test_a_real_compile_failure_is_a_one_line_error(monkeypatch, tmp_path, capsys, fresh_dynamo):
    import torch._inductor.config  # noqa: F401 (torch.compile imports it lazily)

    # No C++ compiler for Inductor, and an empty cache (so that nothing compiled before can stand in);
    # base channels 3: kernels no earlier test compiled in this process.
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    argv = [*TINY_COMPILED["torch-sample"], "--base-channels", "3", "--compile"]
    _check_compile_error(capsys, argv, "C++ compiler")
