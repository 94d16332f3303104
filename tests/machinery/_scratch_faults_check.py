"""Run in a fresh process by tests/machinery/test_host_allocator.py (glibc's allocator settings only act on
threads that have not allocated yet): a jitted program with a 64 MiB scratch buffer, called until warm; prints
one JSON line with the page faults per further call."""

import json
import os
import resource

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import ddpm_jax  # noqa: E402,F401  (makes the allocator settings, unless DDPM_JAX_KEEP_MALLOC=1)


@jax.jit
def program(x):
    # x @ x.T is (4096, 4096) float32: 64 MiB of scratch, over glibc's 32 MiB mmap threshold, as a train step's.
    return jnp.sin(x @ x.T).sum()


def main():
    x = jnp.ones((4096, 64), jnp.float32)
    for _ in range(3):
        program(x).block_until_ready()
    calls, before = 3, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        program(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
    print(json.dumps({"faults_per_call": faults}))


if __name__ == "__main__":
    main()
