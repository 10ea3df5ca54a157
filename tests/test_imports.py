"""The package's import graph: no cycle (module-level or inside functions), imports point down
the pipeline model -> symbolic -> backends -> numeric -> analysis -> report -> api -> cli, and
nothing numeric imports SymPy."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ssi_symbolic"
#: the stages in pipeline order; shared leaves (errors, version, plots, background: work on
#: the second core) may be imported by all
ORDER = ["model", "symbolic", "backends", "numeric", "analysis", "report", "api", "cli",
         "__main__", "__init__"]
LEAVES = {"errors", "version", "plots", "background"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _graph():
    """{module: {imported module}} over every import statement, at any depth."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{target}.{alias.name}" if target else alias.name
                    deps.add(full if full in modules else target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ssi_symbolic"):
                deps.add(node.module[len("ssi_symbolic."):])
        graph[name] = {d for d in deps if d in modules and d != name} | (
            {"__init__"} if "" in deps else set())
    return graph, modules


def _stage(name: str) -> str:
    return name.split(".")[0]


def test_no_import_cycle():
    graph, _ = _graph()
    state = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, m]))
            if m not in state:
                visit(m, stack + [n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])


def test_imports_point_down_the_pipeline():
    graph, _ = _graph()
    bad = []
    for n, deps in graph.items():
        s = _stage(n)
        if s in LEAVES:
            assert all(_stage(d) in LEAVES for d in deps), (n, deps)
            continue
        for d in deps:
            t = _stage(d)
            if t in LEAVES or t == s:
                continue
            if ORDER.index(t) > ORDER.index(s):
                bad.append(f"{n} imports {d}")
    assert not bad, bad


def test_numeric_code_does_not_import_sympy():
    for path in (PKG / "numeric").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(x.split(".")[0] == "sympy" for x in names), path


def test_modules_have_one_job_each():
    """attention.py and reproduce.py were split; no module of the package grows past 1000
    lines (most stay well under 400)."""
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert "report.reproduce" not in sizes
    assert max(sizes.values()) <= 1000, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
