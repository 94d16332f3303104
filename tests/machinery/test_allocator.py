"""The command-line tools restart once with glibc's allocator told to keep freed memory (ddpm_jax/xla_cpu.py)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_jax import xla_cpu

ROOT = Path(__file__).resolve().parents[2]
GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC_LINUX, reason="the settings are glibc's, on Linux")


def _clean_environment(**extra):
    """This process's environment without anything that would stop or change a restart."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", xla_cpu.KEEP_MALLOC) and not k.startswith("MALLOC_")}
    return {**env, **extra}


def test_restart_environment_adds_the_tunables_once_and_respects_the_users_settings():
    ours = xla_cpu.MALLOC_TUNABLES
    assert xla_cpu.malloc_relaunch_environment({"A": "1"}, "linux", "glibc") == {"A": "1", "GLIBC_TUNABLES": ours}
    # Tunables of another namespace are kept, ours appended.
    other = {"GLIBC_TUNABLES": "glibc.cpu.hwcap_mask=1"}
    assert xla_cpu.malloc_relaunch_environment(other, "linux", "glibc")["GLIBC_TUNABLES"] == (
        f"glibc.cpu.hwcap_mask=1:{ours}")
    for settled in ({"GLIBC_TUNABLES": ours},  # after the restart: no second one
                    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},  # the user's own allocator settings
                    {"MALLOC_ARENA_MAX": "2"},
                    {xla_cpu.KEEP_MALLOC: "1"}):
        assert xla_cpu.malloc_relaunch_environment(settled, "linux", "glibc") is None, settled
    assert xla_cpu.malloc_relaunch_environment({}, "darwin", "") is None
    assert xla_cpu.malloc_relaunch_environment({}, "linux", "musl") is None
    assert xla_cpu.malloc_relaunch_environment({xla_cpu.KEEP_MALLOC: "0"}, "linux", "glibc") is not None


_RESTARTING = """
import os, sys
from ddpm_jax import xla_cpu
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
xla_cpu.relaunch_with_malloc_tunables()
print("main", os.getpid(), flush=True)
"""


@needs_glibc
def test_a_process_restarts_once_in_place_with_its_arguments():
    out = subprocess.run([sys.executable, "-c", _RESTARTING, "--flag", "a b"], cwd=ROOT, env=_clean_environment(),
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    starts = [line for line in out if line.startswith("start")]
    mains = [line for line in out if line.startswith("main")]
    assert len(starts) == 2 and len(mains) == 1, out
    pid = starts[0].split()[1]
    assert starts[0] == f"start {pid} None ['--flag', 'a b']"
    assert starts[1] == f"start {pid} {xla_cpu.MALLOC_TUNABLES} ['--flag', 'a b']"  # exec: same process
    assert mains[0] == f"main {pid}"


_FAULTS = """
import json, resource, sys
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
# The (4096, 4096) product is a 64 MB temporary buffer of the compiled program, allocated and freed per call.
f = jax.jit(lambda x: jnp.sin(x @ x).sum())
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3))
"""


@needs_glibc
def test_with_the_tunables_a_programs_scratch_memory_is_reused_not_faulted_in_per_call():
    def faults_per_call(**env):
        out = subprocess.run([sys.executable, "-c", _FAULTS], cwd=ROOT, env=_clean_environment(**env),
                             capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.splitlines()[-1])

    default = faults_per_call()
    tuned = faults_per_call(GLIBC_TUNABLES=xla_cpu.MALLOC_TUNABLES)
    # 64 MB is 16,384 pages of 4 KiB: glibc's default maps it afresh per call (fewer faults where the kernel
    # backs it with transparent huge pages); kept for reuse, it faults in once.
    assert tuned < 500 and tuned <= default, (tuned, default)


@needs_glibc
def test_the_benchmarked_train_step_runs_under_the_tunables_and_not_when_kept(tmp_path):
    def run(**env):
        out = subprocess.run([sys.executable, "-m", "benchmarks.ours", "train", "--preset", "tiny", "--steps", "2"],
                             cwd=ROOT, env=_clean_environment(**env), capture_output=True, text=True, timeout=300,
                             check=True)
        return json.loads(out.stdout.splitlines()[-1])

    assert run()["glibc_tunables"] == xla_cpu.MALLOC_TUNABLES
    assert run(DDPM_JAX_KEEP_MALLOC="1")["glibc_tunables"] is None
