"""The import graph: no cycles, every import goes down the layer order, and the kernels stand alone.

Layers, lowest first. A module may import modules of its own layer (without a cycle) and of the
layers below it, never above:

  pallas_kernels            grouped-matmul kernels: jax, numpy and the standard library only, so they
                            are usable without moe_jax (moe_jax/experts.py reaches them, not the reverse)
  moe_jax                   the core: types, moe_config, model_config, routing, capacity, dispatch,
                            experts, routers, losses, moe_layer, attention, transformer, params, sampling,
                            flops, quantization
  moe_jax.data              the input pipeline (uses nothing else of moe_jax)
  moe_jax.sharding          mesh, logical-axis rules, placement, expert parallelism over the core's layers
  moe_jax.hf                Hugging Face checkpoints in and out (places tensors with the sharding rules)
  moe_jax.train             train state, step, loop, checkpoints, the sharded init, and run_config.py (the
                            ConfigDict -> dataclasses boundary, which reads data/ and sharding/ configs)
  configs                   ml_collections presets, built through moe_jax.train.run_config
  experiments, benchmarks   entry points and scripts; peers: neither imports the other

The graph is read from the source with `ast`, not by importing it: every `import` and `from ... import`
anywhere in a file (module level, inside functions, under `try` or `if`) is an edge. An edge goes to
the module the name is read from: `from moe_jax.data import builder` to moe_jax.data.builder,
`from moe_jax.data import DataConfig` to the package moe_jax.data (its __init__). The parent packages
Python initialises on the way are not edges (a package's __init__ importing its own submodules is how
a package is built). Imports by file path or `importlib` (the benchmarks load config files that way)
are not seen.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "moe_jax", "configs", "experiments", "benchmarks")
LAYERS = (("pallas_kernels",), ("moe_jax",), ("moe_jax.data",), ("moe_jax.sharding",), ("moe_jax.hf",),
          ("moe_jax.train",), ("configs",), ("experiments", "benchmarks"))
KERNELS = "pallas_kernels"
KERNEL_DEPENDENCIES = frozenset({"jax", "jaxlib", "numpy"})  # besides the standard library


# ---- the checker ----

def module_files(root: Path, packages) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root/<package>` (a package's __init__.py is
    the package itself)."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imported_names(tree: ast.AST, module: str, is_package: bool, modules) -> list[str]:
    """Absolute dotted names of everything imported anywhere in `tree`: `import X.Y` gives X.Y;
    `from X import a` gives X.a if that is one of `modules`, else X (a is a name defined in X)."""
    package = module if is_package else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import a`, `from ..b import c`
                parts = package.split(".")
                source = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                source = node.module
            names += [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                      for alias in node.names]
    return names


def _resolve(name: str, modules) -> str | None:
    """The longest prefix of `name` that is one of `modules` (None: not ours)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, packages) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """-> (module -> modules of `packages` it imports, module -> top-level names of the other packages
    it imports)."""
    files = module_files(root, packages)
    graph, external = {}, {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module], external[module] = set(), set()
        for name in _imported_names(tree, module, path.name == "__init__.py", files):
            if name.split(".")[0] not in packages:
                external[module].add(name.split(".")[0])
            elif (target := _resolve(name, files)) not in (None, module):
                graph[module].add(target)
    return graph, external


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle, as the list of modules along it (first == last); one per strongly connected
    component of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, component) for component in components]


