"""The module graph keeps the architecture of docs/design.md: no circles, and the host and the
device share only the protocol (and the update rules it carries)."""

from __future__ import annotations

import ast
from pathlib import Path

import nearstep

ROOT = Path(nearstep.__file__).resolve().parent

# The training process's side, and the device's side (see docs/design.md, "Where the code lives").
HOST = {"optim", "pipeline", "checkpoint", "trace", "distributed", "sensitivity", "cores", "keras"}
DEVICE = {"engine", "kernels"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The nearstep modules ``name`` imports, at its top or inside functions (run-time imports count)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("nearstep.")]
            targets = [t.removeprefix("nearstep.") for t in targets]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and (node.module == "nearstep" or node.module.startswith("nearstep.")):
                base = []
            else:
                continue
            module = (node.module or "").removeprefix("nearstep").lstrip(".") if not node.level else (node.module or "")
            prefix = ".".join(base + ([module] if module else []))
            for alias in node.names:
                candidate = f"{prefix}.{alias.name}" if prefix else alias.name
                targets.append(candidate if candidate in known else prefix)
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(files)
    return {name: _imports(path, name, known) - {""} for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_imports_of_every_kind() -> None:
    graph = _graph()
    assert {"protocol", "engine", "store", "device"} <= graph["optim"] | graph["device"]
    assert "rules" in graph["protocol"]
    assert "uring" in graph["engine"]  # a plain `from . import aio, ..., uring`
    assert "bench.workload" in graph["bench.ranks"]


def test_no_module_imports_itself_through_others() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_protocol_depends_on_nothing_but_the_update_rules() -> None:
    graph = _graph()
    assert graph["protocol"] <= {"rules"}
    assert graph["rules"] == set()


def test_host_and_device_meet_only_in_the_protocol() -> None:
    graph = _graph()
    for host in HOST:
        assert not graph[host] & DEVICE, f"{host} imports the device's implementation {graph[host] & DEVICE}"
    for device in DEVICE:
        assert not graph[device] & HOST, f"{device} imports the host's {graph[device] & HOST}"


def _third_party(path: Path) -> set[str]:
    """Top-level names of the non-nearstep packages a module imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - {"nearstep"}


def test_only_the_keras_front_end_imports_keras_or_tensorflow() -> None:
    users = {_module_name(p) for p in ROOT.rglob("*.py") if _third_party(p) & {"keras", "tensorflow"}}
    assert users == {"keras", "bench.keras"}
