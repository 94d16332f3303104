"""PyTorch peers that the JAX train step and sampler are benchmarked against.

Two peers, each measured on the CPU with ``torch.set_num_threads(os.cpu_count())``, or with
``--device cuda`` on the GPU (model, image pool, schedule tables and noise on the
GPU; ``torch.cuda.synchronize()`` before every clock reading; cuDNN's autotuner on,
``torch.backends.cudnn.benchmark = True``, as XLA autotunes its convolutions; PyTorch's
TF32 defaults, reported in the JSON):

* ``torch-*``: :class:`TorchReportUNet`, a layer-for-layer PyTorch port of
  :class:`ddpm_jax.models.unet.ReportUNet` (same blocks, same parameter count:
  12,552,848 for the report's model, 199,025 for the ``cpu`` preset), trained
  and sampled with the same work as ours: a uint8 batch drawn from a fixed
  pool, scaled to [-1, 1] and padded with -1, the cosine schedule, eps-MSE,
  gradient clipping at norm 1 and Adam; sampling is Ho et al.'s Algorithm 2
  with x0 clipped to [-1, 1] and sigma_t^2 = beta_t. It answers "how fast is
  the same model, written the usual way, in eager PyTorch?", and with the
  flags below "... with PyTorch's usual speed-ups?".
* ``diffusers-*``: an off-the-shelf ``diffusers.UNet2DModel`` of about the
  same size (12,352,993 parameters, :data:`DIFFUSERS_UNET_CONFIG`) for 32x32
  one-channel images with ``DDPMScheduler(beta_schedule="squaredcos_cap_v2")``
  and the scheduler's own loop, randomly initialized. It answers "how fast is
  the library most people would reach for?"; it is a different architecture
  (ResNet blocks, GroupNorm, attention at 8x8), so only its throughput is
  comparable, not its outputs.

torch and diffusers are needed only for these benchmarks (an optional extra,
not a dependency of ``ddpm_jax``). Each measurement runs in a fresh process,
so that one peer's allocator and thread pool do not colour the next::

    python -m benchmarks.peers torch-train --json --batch 128 --steps 5
    python -m benchmarks.peers torch-sample --json --n 100 --steps-to-time 5
    python -m benchmarks.peers diffusers-train --json --batch 128 --steps 5
    python -m benchmarks.peers diffusers-sample --json --n 100 --steps-to-time 5
    python -m benchmarks.peers torch-train --json --device cuda --amp bf16 --batch 1000
    python -m benchmarks.peers self-check        # asserts the parameter counts

``--amp bf16`` (torch-train, torch-sample, diffusers-train) runs the forward pass
(and the loss) under ``torch.autocast(device, dtype=torch.bfloat16)``, the usual
PyTorch mixed precision (parameters, gradients and Adam stay float32; the
sampler's arithmetic is float32, eps cast to it), to compare with our
``--compute-dtype bfloat16``. ``--device cuda`` where PyTorch sees no CUDA device
is refused with a one-line error.

The strongest PyTorch port, for the ``torch-*`` commands (each off by default):

* ``--channels-last``: the model's weights and its input in ``torch.channels_last``
  memory format (NHWC in memory), the usual speed-up of convolutions on a GPU
  (cuDNN's NHWC kernels, and on Tensor Cores with ``--amp bf16``).
* ``--compile``: the model wrapped in ``torch.compile`` (TorchInductor), with
  ``--compile-mode default|reduce-overhead|max-autotune`` (default: default;
  the other two also capture CUDA graphs on a GPU). The optimizer step and the
  sampler's arithmetic stay eager. Compilation happens in the untimed warm-up
  (train: ``--warmup-steps``, at least 1 with ``--compile``, give 3 for CUDA
  graphs; sample: three untimed forwards instead of one) and is reported as
  ``compile_seconds``, the warm-up's first step or forward. If it fails (no C
  compiler, an unsupported backend), the command exits with status 1 and one
  line on stderr, ``error: torch.compile failed: ...``, and prints no JSON.

For example, on the GPU::

    python -m benchmarks.peers torch-train --device cuda --channels-last --amp bf16 --compile --batch 1000 --json

Model flags: ``--base-channels --levels --output-head --image-size`` (the
``torch-*`` commands; ``--base-channels 16 --levels 2 --output-head conv
--image-size 28`` is the ``cpu`` preset), ``--num-timesteps`` (T, default 100).
With ``--json`` the last line of stdout is one JSON object, including ``amp``
(``"bf16"`` or null; not for diffusers-sample), for the ``torch-*`` commands
``channels_last`` (bool), ``compile`` (null or the mode) and ``compile_seconds``
(null without ``--compile``), ``peak_rss_mb`` (the process's peak resident
memory) and ``imports_rss_mb`` (its peak before any model was built: torch,
numpy and JAX, which is imported for the schedule's betas).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

# Only the schedule's tables are taken from ddpm_jax (JAX); keep JAX off any
# accelerator so that it neither preallocates GPU memory nor slows the start
# of a process that measures PyTorch. Must be set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ddpm_jax.diffusion.schedules import DiffusionSchedule, cosine_beta_schedule  # noqa: E402

REPORT_PARAMS = 12_552_848  # ReportUNet(), the report's model
CPU_PRESET_PARAMS = 199_025  # ReportUNet(base_channels=16, levels=2, output_head="conv"), the 'cpu' preset
DATA_SHAPE = (1, 28, 28)  # MNIST, NCHW without the batch
POOL_SIZE = 2048  # as benchmarks/ours.py: batches are drawn from a fixed pool of this many images
NEGATIVE_SLOPE = 0.01

# Chosen to land near the report's 12.55M parameters with the usual diffusers
# shape (channels multiples of 32 for GroupNorm(32), attention only at 8x8 as
# Ho et al.'s CIFAR model has it at 16x16 of 32x32).
DIFFUSERS_UNET_CONFIG: dict = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 192, 256),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
}
DIFFUSERS_PARAMS = 12_352_993


# ---------------------------------------------------------------------------
# The port of ReportUNet
# ---------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """``(B,)`` timesteps -> ``(B, dim)`` float32 ``[sin(t f_k), cos(t f_k)]``, ``f_k = max_period^(-k/(dim/2))``.

    Computed in float32 in the same order as ``ddpm_jax.models.unet.sinusoidal_embedding``.
    """
    if dim % 2:
        raise ValueError(f"time embedding width must be even, got {dim}.")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class TorchTimeConditionedBlock(nn.Module):
    """conv3x3-BN-LeakyReLU, + Linear(embedding) per channel, conv3x3-BN[-LeakyReLU]."""

    def __init__(self, in_channels: int, features: int, time_embed_dim: int, final_activation: bool = True):
        super().__init__()
        self.final_activation = final_activation
        self.conv0 = nn.Conv2d(in_channels, features, 3, padding=1)
        # Flax's BatchNorm(momentum=0.9, epsilon=1e-5) in PyTorch's convention.
        self.norm0 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
        self.time = nn.Linear(time_embed_dim, features)
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.norm0(self.conv0(x)), NEGATIVE_SLOPE)
        h = h + self.time(emb)[:, :, None, None]
        h = self.norm1(self.conv1(h))
        return F.leaky_relu(h, NEGATIVE_SLOPE) if self.final_activation else h


class TorchReportUNet(nn.Module):
    """PyTorch port of ``ReportUNet`` (NCHW): ``(x (B, C, H, W) float32, t (B,) int64) -> (B, C, H, W)``.

    The same modules in the same order as the Flax model, so the parameter
    counts agree exactly; PyTorch's default initializers are kept (except the
    zero-initialized 'conv' head), which changes nothing about the cost of a step.
    """

    def __init__(
        self,
        base_channels: int = 32,
        levels: int = 4,
        time_embed_dim: int = 32,
        output_head: str = "block",
        in_channels: int = 1,
    ):
        super().__init__()
        if output_head not in ("block", "conv"):
            raise ValueError(f"unknown output_head {output_head!r}; allowed: block, conv.")
        self.levels = levels
        self.time_embed_dim = time_embed_dim
        block = lambda c_in, c_out, **kw: TorchTimeConditionedBlock(c_in, c_out, time_embed_dim, **kw)  # noqa: E731

        self.down = nn.ModuleList()
        channels = in_channels
        for level in range(levels):
            self.down.append(block(channels, base_channels * 2**level))
            channels = base_channels * 2**level
        deepest = base_channels * 2**levels
        self.deepest = block(channels, deepest)
        self.bottleneck = block(deepest, deepest)

        self.upconvs = nn.ModuleList()
        self.up = nn.ModuleList()
        channels = deepest
        for level in reversed(range(levels)):
            features = base_channels * 2**level
            self.upconvs.append(nn.ConvTranspose2d(channels, features, kernel_size=2, stride=2))
            self.up.append(block(2 * features, features))  # upsampled + skip
            channels = features

        if output_head == "block":
            self.head: nn.Module = block(channels, in_channels, final_activation=False)
        else:
            # Zero-initialized, as the Flax head, so an untrained model predicts eps = 0.
            self.head = nn.Conv2d(channels, in_channels, 3, padding=1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.output_head = output_head

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        factor = 2**self.levels
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"TorchReportUNet with levels={self.levels} needs height and width divisible by {factor}, "
                f"got {x.shape[-2]}x{x.shape[-1]}."
            )
        emb = sinusoidal_embedding(t, self.time_embed_dim)
        h, skips = x, []
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottleneck(self.deepest(h, emb), emb)
        for upconv, block, skip in zip(self.upconvs, self.up, reversed(skips)):
            h = block(torch.cat([upconv(h), skip], dim=1), emb)
        return self.head(h, emb) if self.output_head == "block" else self.head(h)


def count_params(model: nn.Module) -> int:
    """Trainable parameters; BatchNorm's running statistics are buffers, not counted (as Flax's batch_stats)."""
    return sum(p.numel() for p in model.parameters())


def self_check() -> None:
    """The port has exactly the Flax model's parameter counts (a cheap guard against a drifting port)."""
    report = count_params(TorchReportUNet())
    assert report == REPORT_PARAMS, f"TorchReportUNet() has {report:,} parameters, expected {REPORT_PARAMS:,}"
    cpu = count_params(TorchReportUNet(base_channels=16, levels=2, output_head="conv"))
    assert cpu == CPU_PRESET_PARAMS, f"the cpu preset port has {cpu:,} parameters, expected {CPU_PRESET_PARAMS:,}"


