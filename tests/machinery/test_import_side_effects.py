"""Importing ddpm_jax leaves the process as it found it; the CPU speed settings are one opt-in call.

Each check runs in a fresh interpreter, since what an import does to a process can only be seen from a
clean start. The allocator and the RNG lowering are checked by what they change (page faults of a warm
program, a ``while`` loop in compiled HLO): tests/machinery/test_host_allocator.py and test_rng_lowering.py.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ddpm_jax
from ddpm_jax.cpu import settings as cpu

ROOT = Path(__file__).resolve().parents[2]
# What ddpm_jax's modules import from outside: importing these first puts their own changes (``import jax``
# sets TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY) in the baseline.
DEPENDENCIES = ("jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "chex", "ml_collections", "numpy",
                "matplotlib", "tqdm.auto", "PIL.Image")


def _python(code: str, **env) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_ddpm_jax_leaves_os_environ_as_it_was_and_loads_no_jax():
    result = _python("""
import json, os, sys
before = dict(os.environ)
import ddpm_jax
changed = sorted(set(os.environ.items()) ^ set(before.items()))
print(json.dumps({"changed": changed, "jax": "jax" in sys.modules, "all": ddpm_jax.__all__}))
""")
    assert result["changed"] == []
    assert not result["jax"]  # the public names load their modules on first use
    assert "sample" in result["all"] and "load_checkpoint" in result["all"]


def test_every_module_adds_nothing_to_what_its_dependencies_do_at_import():
    result = _python(f"""
import importlib, json, os, pkgutil
for name in {DEPENDENCIES!r}:
    importlib.import_module(name)
before = dict(os.environ)
import ddpm_jax
modules = [m.name for m in pkgutil.walk_packages(ddpm_jax.__path__, "ddpm_jax.")]
for name in modules:
    importlib.import_module(name)
for name in ddpm_jax.__all__:  # the lazily loaded public names too
    getattr(ddpm_jax, name)
from jax._src import xla_bridge
changed = sorted(set(os.environ.items()) ^ set(before.items()))
print(json.dumps({{"changed": changed, "modules": modules, "backends": sorted(xla_bridge._backends)}}))
""", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    assert result["changed"] == []  # XLA_FLAGS among them: the user's value stays the user's
    assert "ddpm_jax.cpu.settings" in result["modules"] and "ddpm_jax.cli.train" in result["modules"]
    assert result["backends"] == []  # nothing started a device either


def test_configure_adds_the_flags_once_and_never_over_the_users_choice():
    code = """
import json, os
import ddpm_jax
first, second = ddpm_jax.cpu.configure(), ddpm_jax.cpu.configure()
print(json.dumps({"first": list(first.xla_flags), "second": list(second.xla_flags),
                  "XLA_FLAGS": os.environ.get("XLA_FLAGS"), "late": first.late, "text": str(first)}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DDPM_JAX_KEEP_XLA_FLAGS")}
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    result = json.loads(fresh.stdout.strip().splitlines()[-1])
    expected = ([cpu.YNN_FLAG] if cpu._jaxlib_at_least(0, 10) else []) + ([cpu.VECTOR_FLAG] if cpu.has_avx512() else [])
    assert result["first"] == expected and result["second"] == []
    assert (result["XLA_FLAGS"] or "") == " ".join(expected)
    assert not result["late"] and result["text"].startswith("CPU settings: ")
    users = _python(code, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=dot --xla_cpu_prefer_vector_width=256")
    assert users["first"] == [] and users["XLA_FLAGS"].endswith("=dot --xla_cpu_prefer_vector_width=256")


@pytest.mark.parametrize("module", ["ddpm_jax.cli.train", "ddpm_jax.cli.sample", "ddpm_jax.cli.evaluate"])
def test_each_command_line_program_makes_the_cpu_settings_first(module):
    source = Path(importlib.import_module(module).__file__).read_text()
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    body = [n for n in main.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert ast.unparse(body[0]) == "cpu.configure()"


def test_the_names_static_tools_see_are_the_names_loaded_lazily():
    """The ``TYPE_CHECKING`` imports of ddpm_jax/__init__.py (for IDEs and type checkers) and its ``_SOURCES``
    (what ``__getattr__`` loads) list the same names from the same modules."""
    import ddpm_jax

    tree = ast.parse((ROOT / "ddpm_jax" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    # `from ddpm_jax.x import name` -> "ddpm_jax.x"; `from ddpm_jax.x import module` -> ("module", "ddpm_jax.x.module")
    static = {}
    for node in block.body:
        for alias in node.names:
            dotted = f"{node.module}.{alias.name}"
            is_module = (ROOT / Path(*dotted.split("."))).is_dir() or (ROOT / Path(*dotted.split("."))).with_suffix(".py").exists()
            static[alias.name] = ("module", dotted) if is_module else node.module
    assert static == ddpm_jax._SOURCES
