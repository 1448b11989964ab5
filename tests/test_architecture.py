"""The package's shape, checked: imports run one way, functions fit a screen, files stay small
(the sizes also for the scripts around the package: the step entries, bench/, scripts/).

STYLE (README, 写代码的约定): no function over 60 lines; no file over 400 lines unless its
docstring says why ("longer than 400 lines:"); no module imports one that imports it back,
counting imports inside functions too (a lazy import hides a cycle, it does not remove it).
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zhlora"
FILES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
LONG_FILE_REASON = "longer than 400 lines:"


def module_name(path: Path) -> str:
    parts = ["zhlora", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in FILES}
REPO = PACKAGE.parent
# The scripts around the package; hidden folders (bench/.venv-llamafactory, bench/.work) are not ours.
SCRIPTS = sorted([*REPO.glob("*.py"), *(p for folder in ("bench", "data", "examples", "experiments", "scripts",
                                                          "training", "visualization")
                                        for p in (REPO / folder).rglob("*.py")
                                        if not any(part.startswith(".") for part in p.relative_to(REPO).parts))])
SIZED = FILES + SCRIPTS


def sized_id(path: Path) -> str:
    return module_name(path) if path.is_relative_to(PACKAGE) else str(path.relative_to(REPO))


def zhlora_imports(path: Path) -> set[str]:
    """Every zhlora module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from zhlora import data` names a module; `from zhlora.x import f` names x
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        found |= {name for name in names if name in MODULES}
    return found - {module_name(path)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: zhlora_imports(path) for name, path in MODULES.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert cycles(graph) == []


@pytest.mark.parametrize("path", SIZED, ids=[sized_id(p) for p in SIZED])
def test_functions_fit_a_screen(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


@pytest.mark.parametrize("path", SIZED, ids=[sized_id(p) for p in SIZED])
def test_files_stay_small_or_say_why(path):
    text = path.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    if lines > MAX_FILE_LINES:
        assert LONG_FILE_REASON in (ast.get_docstring(ast.parse(text)) or ""), f"{lines} lines"