# ---------------------------------------------------------------------------
# Shared pieces of the measurements
# ---------------------------------------------------------------------------


CPU = torch.device("cpu")
DEVICES = ("cpu", "cuda")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class CompileError(RuntimeError):
    """``torch.compile`` failed, when wrapping the model or compiling it in the warm-up's first call."""


@contextlib.contextmanager
def _compile_failures(compiled: bool):
    """Within: with ``compiled``, any exception is re-raised as a one-line :class:`CompileError` (the cause chained).

    Wraps only ``torch.compile`` and the untimed warm-up (where a compiled model is compiled), not the timed steps.
    """
    try:
        yield
    except Exception as e:
        if not compiled:
            raise
        first_line = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise CompileError(f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__) from e


def _prepare_port(
    model: nn.Module, device: torch.device, channels_last: bool = False, compile_mode: str | None = None
) -> nn.Module:
    """``model`` on ``device``, its weights in channels-last format if asked, wrapped in ``torch.compile`` if asked.

    ``compile_mode``: None (eager) or one of :data:`COMPILE_MODES`. ``torch.compile`` only wraps; the
    compilation itself happens at the first call (run it within :func:`_compile_failures`).
    """
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_mode is None:
        return model
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile_mode!r}; allowed: {', '.join(COMPILE_MODES)}.")
    with _compile_failures(True):
        return torch.compile(model, mode=compile_mode)


