"""ddpm_jax.cpu.keep_freed_memory: glibc's malloc told to reuse the memory XLA frees after each run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_jax.cpu import settings as xla_cpu

CHECK = Path(__file__).with_name("_scratch_faults_check.py")
ROOT = Path(__file__).resolve().parents[2]


class FakeLibc:
    def __init__(self, result: int = 1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param.value, value.value))
        return self.result


def test_the_three_settings_are_made_unless_opted_out(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_accelerator_plugin_installed", lambda: False)
    libc = FakeLibc()
    assert xla_cpu.keep_freed_memory({}, libc) == ["M_ARENA_MAX", "M_MMAP_MAX", "M_TRIM_THRESHOLD"]
    # One arena, no mmap for large blocks, never trim (mallopt(3): -1 disables trimming).
    assert libc.calls == [(-8, 1), (-4, 0), (-1, -1)]
    opted_out = FakeLibc()
    assert xla_cpu.keep_freed_memory({"DDPM_JAX_KEEP_MALLOC": "1"}, opted_out) == [] and opted_out.calls == []
    refused = FakeLibc(result=0)  # mallopt returns 0 for a setting it does not take
    assert xla_cpu.keep_freed_memory({}, refused) == [] and len(refused.calls) == 3


def test_an_installed_accelerator_plugin_leaves_the_allocator_alone_unless_jax_is_told_cpu(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_accelerator_plugin_installed", lambda: True)
    libc = FakeLibc()
    assert xla_cpu.keep_freed_memory({}, libc) == [] and libc.calls == []
    assert xla_cpu.keep_freed_memory({"JAX_PLATFORMS": "cuda"}, libc) == [] and libc.calls == []
    assert len(xla_cpu.keep_freed_memory({"JAX_PLATFORMS": "cpu"}, libc)) == 3


def _run_check(keep_malloc: bool, configure: bool = True) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDPM_JAX_KEEP_MALLOC": "1" if keep_malloc else "0",
           "CHECK_CONFIGURE": "1" if configure else "0"}
    out = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=240, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not xla_cpu.runs_on_glibc(), reason="the setting is glibc's")
def test_a_warm_program_reuses_its_scratch_memory_instead_of_faulting_it_in_afresh():
    glibc_default, kept = _run_check(keep_malloc=True), _run_check(keep_malloc=False)
    # 64 MiB of scratch is 16,384 pages of 4 KiB: glibc's default maps them anew at every call.
    assert glibc_default["faults_per_call"] > 10_000
    assert kept["faults_per_call"] < 1_000
    assert kept["value"] == glibc_default["value"]  # where the memory comes from changes no number


@pytest.mark.skipif(not xla_cpu.runs_on_glibc(), reason="the setting is glibc's")
def test_importing_ddpm_jax_leaves_glibcs_allocator_as_it_was():
    # The same program as above, the package imported but ddpm_jax.cpu.configure() not called: glibc's default.
    assert _run_check(keep_malloc=False, configure=False)["faults_per_call"] > 10_000
