"""Every 3x3 convolution shape of the seed U-Net, timed three ways: ``python -m benchmarks.conv_shapes``.

For each (map size, input channels, output channels) at batch 128: the
forward pass, the weight gradient and the input gradient, as XLA's
convolution and as the im2col matrix product of
:mod:`ddpm_jax.models.layers`; the weight gradient also as nine shifted matrix
products. This is the measurement behind ``conv_impl='auto'``'s choices.
Milliseconds, median of ``--repeats``; writes
``benchmarks/results/conv-shapes-<backend>.json``.
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
import jax.numpy as jnp

import ddpm_jax  # noqa: F401  (applies ddpm_jax/xla_cpu.py's flag, as the project runs)
from ddpm_jax.models.layers import conv3x3_matmul, conv3x3_xla

# (height = width, C_in, C_out) of the seed U-Net's 3x3 convolutions at 32x32 input, encoder then decoder.
SEED_SHAPES = [
    (32, 1, 32), (32, 32, 32), (16, 32, 64), (16, 64, 64), (8, 64, 128), (8, 128, 128), (4, 128, 256),
    (4, 256, 256), (2, 256, 512), (2, 512, 512), (4, 512, 256), (8, 256, 128), (16, 128, 64), (32, 64, 32),
    (32, 32, 1),
]


def wgrad_shifted(x: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
    """Weight gradient of a 3x3 SAME convolution as nine matrix products of x with shifted output gradients."""
    _, h, w, c = x.shape
    gp = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xf = x.reshape(-1, c)
    rows = [[xf.T @ gp[:, 2 - i : 2 - i + h, 2 - j : 2 - j + w, :].reshape(-1, g.shape[-1]) for j in range(3)]
            for i in range(3)]
    return jnp.stack([jnp.stack(r) for r in rows])


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def measure(batch: int, size: int, cin: int, cout: int, repeats: int) -> dict:
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (batch, size, size, cin))
    w = jax.random.normal(kw, (3, 3, cin, cout)) * 0.1
    g = jax.random.normal(kg, (batch, size, size, cout))
    row = {"size": size, "c_in": cin, "c_out": cout}
    for name, conv in (("xla", conv3x3_xla), ("matmul", conv3x3_matmul)):
        wgrad = jax.jit(lambda x, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
        igrad = jax.jit(lambda w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
        # XLA's 2x2 convolutions take seconds: fewer repeats there.
        reps = 1 if (name == "xla" and size <= 2) else repeats
        row[f"{name}_forward_ms"] = _time(jax.jit(conv), x, w, repeats=reps)
        row[f"{name}_wgrad_ms"] = _time(wgrad, x, g, repeats=reps)
        row[f"{name}_igrad_ms"] = _time(igrad, w, g, repeats=reps)
    row["shifted_wgrad_ms"] = _time(jax.jit(wgrad_shifted), x, g, repeats=repeats)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conv_shapes", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    print(f"{'shape':>16} | {'forward xla':>11} {'matmul':>7} | {'wgrad xla':>9} {'matmul':>7} {'shifted':>7} | "
          f"{'igrad xla':>9} {'matmul':>7}  (ms, batch {args.batch})")
    for size, cin, cout in SEED_SHAPES:
        r = measure(args.batch, size, cin, cout, args.repeats)
        rows.append(r)
        print(f"{f'{size}x{size} {cin}->{cout}':>16} | {r['xla_forward_ms']:11.1f} {r['matmul_forward_ms']:7.1f} | "
              f"{r['xla_wgrad_ms']:9.1f} {r['matmul_wgrad_ms']:7.1f} {r['shifted_wgrad_ms']:7.1f} | "
              f"{r['xla_igrad_ms']:9.1f} {r['matmul_igrad_ms']:7.1f}", flush=True)
    backend = jax.default_backend()
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"conv-shapes-{backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend, "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": args.batch, "rows": rows,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