def _memory_format(channels_last: bool) -> torch.memory_format:
    """The format the port's inputs are made ``.contiguous()`` in (a no-op for contiguous NCHW tensors)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def _autocast(device: torch.device, amp: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory: ``torch.autocast(device, bfloat16)`` with ``amp``, else nothing."""
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext


def _port_options(channels_last: bool, compile_mode: str | None, first_call_seconds: float) -> dict:
    """The port's options for the JSON; ``compile_seconds``: the warm-up's first call, where compilation happens."""
    return {
        "channels_last": channels_last,
        "compile": compile_mode,
        "compile_seconds": first_call_seconds if compile_mode else None,
    }


def _setup_threads() -> int:
    # torch defaults to the physical cores; use every core, as XLA does.
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.get_num_threads()


def _setup_device(device: torch.device) -> dict:
    """Prepare ``device`` for a measurement; what was set, for the JSON.

    CPU: every core (:func:`_setup_threads`). CUDA: no thread setting; cuDNN's
    autotuner picks each convolution's algorithm in the untimed warm-up (XLA
    autotunes its convolutions while compiling); PyTorch's TF32 defaults are kept.
    """
    if device.type != "cuda":
        return {"device": str(device), "threads": _setup_threads()}
    torch.backends.cudnn.benchmark = True
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device),
        "threads": None,
        "cudnn_benchmark": True,
        # Read with getattr: newer PyTorch also has fp32_precision settings and may drop these names.
        "tf32_conv": getattr(torch.backends.cudnn, "allow_tf32", None),
        "tf32_matmul": getattr(torch.backends.cuda.matmul, "allow_tf32", None),
    }


