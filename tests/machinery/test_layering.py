"""The package's layout is its layers: each subpackage of ``ddpm_jax`` is one, and imports point only down.

Read every module's imports (AST) and check them against the order below, bottom to top (docs/design.md draws it):

- ``utils``: the cache folder, progress bars, the device mesh, argument checks (the standard library, JAX, tqdm);
- ``diffusion``: the math, pure functions of arrays and keys (jax.numpy and chex alone);
- ``models``: the networks (Flax alone, nothing of diffusion, nothing of the CPU path);
- ``cpu``: the CPU speed work (process settings, native kernels, the fast layers a network is handed on a CPU);
- ``data``: datasets, image folders, preprocessing;
- ``configs``: the presets, their checks, and what they build (a network, a schedule);
- ``training``: the train state, the loop, checkpoints, the workdir, the guards, the two trainers;
- ``sampling``: ``sample()`` from a checkpoint, its options, the denoiser joining a network to the math;
- ``evaluation``: the feature network, the metrics, the evaluation, the figures;
- ``interop``: weights in and out of other libraries' formats (diffusers' UNet2DModel and DDPMScheduler, the
  report U-Net's safetensors file for PyTorch) and the run workdir made from imported weights;
- the package's ``__init__`` (the notebook-facing names), then ``cli`` (the console scripts).

A module imports only from its own subpackage or the ones below; within a subpackage there is no cycle; nothing
imports ``experiments`` or ``benchmarks``; no import sits inside a function to dodge a cycle. A new subpackage must
be given a place here, which is the point: say where it belongs.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ddpm_jax"

LAYERS = ["utils", "diffusion", "models", "cpu", "data", "configs", "training", "sampling", "evaluation", "interop", "",
          "cli"]
RANK = {name: rank for rank, name in enumerate(LAYERS)}

# Third-party packages the lowest layers may use: the math is jax.numpy (and chex) alone, the networks Flax too.
# flax.struct: the pytree dataclass (DiffusionSchedule, GuidanceInputs), not the networks.
MATH_ALLOWED = {"jax", "chex", "numpy", "flax.struct"} | set(sys.stdlib_module_names)
MODELS_ALLOWED = MATH_ALLOWED | {"flax"}
# Imports inside functions that are not about layering: TensorFlow is heavy, needed only on the TFDS path,
# and must see its GPUs hidden before it is imported (ddpm_jax/data/tfds.py says why).
LAZY_ALLOWED = {("data.tfds", "tensorflow"), ("data.tfds", "tensorflow_datasets")}


def _layer(module: str) -> str:
    """The subpackage a module (dotted, relative to ddpm_jax; '' for the package itself) belongs to."""
    return module.split(".")[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import in ``path``; ddpm_jax modules relative."""
    tree = ast.parse(path.read_text(), str(path))
    inner = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in inner) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "ddpm_jax" or node.module.startswith("ddpm_jax."):
                base = node.module
                # `from ddpm_jax import x` imports the module ddpm_jax.x when there is one.
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                        (PACKAGE.parent / Path(*candidate.split("."))).is_dir()
                    found.append((candidate if is_module else base, node.lineno, id(node) in inner))
            else:
                found.append((node.module, node.lineno, id(node) in inner))
    return found


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _internal(name: str) -> str | None:
    if name == "ddpm_jax":
        return ""
    return name[len("ddpm_jax."):] if name.startswith("ddpm_jax.") else None


def test_every_module_is_in_a_layer():
    unplaced = sorted(m for m in _graph() if _layer(m) not in RANK)
    assert not unplaced, f"put these modules in a subpackage, or give theirs a layer in LAYERS: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, imports in _graph().items():
        for name, line, _ in imports:
            target = _internal(name)
            if target is not None and RANK.get(_layer(target), -1) > RANK.get(_layer(module), len(LAYERS)):
                upward.append(f"ddpm_jax/{module.replace('.', '/') or '__init__'}.py:{line} ({_layer(module) or 'package'}) "
                              f"imports ddpm_jax.{target} ({_layer(target) or 'package'})")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_the_package_has_no_import_cycle():
    graph = {m: {t for n, _, _ in imports if (t := _internal(n)) is not None and t != m and t != ""}
             for m, imports in _graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_no_import_inside_a_function():
    inner = [f"ddpm_jax/{m.replace('.', '/') or '__init__'}.py:{line} imports {name}"
             for m, imports in _graph().items() for name, line, in_function in imports
             if in_function and (m, name.split(".")[0]) not in LAZY_ALLOWED]
    assert not inner, "imports inside functions (move them to the top; a cycle is fixed by layering):\n" + "\n".join(inner)


@pytest.mark.parametrize("layer, allowed", [("diffusion", MATH_ALLOWED), ("models", MODELS_ALLOWED)])
def test_the_math_and_the_networks_import_only_their_own_libraries(layer, allowed):
    bad = []
    for module, imports in _graph().items():
        if _layer(module) != layer:
            continue
        for name, line, _ in imports:
            target = _internal(name)
            if target is not None:
                if _layer(target) != layer:
                    bad.append(f"{module}:{line} imports ddpm_jax.{target}")
            elif name.split(".")[0] not in allowed and name not in allowed:
                bad.append(f"{module}:{line} imports {name}")
    assert not bad, f"the {layer} layer must stay free of these: " + "; ".join(bad)


def test_the_networks_do_not_mention_the_cpu_path():
    """The CPU speed work lives in ddpm_jax/cpu/ and reaches a network only through the layers it is handed:
    no module under ddpm_jax/models/ says "CPU" (in code, names or prose) or imports ddpm_jax.cpu."""
    mentions = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                for path in sorted((PACKAGE / "models").rglob("*")) if path.is_file()
                for number, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"cpu", line, re.I)]
    assert not mentions, "the networks mention the CPU path:\n" + "\n".join(mentions)


def test_nothing_in_the_package_imports_experiments_or_benchmarks():
    bad = [f"{m}:{line} imports {name}" for m, imports in _graph().items() for name, line, _ in imports
           if name.split(".")[0] in ("experiments", "benchmarks")]
    assert not bad, bad


def test_an_entry_point_uses_another_only_by_running_it():
    """Entry points share code through ``ddpm_jax/cli/flags.py`` or ``ddpm_jax``; one that drives others
    (``experiments.compare`` runs the evaluation) calls their ``main(argv)``, as a shell would, and nothing else."""
    bad = []
    entry_packages = ("experiments", "ddpm_jax.cli")
    for path in sorted([*(ROOT / "experiments").glob("*.py"), *(PACKAGE / "cli").glob("*.py")]):
        where = path.relative_to(ROOT)
        tree = ast.parse(path.read_text())
        imported = {}  # local name -> entry point
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in entry_packages:
                imported.update({a.asname or a.name: a.name for a in node.names if a.name != "flags"})
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(tuple(f"{p}." for p in entry_packages)) \
                    and node.module != "ddpm_jax.cli.flags" and not (path.parent.name == "experiments" and
                                                                      [a.name for a in node.names] == ["main"]):
                bad.append(f"{where}:{node.lineno} imports from {node.module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported \
                    and node.attr != "main":
                bad.append(f"{where}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "; ".join(bad)