def _cycle_through(graph, component: set[str]) -> list[str]:
    """A shortest cycle from the component's first module back to it, inside the component."""
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & component):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def layer_of(module: str) -> tuple[int, str]:
    """(rank in LAYERS, package) of the most specific layer package holding `module`."""
    best = None
    for rank, peers in enumerate(LAYERS):
        for package in peers:
            if (module == package or module.startswith(package + ".")) and (
                    best is None or len(package) > len(best[1])):
                best = (rank, package)
    if best is None:
        raise ValueError(f"{module} is in no layer of LAYERS; add its package to tests/test_imports.py.")
    return best


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up the layer order, or across to a peer package of the same layer."""
    out = []
    for module in sorted(graph):
        rank, package = layer_of(module)
        for target in sorted(graph[module]):
            target_rank, target_package = layer_of(target)
            if target_rank > rank or (target_rank == rank and target_package != package):
                out.append(f"{module} ({package}) imports {target} ({target_package}), which is not below it")
    return out


def kernel_violations(graph: dict[str, set[str]], external: dict[str, set[str]]) -> list[str]:
    """Imports of pallas_kernels that are neither pallas_kernels, jax, numpy nor the standard library."""
    out = []
    for module in sorted(graph):
        if layer_of(module)[1] != KERNELS:
            continue
        ours = sorted(t for t in graph[module] if layer_of(t)[1] != KERNELS)
        theirs = sorted(n for n in external[module] if n not in KERNEL_DEPENDENCIES | sys.stdlib_module_names)
        out += [f"{module} imports {name}: the kernels use jax and numpy only" for name in ours + theirs]
    return out


# ---- the repository ----

GRAPH, EXTERNAL = import_graph(ROOT, PACKAGES)


def test_the_graph_is_read():
    # Known edges, one of them inside a function, so an empty or blind parse fails here.
    assert len(GRAPH) > 50
    assert "moe_jax.routing" in GRAPH["moe_jax.moe_layer"]
    assert "pallas_kernels" in GRAPH["moe_jax.experts"]  # imported inside the pallas backend
    assert "moe_jax.data.stream" in GRAPH["moe_jax.data.pipeline"]  # inside make_lm_data
    assert "moe_jax.train.run_config" in GRAPH["configs.base"]
    assert "flax" in EXTERNAL["moe_jax.moe_layer"]


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_go_down_the_layers():
    violations = layer_violations(GRAPH)
    assert not violations, "\n".join(violations)


def test_kernels_stand_alone():
    violations = kernel_violations(GRAPH, EXTERNAL)
    assert not violations, "\n".join(violations)


# ---- the checker on fabricated cases ----

def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import helper\n",
        "pkg/b.py": "def helper():\n    from pkg import a  # only when called\n    return a\n",
        "pkg/c.py": "import pkg.a\n",
    })
    graph, _ = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    (tmp_path / "pkg/b.py").write_text("def helper():\n    return 1\n")
    assert find_cycles(import_graph(tmp_path, ("pkg",))[0]) == []


def test_checker_resolves_relative_imports_and_package_names(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.sub.x import X\n",
        "pkg/sub/__init__.py": "from . import x\nfrom .y import Y\n",
        "pkg/sub/x.py": "from ..z import Z\nX = 1\n",
        "pkg/sub/y.py": "from pkg.sub import x\nfrom pkg import X\nY = 1\n",
        "pkg/z.py": "import os\nimport numpy as np\nZ = 1\n",
    })
    graph, external = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.sub.x"}, "pkg.sub": {"pkg.sub.x", "pkg.sub.y"}, "pkg.sub.x": {"pkg.z"},
                     "pkg.sub.y": {"pkg.sub.x", "pkg"}, "pkg.z": set()}
    assert external["pkg.z"] == {"os", "numpy"}
    # pkg.sub.y reads X from pkg's __init__, which imports pkg.sub.x only: no cycle.
    assert find_cycles(graph) == []
    graph["pkg.z"].add("pkg.sub.x")
    assert find_cycles(graph) == [["pkg.sub.x", "pkg.z", "pkg.sub.x"]]


def test_checker_finds_upward_peer_and_kernel_imports():
    graph = {
        "moe_jax.routing": {"moe_jax.types", "moe_jax.train.loop"},  # core -> train: up
        "moe_jax.sharding.rules": {"moe_jax.sharding.config", "moe_jax.moe_layer"},  # fine
        "moe_jax.train.loop": {"moe_jax.data", "moe_jax.sharding.rules"},  # fine
        "experiments.train": {"benchmarks.gmm", "configs.base"},  # peer: not allowed
        "pallas_kernels.metadata": {"moe_jax.types"},  # kernels -> moe_jax: up, and not standalone
        "pallas_kernels.ops": {"pallas_kernels.kernel"},
    }
    for targets in list(graph.values()):
        for t in targets:
            graph.setdefault(t, set())
    violations = layer_violations(graph)
    assert [v.split(" (")[0] for v in violations] == ["experiments.train", "moe_jax.routing",
                                                      "pallas_kernels.metadata"]
    external = {m: set() for m in graph}
    external["pallas_kernels.ops"] = {"functools", "jax", "numpy", "flax"}
    assert kernel_violations(graph, external) == [
        "pallas_kernels.metadata imports moe_jax.types: the kernels use jax and numpy only",
        "pallas_kernels.ops imports flax: the kernels use jax and numpy only"]
