"""Imports point one way: tasks < search < memory < agent < workers < arbor (the CLI)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["tasks", "search", "memory", "agent", "workers", "arbor"]


def _imports(path: Path):
    """(line, top-level package) of every absolute import in a file, function-level imports included."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_no_import_points_up_a_layer():
    upward = []
    for rank, package in enumerate(LAYERS):
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"layer {package}/ has no modules"
        for path in files:
            for line, top in _imports(path):
                if top in LAYERS and LAYERS.index(top) > rank:
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {top} (a layer above {package})")
    assert not upward, "\n".join(upward)


def test_the_walk_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from workers.app import app\n")
    assert list(_imports(module)) == [(2, "workers")]


# ---- the module import graph: no cycles, and agent/'s modules in one order ----


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module in the layers (a package is its __init__.py)."""
    modules = {}
    for package in LAYERS:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _module_imports(name: str, path: Path, modules: dict[str, Path]):
    """(line, module) for every import of a layer module in `name`'s file, function-level ones included.
    `import a.b` is a.b; `from a import b` is the submodule a.b when there is one, else a (its __init__): a
    package's __init__ importing its submodules is an edge from the package, not from each submodule to it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in found:
            while target and target not in modules:  # `import a.b.name`: the deepest module it names
                target = target.rpartition(".")[0]
            if target and target != name:
                yield node.lineno, target


def _graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {module it imports: the line of the first such import}"""
    modules = _modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for line, target in _module_imports(name, path, modules):
            edges.setdefault(target, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds at least one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _described(component: set[str], graph: dict[str, dict[str, int]], root: Path) -> str:
    modules = _modules(root)
    edges = [f"{modules[a].relative_to(root)}:{line} imports {b}" for a in sorted(component)
             for b, line in sorted(graph[a].items()) if b in component]
    return "import cycle among " + ", ".join(sorted(component)) + ":\n  " + "\n  ".join(edges)


def test_no_two_modules_import_each_other():
    graph = _graph(ROOT)
    cycles = [_described(c, graph, ROOT) for c in _cycles(graph)]
    assert not cycles, "\n".join(cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for package in LAYERS:
        (root / package).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_graph_resolves_submodules_packages_and_function_level_imports(tmp_path):
    _write(tmp_path, {
        "search/__init__.py": "from search.a import f\nfrom search import b\n",
        "search/a.py": "def f():\n    from search.b import g\n",
        "search/b.py": "from . import c\nimport search.c.name\n",
        "search/c.py": "from search import STRATEGIES\n",
    })
    graph = _graph(tmp_path)
    assert graph["search"] == {"search.a": 1, "search.b": 2}
    assert graph["search.a"] == {"search.b": 2}
    assert graph["search.b"] == {"search.c": 1}
    assert graph["search.c"] == {"search": 1}  # a name from the package: its __init__
    # search/__init__ imports its submodules (no cycle by itself); c importing `search` closes one
    assert _cycles(graph) == [{"search", "search.a", "search.b", "search.c"}]
    (tmp_path / "search/c.py").write_text("X = 1\n")
    assert _cycles(_graph(tmp_path)) == []


# agent/'s modules, lowest first: a module imports only modules before it. A new module goes after every agent module
# it imports and before every one that imports it.
AGENT_ORDER = [
    "settings", "config", "schema", "files", "versions", "locks", "allocator", "promotion", "store", "run_store", "policy",
    "adapters", "value", "process_group", "trainer", "distributed", "registry", "job_search", "proposals", "select", "evaluation", "preference", "refine",
    "curriculum", "plan", "report", "warm_start", "gate", "value_cycle", "jobs", "loop", "train_cycle", "runner",
]


def _agent_order_violations(root: Path, order: list[str]) -> list[str]:
    present = {p.stem for p in (root / "agent").glob("*.py") if p.stem != "__init__"}
    problems = [f"agent/{m}.py is not in AGENT_ORDER (tests/test_layers.py): place it after every agent module it "
                "imports and before those that import it" for m in sorted(present - set(order))]
    problems += [f"AGENT_ORDER names agent/{m}.py, which does not exist: remove it" for m in order if m not in present]
    rank = {m: i for i, m in enumerate(order)}
    for name, edges in sorted(_graph(root).items()):
        low = name.removeprefix("agent.")
        for target, line in sorted(edges.items()):
            high = target.removeprefix("agent.")
            if name.startswith("agent.") and target.startswith("agent.") and low in rank and high in rank:
                if rank[high] > rank[low]:
                    problems.append(f"agent/{low}.py:{line} imports agent.{high}, which AGENT_ORDER places above it")
    return problems


def test_agent_modules_import_only_modules_below_them():
    problems = _agent_order_violations(ROOT, AGENT_ORDER)
    assert not problems, "\n".join(problems)


def test_the_agent_order_names_new_and_upward_modules(tmp_path):
    _write(tmp_path, {"agent/store.py": "", "agent/loop.py": "from agent import store\n",
                      "agent/gate.py": "def f():\n    from agent.loop import x\n"})
    assert _agent_order_violations(tmp_path, ["store", "loop", "gate"]) == []
    assert _agent_order_violations(tmp_path, ["loop", "store", "gate", "old"]) == [
        "AGENT_ORDER names agent/old.py, which does not exist: remove it",
        "agent/loop.py:1 imports agent.store, which AGENT_ORDER places above it"]
    assert _agent_order_violations(tmp_path, ["store", "loop"])[0].startswith("agent/gate.py is not in AGENT_ORDER")