def _sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (CUDA runs asynchronously); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _schedule_tables(num_timesteps: int) -> dict[str, np.ndarray]:
    """The cosine schedule's per-step tables, taken from ``ddpm_jax``'s own schedule so both sides use the same numbers.

    0-based index i is the paper's t = i + 1.
    """
    schedule = DiffusionSchedule.from_betas(cosine_beta_schedule(num_timesteps))
    return {
        "betas": np.asarray(schedule.betas),
        "sqrt_alpha_bars": np.asarray(schedule.sqrt_alpha_bars),
        "sqrt_one_minus_alpha_bars": np.asarray(schedule.sqrt_one_minus_alpha_bars),
        "coef1": np.asarray(schedule.posterior_mean_coef1),
        "coef2": np.asarray(schedule.posterior_mean_coef2),
    }


def _image_pool(device: torch.device = CPU) -> torch.Tensor:
    # Random pixels rather than MNIST: the benchmark must not need the dataset,
    # and the cost of a step does not depend on the pixel values. Drawn on the
    # CPU (the same pixels for every device), then placed on the device.
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (POOL_SIZE, *DATA_SHAPE), dtype=torch.uint8, generator=generator).to(device)


def _preprocess(images_u8: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 -> [-1, 1], centre-padded with the background -1 to ``image_size`` (as ``ddpm_jax.data.preprocess``)."""
    x = images_u8.to(torch.float32) / 127.5 - 1.0
    pad_h, pad_w = image_size - x.shape[-2], image_size - x.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"image_size={image_size} is smaller than the images ({x.shape[-2]}x{x.shape[-1]}).")
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0)
    return x


def _time_train(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    batch: int,
    steps: int,
    warmup_steps: int,
    device: torch.device = CPU,
    amp: bool = False,
    compiled: bool = False,
) -> dict:
    """Time ``steps`` full train steps (batch drawn and preprocessed inside, as in our jitted step).

    ``model`` and ``loss_fn``'s tables must already be on ``device``. ``amp``: the
    forward pass and loss under ``torch.autocast(device, bfloat16)``. ``compiled``:
    ``model`` is ``torch.compile``'d, so it needs a warm-up step (where it is
    compiled), and a failure there is a :class:`CompileError`.
    """
    if steps < 1 or warmup_steps < int(compiled) or batch < 1:
        raise ValueError(f"need batch >= 1, steps >= 1 and warmup_steps >= {int(compiled)} (1 with compile), "
                         f"got {batch}, {steps}, {warmup_steps}.")
    setup = _setup_device(device)
    pool = _image_pool(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    autocast = _autocast(device, amp)

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        x0 = _preprocess(pool[torch.randint(0, POOL_SIZE, (batch,), device=device)], image_size)
        with autocast():
            loss = loss_fn(x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()  # a host read, as our loop's metrics fetch (a sync on a GPU)
        _sync(device)
        return time.perf_counter() - t0

    with _compile_failures(compiled):
        warmup = [step() for _ in range(warmup_steps)]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    timed = [step() for _ in range(steps)]
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "train_images_per_s": statistics.median(batch / s for s in timed),
        "step_seconds": timed,
        # As benchmarks.ours reports them: the allocator's share of the step (page faults on fresh memory).
        "minor_faults_per_step": (after.ru_minflt - usage.ru_minflt) / steps,
        "kernel_cpu_seconds_per_step": (after.ru_stime - usage.ru_stime) / steps,
        "first_step_seconds": (warmup or timed)[0],
        "params": count_params(model),
        **setup,
        "amp": "bf16" if amp else None,
        "batch": batch,
    }


def _time_reverse_steps(
    reverse_step: Callable[[torch.Tensor, int], torch.Tensor],
    warmup: Callable[[torch.Tensor], object],
    x: torch.Tensor,
    timesteps: list[int],
    steps_to_time: int | None,
    device: torch.device = CPU,
    compiled: bool = False,
) -> dict:
    """Run the reverse steps (all, or the first ``steps_to_time``) and scale the time to all of them.

    ``warmup``: one untimed forward of ``x``, called once, or three times with ``compiled``
    (compilation, then CUDA graphs' warm-up and recording in the modes that use
    them); a failure there is then a :class:`CompileError`.
    """
    num_steps = len(timesteps)
    timed_steps = num_steps if steps_to_time is None else max(1, min(steps_to_time, num_steps))
    with torch.inference_mode():
        # An inference tensor, as every later x: a compiled model would recompile for the change.
        x = x.clone()
        # Untimed forwards: first-call allocations and oneDNN primitive
        # creation (on a GPU: cuDNN's autotuning; with torch.compile: compilation)
        # are not part of the steady state (as compilation is excluded from our sampler's timing).
        warmup_seconds = []
        with _compile_failures(compiled):
            for _ in range(3 if compiled else 1):
                _sync(device)
                t0 = time.perf_counter()
                warmup(x)
                _sync(device)
                warmup_seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in timesteps[:timed_steps]:
            x = reverse_step(x, i)
        float(x.abs().sum())  # touch the result
        _sync(device)
        elapsed = time.perf_counter() - t0
    seconds = elapsed * num_steps / timed_steps
    return {
        "samples_per_s": x.shape[0] / seconds,
        "seconds": seconds,
        "extrapolated": timed_steps < num_steps,
        "steps_timed": timed_steps,
        "num_timesteps": num_steps,
        "first_forward_seconds": warmup_seconds[0],
    }


# ---------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------


def torch_train_throughput(
    base_channels: int,
    levels: int,
    output_head: str,
    image_size: int,
    batch: int,
    steps: int,
    warmup_steps: int = 1,
    num_timesteps: int = 100,
    device: torch.device | str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    compile_mode: str | None = None,
) -> dict:
    """Train images/s of :class:`TorchReportUNet` doing the work of our jitted train step.

    ``channels_last``, ``compile_mode`` (None: eager): as :func:`_prepare_port`; ``amp``: bf16 autocast.
    """
    device = torch.device(device)
    torch.manual_seed(0)
    model = TorchReportUNet(base_channels, levels, output_head=output_head, in_channels=DATA_SHAPE[0])
    model = _prepare_port(model, device, channels_last, compile_mode)
    memory_format = _memory_format(channels_last)
    tables = _schedule_tables(num_timesteps)
    sqrt_ab = torch.tensor(tables["sqrt_alpha_bars"], dtype=torch.float32, device=device)
    sqrt_1mab = torch.tensor(tables["sqrt_one_minus_alpha_bars"], dtype=torch.float32, device=device)

    def loss_fn(x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.contiguous(memory_format=memory_format)  # eps and x_t follow its format
        t = torch.randint(0, num_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * eps
        return F.mse_loss(model(x_t, t), eps)

    timing = _time_train(model, loss_fn, image_size, batch, steps, warmup_steps, device, amp,
                         compiled=compile_mode is not None)
    return {**timing, **_port_options(channels_last, compile_mode, timing["first_step_seconds"])}


def torch_sample_throughput(
    base_channels: int,
    levels: int,
    output_head: str,
    image_size: int,
    n: int,
    num_timesteps: int = 100,
    steps_to_time: int | None = None,
    device: torch.device | str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    compile_mode: str | None = None,
) -> dict:
    """Samples/s of Ho et al.'s ancestral sampler (Algorithm 2, sigma^2 = beta, x0 clipped) with the port.

    The schedule's per-step numbers are Python floats (kernel arguments on a GPU, no copies).
    ``amp``: the forward pass under bf16 autocast, eps cast to float32 for the sampler's arithmetic;
    ``channels_last``, ``compile_mode`` (None: eager): as :func:`_prepare_port`.
    """
    device = torch.device(device)
    setup = _setup_device(device)
    torch.manual_seed(0)
    model = TorchReportUNet(base_channels, levels, output_head=output_head, in_channels=DATA_SHAPE[0])
    model = _prepare_port(model, device, channels_last, compile_mode).eval()
    autocast = _autocast(device, amp)
    tables = {k: v.tolist() for k, v in _schedule_tables(num_timesteps).items()}
    x = torch.randn(n, DATA_SHAPE[0], image_size, image_size, device=device)
    x = x.contiguous(memory_format=_memory_format(channels_last))  # the sampler's arithmetic keeps its format

    def eps_at(x: torch.Tensor, i: int) -> torch.Tensor:
        with autocast():
            eps = model(x, torch.full((n,), i, dtype=torch.int64, device=device))
        return eps.float()  # a no-op without amp

    def reverse_step(x: torch.Tensor, i: int) -> torch.Tensor:
        eps = eps_at(x, i)
        x0 = ((x - tables["sqrt_one_minus_alpha_bars"][i] * eps) / tables["sqrt_alpha_bars"][i]).clamp(-1.0, 1.0)
        mean = tables["coef1"][i] * x0 + tables["coef2"][i] * x
        return mean + math.sqrt(tables["betas"][i]) * torch.randn_like(x) if i > 0 else mean

    timing = _time_reverse_steps(
        reverse_step,
        lambda x: eps_at(x, num_timesteps - 1),
        x,
        list(range(num_timesteps - 1, -1, -1)),
        steps_to_time,
        device,
        compiled=compile_mode is not None,
    )
    return {**timing, "params": count_params(model), **setup, "n": n, "amp": "bf16" if amp else None,
            **_port_options(channels_last, compile_mode, timing["first_forward_seconds"])}


def _diffusers_unet_and_scheduler(num_timesteps: int):
    # Imported here so that the torch-* peers and the tests of the port do not need diffusers.
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**DIFFUSERS_UNET_CONFIG)
    scheduler = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="squaredcos_cap_v2")
    return unet, scheduler


def diffusers_sample_throughput(n: int, num_timesteps: int = 100, steps_to_time: int | None = None,
                                inference_steps: int | None = None, device: torch.device | str = "cpu") -> dict:
    """Samples/s of a ~12M-parameter ``UNet2DModel`` with ``DDPMScheduler``'s own reverse loop, or with
    ``DDIMScheduler``'s over ``inference_steps`` of the T steps."""
    device = torch.device(device)
    setup = _setup_device(device)
    unet, scheduler = _diffusers_unet_and_scheduler(num_timesteps)
    unet = unet.to(device).eval()
    if inference_steps:
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(inference_steps or num_timesteps)
    size = DIFFUSERS_UNET_CONFIG["sample_size"]
    x = torch.randn(n, DIFFUSERS_UNET_CONFIG["in_channels"], size, size, device=device)

    def reverse_step(x: torch.Tensor, t: int) -> torch.Tensor:
        eps = unet(x, t).sample
        return scheduler.step(eps, t, x).prev_sample

    timing = _time_reverse_steps(
        reverse_step,
        lambda x: unet(x, int(scheduler.timesteps[0])),
        x,
        [int(t) for t in scheduler.timesteps],
        steps_to_time,
        device,
    )
    return {**timing, "params": count_params(unet), **setup, "n": n,
            "scheduler": type(scheduler).__name__, "reverse_steps": len(scheduler.timesteps)}


