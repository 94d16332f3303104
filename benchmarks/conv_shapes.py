"""Every 3x3 convolution shape of a U-Net preset, timed six ways: ``python -m benchmarks.conv_shapes``.

For each (map size, input channels, output channels) of the ``seed`` U-Net
(batch 128) or the ``cpu`` preset's (``--preset cpu``, batch 64): the forward
pass, the weight gradient and the input gradient as XLA's convolution, as
the im2col matrix product, as the native CPU kernels of
:mod:`ddpm_jax.cpu.kernels` (where the channels allow them and a compiler built
them), on maps of at most 2x2 pixels as one dense matrix product and, where a
side has one or two channels, as the col2im "taps" product, with PyTorch's
convolution beside them when torch is installed (the peer, in the same process,
2 threads like ours). Each form's passes are timed through
:func:`ddpm_jax.cpu.layers.conv3x3_planned` with that form in every pass,
the code training runs. The column ``auto`` names
the form :func:`ddpm_jax.cpu.layers.conv3x3_plan` picks for each pass
(forward/weight gradient/input gradient): this is the measurement behind
``conv_impl='auto'``'s choices. Milliseconds, median of
``--repeats``; writes ``benchmarks/results/conv-shapes-<backend>-<preset>-preset.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import jax

import ddpm_jax  # noqa: E402

ddpm_jax.cpu.configure()  # ddpm_jax/cpu/settings.py's settings, as the command-line programs make them
from ddpm_jax.cpu import kernels as cpu_kernels
from ddpm_jax.cpu.layers import Conv3x3Plan, conv3x3_plan, conv3x3_planned

try:
    import torch
except ImportError:  # the peer column is left out
    torch = None

# (height = width, C_in, C_out) of each preset's 3x3 convolutions, encoder then decoder, and its batch.
SHAPES = {
    "seed": ([(32, 1, 32), (32, 32, 32), (16, 32, 64), (16, 64, 64), (8, 64, 128), (8, 128, 128), (4, 128, 256),
              (4, 256, 256), (2, 256, 512), (2, 512, 512), (4, 512, 256), (8, 256, 128), (16, 128, 64),
              (32, 64, 32), (32, 32, 1)], 128),
    "cpu": ([(28, 1, 16), (28, 16, 16), (14, 16, 32), (14, 32, 32), (7, 32, 64), (7, 64, 64), (14, 64, 32),
             (14, 32, 32), (28, 32, 16), (28, 16, 16), (28, 16, 1)], 64),
}
PASSES = ("forward", "wgrad", "igrad")


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _planned_passes(form: str, x, w, g, passes=PASSES) -> tuple:
    """Forward, weight gradient and input gradient of :func:`conv3x3_planned` in ``form`` (None for those
    not in ``passes``), each timed alone: the pass in ``form``, the others XLA's, for XLA to drop."""
    def conv(plan):
        return lambda x_, w_: conv3x3_planned(x_, w_, plan)

    forward = conv(Conv3x3Plan(form, "xla", "xla"))
    wgrad = conv(Conv3x3Plan("xla", "xla", form))
    igrad = conv(Conv3x3Plan("xla", form, "xla"))
    jobs = {"forward": (jax.jit(forward), (x, w)),
            "wgrad": (jax.jit(lambda x, g: jax.vjp(lambda w_: wgrad(x, w_), w)[1](g)[0]), (x, g)),
            "igrad": (jax.jit(lambda w, g: jax.vjp(lambda x_: igrad(x_, w), x)[1](g)[0]), (w, g))}
    return tuple(jobs[name] if name in passes else None for name in PASSES)


def _native_passes(x, w, g) -> tuple:
    """The native kernels' three passes; None for a pass whose written channels are not whole vectors
    (the weight gradient's kernel swaps its operands where only the input's are)."""
    if not cpu_kernels.kernels_available():
        return None, None, None
    fits = cpu_kernels.whole_vectors
    runs = {"forward": fits(w.shape[-1]), "wgrad": fits(g.shape[-1]) or fits(x.shape[-1]), "igrad": fits(x.shape[-1])}
    return _planned_passes("native", x, w, g, [name for name in PASSES if runs[name]])


