"""The house: modules import one way (no cycle among search's modules, lazy imports included),
and the light modules the CLI parses with load no TensorFlow."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports() -> dict[str, set[str]]:
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (ROOT / "search").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("search"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("search"))
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycle_between_modules():
    graph = _imports()
    # a package's __init__ may re-export its submodules; a submodule must not import its package back
    edges = {m: {d for d in ds if not (d.startswith(m + ".") and m in ("search", "search.engines"))}
             for m, ds in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in edges.get(node, ()):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in edges:
        if module not in state:
            visit(module, [module])
    assert "search.data" not in graph["search.images"]


def test_the_cli_parses_without_loading_tensorflow():
    code = ("import sys; from search import cli; cli.build_parser().parse_args(['final', '--help'])")
    out = subprocess.run([sys.executable, "-c", code.replace("'--help'", "'--seed', '1'") +
                          "; print('tensorflow' in sys.modules, 'keras' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.split() == ["False", "False"]