def diffusers_train_throughput(batch: int, steps: int, num_timesteps: int = 100, warmup_steps: int = 1,
                               device: torch.device | str = "cpu", amp: bool = False) -> dict:
    """Train images/s of the same ``UNet2DModel`` (noise from ``scheduler.add_noise``, eps-MSE, Adam)."""
    device = torch.device(device)
    unet, scheduler = _diffusers_unet_and_scheduler(num_timesteps)
    unet = unet.to(device)

    def loss_fn(x0: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, num_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        return F.mse_loss(unet(scheduler.add_noise(x0, eps, t), t).sample, eps)

    return _time_train(unet, loss_fn, DIFFUSERS_UNET_CONFIG["sample_size"], batch, steps, warmup_steps, device, amp)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


COMMANDS = ("torch-train", "torch-sample", "diffusers-train", "diffusers-sample", "self-check")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=COMMANDS)
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where model, data and noise live (cuda: the first GPU, synchronized before every clock read)")
    p.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="torch-*, diffusers-train: forward pass (and loss) under torch.autocast(device, bfloat16)")
    p.add_argument("--channels-last", action="store_true",
                   help="torch-*: model and input in torch.channels_last memory format")
    p.add_argument("--compile", action="store_true",
                   help="torch-*: the model wrapped in torch.compile, compiled in the untimed warm-up")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile's mode, with --compile (default: default)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--output-head", choices=("block", "conv"), default="block")
    p.add_argument("--image-size", type=int, default=32, help="torch-* only; diffusers-* always use 32")
    p.add_argument("--batch", type=int, default=128, help="train batch")
    p.add_argument("--steps", type=int, default=5, help="timed train steps")
    p.add_argument("--warmup-steps", type=int, default=1,
                   help="untimed train steps before them (at least 1 with --compile; 3 for CUDA graphs)")
    p.add_argument("--n", type=int, default=100, help="samples drawn at once")
    p.add_argument("--steps-to-time", type=int, default=None,
                   help="time only this many reverse steps and extrapolate to T (default: all T)")
    p.add_argument("--num-timesteps", type=int, default=100, help="T")
    p.add_argument("--inference-steps", type=int, default=None,
                   help="diffusers-sample: DDIMScheduler over this many of the T steps")
    return p


