"""The package's shape (docs/architecture.md): the inference side never imports training, evaluation
or the phantom generator, the core CLI names no plug-in package, and no module imports itself back
through another."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from ..conftest import REPO

SRC = REPO / "src" / "lsmseg"
# What the inference image ships and runs; none of it may need the training or evaluation packages
# (not installed there) or lsmseg.synth (left out of the image by .dockerignore).
INFERENCE_MODULES = ("lsmseg.cli", "lsmseg.io", "lsmseg.inference", "lsmseg.weights", "lsmseg.distributed",
                     "lsmseg.challenge.runner", "lsmseg.challenge.folder", "lsmseg.challenge.exec",
                     "lsmseg.challenge.invoke", "lsmseg.challenge.server")
FOREIGN = ("lsmseg_training", "lsmseg_evaluation", "lsmseg.synth")


def _modules() -> dict[str, Path]:
    """Every module of the lsmseg package by dotted name."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Modules ``name`` imports anywhere in its file (lazy imports inside functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            imported.add(module)
            imported.update(f"{module}.{alias.name}" for alias in node.names)
    return imported


def test_inference_imports_neither_training_nor_evaluation():
    script = textwrap.dedent(f"""
        import importlib, sys
        sys.path.insert(0, {str(REPO / "src")!r})
        for name in {INFERENCE_MODULES!r}:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules if m.startswith({FOREIGN!r})))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def _code_strings(path: Path) -> list[str]:
    """String constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        documented = isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        if documented and ast.get_docstring(node):
            docstrings.add(id(node.body[0].value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_lsmseg_module_names_the_training_or_evaluation_package():
    """Plug-in commands come from entry points (pyproject.toml), never from an import by name."""
    plugins = ("lsmseg_training", "lsmseg_evaluation")
    for name, path in _modules().items():
        named = {m for m in _imports(name, path) if m.split(".")[0] in plugins}
        named |= {text for text in _code_strings(path) if any(p in text for p in plugins)}
        assert not named, f"{name} names {sorted(named)}"


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {m for m in _imports(name, path) if m in modules and m != name} for name, path in modules.items()}
    # A package's __init__ re-exporting its modules is not a cycle of the modules themselves.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep])
            if dep not in state:
                visit(dep, trail + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_plugin_commands_are_the_entry_points_pyproject_declares():
    """`lsmseg` finds its plug-in commands in the installed metadata: stale metadata (an install from
    before the entry points existed) would silently drop them."""
    import tomllib
    from importlib.metadata import entry_points

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lsmseg.commands"]
    installed = {e.name: e.value for e in entry_points(group="lsmseg.commands")}
    assert installed == declared, "the installed lsmseg metadata is stale: run `pip install -e .` again"


# The command-line front ends: every public function and class (and method) is documented there.
FRONT_ENDS = ("lsmseg.cli", "lsmseg.argtypes", "lsmseg.challenge.runner", "lsmseg.inference.__main__")
# Elsewhere, the public names a review found undocumented (module -> qualified names).
DOCUMENTED = {
    "lsmseg.challenge.server": ("InvokeService.load", "InvokeService.health", "InvokeService.run_invocation",
                                "make_handler"),
    "lsmseg.inference.engines": ("cache_dir", "onnxruntime_available", "openvino_available"),
    "lsmseg.weights": ("Manifest",),
    "lsmseg.inference.predictor": ("logit",),
}


def _definitions(path: Path) -> dict[str, ast.AST]:
    """Module-level functions and classes of a file, and their methods (``Class.method``), by name."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node
            if isinstance(node, ast.ClassDef):
                found.update({f"{node.name}.{m.name}": m for m in node.body if isinstance(m, ast.FunctionDef)})
    return found


def test_public_functions_of_the_front_ends_are_documented():
    modules = _modules()
    missing = []
    for name in FRONT_ENDS:
        for qualified, node in _definitions(modules[name]).items():
            public = not any(part.startswith("_") for part in qualified.split("."))
            if public and not ast.get_docstring(node):
                missing.append(f"{name}.{qualified}")
    for name, wanted in DOCUMENTED.items():
        definitions = _definitions(modules[name])
        missing += [f"{name}.{q}" for q in wanted if not ast.get_docstring(definitions[q])]
    assert not missing, f"undocumented: {missing}"


def test_package_data_that_pyproject_names_exists():
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = [REPO / where for where in setuptools["packages"]["find"]["where"]]
    for package, patterns in setuptools["package-data"].items():
        [folder] = [root / package.replace(".", "/") for root in roots if (root / package.replace(".", "/")).is_dir()]
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"pyproject.toml names package data {package}/{pattern}, which is missing"