def _torch_passes(x, w, g) -> tuple:
    xt, gt = (torch.from_numpy(jax.device_get(a)).permute(0, 3, 1, 2).contiguous() for a in (x, g))
    wt = torch.from_numpy(jax.device_get(w)).permute(3, 2, 0, 1).contiguous()

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(gt, xt, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                           mask)
    return ((lambda: torch.nn.functional.conv2d(xt, wt, padding=1), ()), (backward([False, True, False]), ()),
            (backward([True, False, False]), ()))


def measure(batch: int, size: int, cin: int, cout: int, repeats: int) -> dict:
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (batch, size, size, cin))
    w = jax.random.normal(kw, (3, 3, cin, cout)) * 0.1
    g = jax.random.normal(kg, (batch, size, size, cout))
    plan = conv3x3_plan(x, cout)
    row = {"size": size, "c_in": cin, "c_out": cout,
           "auto": {"forward": plan.forward, "wgrad": plan.weight_grad, "igrad": plan.input_grad}}
    forms = {"xla": _planned_passes("xla", x, w, g),
             "matmul": _planned_passes("matmul", x, w, g),
             "native": _native_passes(x, w, g),
             "dense": _planned_passes("dense", x, w, g) if size <= 2 else (None,) * 3,
             # Its product writes nine times the output channels: timed only where a side has one or two.
             "taps": _planned_passes("taps", x, w, g) if min(cin, cout) <= 2 else (None,) * 3}
    if torch is not None:
        forms["torch"] = _torch_passes(x, w, g)
    for name, passes in forms.items():
        # XLA's 2x2 convolutions take seconds: fewer repeats there.
        reps = 1 if (name == "xla" and size <= 2) else repeats
        for pass_name, job in zip(PASSES, passes):
            row[f"{name}_{pass_name}_ms"] = None if job is None else _time(job[0], *job[1], repeats=reps)
    return row


def _auto_ms(row: dict, pass_name: str) -> float:
    """The time of the form ``auto`` picked for this pass."""
    return row[f"{row['auto'][pass_name]}_{pass_name}_ms"]


def _cell(value) -> str:
    return f"{value:7.1f}" if value is not None else f"{'-':>7}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conv_shapes", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(SHAPES), default="seed")
    p.add_argument("--batch", type=int, default=None, help="default: 128 (seed), 64 (cpu), as the suite trains")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shapes, batch = SHAPES[args.preset][0], args.batch or SHAPES[args.preset][1]
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    forms = ["xla", "matmul", "native", "dense", "taps"] + (["torch"] if torch is not None else [])
    rows = []
    print(f"{args.preset} preset, batch {batch}, ms; per pass: " + " ".join(f"{f:>7}" for f in forms))
    print(f"{'shape':>16} {'auto':>20} | {'forward':^31} | {'weight gradient':^31} | {'input gradient':^31}")
    for size, cin, cout in shapes:
        r = measure(batch, size, cin, cout, args.repeats)
        rows.append(r)
        cells = " | ".join(" ".join(_cell(r[f"{f}_{pass_name}_ms"]) for f in forms) for pass_name in PASSES)
        auto = "/".join(r["auto"][pass_name] for pass_name in PASSES)
        print(f"{f'{size}x{size} {cin}->{cout}':>16} {auto:>20} | {cells}", flush=True)
    totals = {f"{f}_{pass_name}_ms": sum(r[f"{f}_{pass_name}_ms"] or 0.0 for r in rows)
              for f in forms for pass_name in PASSES}
    auto_total = {pass_name: sum(_auto_ms(r, pass_name) for r in rows) for pass_name in PASSES}
    print("auto (the forms picked), summed: " + ", ".join(f"{k} {v:.1f}" for k, v in auto_total.items()) +
          ("; torch: " + ", ".join(f"{k} {totals[f'torch_{k}_ms']:.1f}" for k in PASSES) if torch is not None else ""))
    backend = jax.default_backend()
    results = Path(__file__).resolve().parent / "results"
    out = Path(args.out) if args.out else results / f"conv-shapes-{backend}-{args.preset}-preset.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend, "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "torch": torch.__version__ if torch is not None else None, "preset": args.preset,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": batch, "rows": rows,
        "auto_total_ms": auto_total, "totals_ms": totals,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