def _measure(args: argparse.Namespace) -> dict:
    """The measurement ``args`` ask for (a :class:`CompileError` where torch.compile fails)."""
    device, amp = torch.device(args.device), args.amp == "bf16"
    port = {"amp": amp, "channels_last": args.channels_last,
            "compile_mode": (args.compile_mode or "default") if args.compile else None}
    model = {"base_channels": args.base_channels, "levels": args.levels, "output_head": args.output_head,
             "image_size": args.image_size}
    if args.what == "self-check":
        self_check()
        return {"ok": True, "report_params": REPORT_PARAMS, "cpu_preset_params": CPU_PRESET_PARAMS}
    if args.what == "torch-train":
        return {**model, **torch_train_throughput(**model, batch=args.batch, steps=args.steps,
                                                  warmup_steps=args.warmup_steps,
                                                  num_timesteps=args.num_timesteps, device=device, **port)}
    if args.what == "torch-sample":
        return {**model, **torch_sample_throughput(**model, n=args.n, num_timesteps=args.num_timesteps,
                                                   steps_to_time=args.steps_to_time, device=device, **port)}
    if args.what == "diffusers-train":
        return {"unet_config": DIFFUSERS_UNET_CONFIG,
                **diffusers_train_throughput(args.batch, args.steps, args.num_timesteps, args.warmup_steps,
                                             device=device, amp=amp)}
    return {"unet_config": DIFFUSERS_UNET_CONFIG,
            **diffusers_sample_throughput(args.n, args.num_timesteps, args.steps_to_time,
                                          args.inference_steps, device=device)}


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        why = "it was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        p.error(f"--device cuda: this PyTorch ({torch.__version__}) sees no CUDA device ({why}); use --device cpu.")
    if args.amp != "none" and args.what not in ("torch-train", "torch-sample", "diffusers-train"):
        p.error(f"--amp {args.amp} applies to torch-train, torch-sample and diffusers-train only.")
    for flag, given in (("--channels-last", args.channels_last), ("--compile", args.compile)):
        if given and not args.what.startswith("torch-"):
            p.error(f"{flag} applies to torch-train and torch-sample only.")
    if args.compile_mode and not args.compile:
        p.error(f"--compile-mode {args.compile_mode} needs --compile.")
    if args.compile and args.what == "torch-train" and args.warmup_steps < 1:
        p.error("--compile needs --warmup-steps >= 1 (the model is compiled in the untimed warm-up).")
    versions = {"torch": torch.__version__}
    if args.what.startswith("diffusers"):
        import diffusers

        versions["diffusers"] = diffusers.__version__
    # The libraries alone (torch, numpy, jax for the betas, diffusers) take a
    # few hundred MB; reported so that the model's own memory can be told apart.
    imports_rss_mb = _peak_rss_mb()
    try:
        result = _measure(args)
    except CompileError as e:
        # One line, as the suite reads a failed row's last stderr line; no JSON for a measurement that did not run.
        print(f"error: torch.compile failed: {e}", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    if device.type == "cuda":
        # The caching allocator's peak: tensors only, as JAX's peak_bytes_in_use in benchmarks/ours.py.
        result["device_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result = {
        "what": args.what,
        **result,
        **versions,
        "cpu_count": os.cpu_count(),
        "imports_rss_mb": imports_rss_mb,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
