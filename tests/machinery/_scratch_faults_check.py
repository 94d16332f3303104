"""Run in a fresh process by tests/machinery/test_host_allocator.py (glibc's allocator settings only act on
threads that have not allocated yet): a jitted program with a 64 MiB scratch buffer, called until warm; prints
one JSON line with the median page faults of nine further calls and the program's value."""

import json
import os
import resource
import statistics

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import ddpm_jax  # noqa: E402

if os.environ.get("CHECK_CONFIGURE", "1") == "1":  # the allocator settings, unless DDPM_JAX_KEEP_MALLOC=1
    ddpm_jax.cpu.configure()


@jax.jit
def program(x):
    # x @ x.T is (4096, 4096) float32: 64 MiB of scratch, over glibc's 32 MiB mmap threshold, as a train step's.
    return jnp.sin(x @ x.T).sum()


def main():
    x = jax.random.normal(jax.random.PRNGKey(0), (4096, 64), jnp.float32)
    # Over the first calls the kept heap still grows now and then (a call's scratch allocated before the last
    # call's is freed, or small blocks left inside the freed one): it levels off at two or three scratch
    # buffers (docs/performance.md, the allocator setting), so the median of later calls is 0 faults.
    for _ in range(20):
        program(x).block_until_ready()
    faults = []
    for _ in range(9):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        value = program(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"faults_per_call": statistics.median(faults), "value": float(value)}))


if __name__ == "__main__":
    main()
