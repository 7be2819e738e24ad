"""The architecture the folders show: layers whose imports point down only, no import cycle, a
probabilistic core that depends on torch and Pyro alone, and a config layer without torch.

The import graph is built from the source files (every `import` and `from ... import` statement,
also those inside functions), not from what a Python process happens to have loaded.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Where each installed package's source lives (setup.cfg: package_dir maps models/ and guides/).
PACKAGE_DIRS = {"vkd_pyro": REPO / "vkd_pyro", "vkd_pyro.models": REPO / "models", "vkd_pyro.guides": REPO / "guides"}
# Layers from the bottom up; a module may import its own layer and those below it.
LAYERS = [
    ("config", ["vkd_pyro.config", "vkd_pyro.errors", "vkd_pyro.classes", "vkd_pyro.files", "vkd_pyro.logs"]),
    ("data", ["vkd_pyro.data", "vkd_pyro.encoders"]),
    ("core", ["vkd_pyro.models", "vkd_pyro.guides", "vkd_pyro.inference"]),
    ("objectives", ["vkd_pyro.objectives"]),
    ("training", ["vkd_pyro.training"]),
    ("analysis", ["vkd_pyro.analysis"]),
    ("interface", ["vkd_pyro.cli", "vkd_pyro.__main__", "vkd_pyro"]),
]
CORE = ("vkd_pyro.models", "vkd_pyro.guides", "vkd_pyro.inference")


def module_files() -> dict:
    """Dotted module name -> source file, for every module of the installed packages."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package,) + parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = module_files()


def imports_of(name: str, path: Path) -> set:
    """The project modules that `name` imports (anywhere in its source)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def layer(name: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{name} belongs to no layer"
    return best


def test_the_graph_sees_the_whole_package():
    assert {"vkd_pyro.models.vkd", "vkd_pyro.guides.ehr_posterior", "vkd_pyro.training.loop",
            "vkd_pyro.analysis.runs", "vkd_pyro.config"} <= set(GRAPH)
    assert "vkd_pyro.inference.module" in GRAPH["vkd_pyro.training.loop"] or any(
        "vkd_pyro.inference" in m for m in GRAPH["vkd_pyro.training.loop"])


def test_no_import_cycle():
    state: dict = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])


def test_imports_point_down_the_layers():
    upward = [f"{a} ({LAYERS[layer(a)][0]}) -> {b} ({LAYERS[layer(b)][0]})"
              for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_the_probabilistic_core_depends_on_torch_and_pyro_only():
    allowed_third_party = {"torch", "pyro"}
    for name, path in MODULES.items():
        if not name.startswith(CORE):
            continue
        assert all(t.startswith(CORE) for t in GRAPH[name]), (name, GRAPH[name])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = {(node.module or "").split(".")[0]}
            else:
                continue
            third = {t for t in tops if t not in sys.stdlib_module_names and t != "vkd_pyro"}
            assert third <= allowed_third_party, (name, third)


def test_config_does_not_import_torch():
    code = "import sys, vkd_pyro.config; print('torch' in sys.modules, 'pyro' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]
