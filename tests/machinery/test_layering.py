"""The package's layout stays one-way: read every module's imports (AST) and check them against the layers.

Bottom to top: the cache folder (the standard library only), the diffusion math (jax.numpy only), the networks (flax only, nothing of
diffusion), the foundations (the train state; configs, their checks and what they build; the
sampling options; data, devices, files), the network joined to the math (denoiser), checkpoints, training, and the public surface (sampling,
evaluation, figures). A module imports only from its own layer or the ones below; nothing
imports ``experiments`` or ``benchmarks``; no import sits inside a function to dodge a cycle.
A new module must be given a layer here, which is the point: say where it belongs.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ddpm_jax"

LAYERS = [
    ("base", {"cache"}),  # the standard library only: where the package keeps its caches
    ("math", {"schedules", "diffusion", "likelihood", "losses", "sampling", "guidance", "metrics"}),
    ("models", {"models", "models.cpu_kernels", "models.layers", "models.unet", "models.ddpm_unet", "models.classifier",
                "models.noisy_classifier"}),
    ("foundations", {"train_state", "configs", "options", "data", "image_folder", "parallel", "plotting", "progress",
                     "workdir", "cpu"}),
    ("network", {"denoiser"}),
    ("checkpoints", {"manifest", "checkpoint", "noisy_classifier"}),
    ("training", {"guard", "training_loop", "train", "noisy_classifier_training", "feature_network"}),
    ("public", {"generate", "evaluation", "figures", "batchnorm_stats"}),
    ("package", {""}),  # ddpm_jax/__init__.py: the notebook-facing names
    ("cli", {"cli", "cli.flags", "cli.train", "cli.evaluate", "cli.sample"}),  # the console scripts
]
LAYER_OF = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}
LAYER_NAME = {rank: name for rank, (name, _) in enumerate(LAYERS)}

# Third-party packages each lower layer may use: the math is jax.numpy (and chex) alone, the networks flax.
# flax.struct: the pytree dataclass (DiffusionSchedule, GuidanceInputs), not the networks.
MATH_ALLOWED = {"jax", "chex", "numpy", "flax.struct"} | set(sys.stdlib_module_names)
MODELS_ALLOWED = MATH_ALLOWED | {"flax"}
# Imports inside functions that are not about layering: TensorFlow is heavy, needed only on the TFDS path,
# and must see its GPUs hidden before it is imported (ddpm_jax/data.py says why).
LAZY_ALLOWED = {("data", "tensorflow"), ("data", "tensorflow_datasets")}


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


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _graph() if m not in LAYER_OF)
    assert not unplaced, f"give these modules a layer in tests/machinery/test_layering.py: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, imports in _graph().items():
        for name, line, _ in imports:
            target = _internal(name)
            if target is not None and module in LAYER_OF and target in LAYER_OF and LAYER_OF[target] > LAYER_OF[module]:
                upward.append(f"ddpm_jax/{module.replace('.', '/') or '__init__'}.py:{line} ({LAYER_NAME[LAYER_OF[module]]}) "
                              f"imports {target} ({LAYER_NAME[LAYER_OF[target]]})")
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


@pytest.mark.parametrize("layer, allowed", [("math", MATH_ALLOWED), ("models", MODELS_ALLOWED)])
def test_the_math_and_the_networks_import_only_their_own_libraries(layer, allowed):
    rank = [r for r, (name, _) in enumerate(LAYERS) if name == layer][0]
    bad = []
    for module, imports in _graph().items():
        if LAYER_OF.get(module) != rank:
            continue
        for name, line, _ in imports:
            target = _internal(name)
            if target is not None:
                if LAYER_OF.get(target) not in (rank, LAYER_OF["cache"]):  # the base layer serves every layer
                    bad.append(f"{module}:{line} imports ddpm_jax.{target}")
            elif name.split(".")[0] not in allowed and name not in allowed:
                bad.append(f"{module}:{line} imports {name}")
    assert not bad, f"the {layer} layer must stay free of these: " + "; ".join(bad)


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
