"""The package's structure rules, checked on its source: no import circle between modules (function-local imports
included), nothing under rollout/ or envs/ writes into a trainer or its metrics, and modules stay small."""

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "trl_epo"
MAX_LINES = 450  # "about 400": a module past this has more than one job


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (top level or inside functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def test_no_import_circle():
    modules = package_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exporting its submodules is not a dependency of those submodules on each other.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (modules[t].name == "__init__.py" and name.startswith(t + "."))}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_rollout_and_envs_never_write_into_a_trainer():
    offenders = []
    for path in list((PACKAGE / "rollout").rglob("*.py")) + list((PACKAGE / "envs").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "_metrics":
                offenders.append(f"{path.name}:{node.lineno} touches _metrics")
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for sub in ast.walk(target):
                        if (
                            isinstance(sub, ast.Attribute)
                            and isinstance(sub.value, ast.Name)
                            and "trainer" in sub.value.id
                        ):
                            offenders.append(f"{path.name}:{node.lineno} assigns {sub.value.id}.{sub.attr}")
            if isinstance(node, ast.Name) and node.id == "trainer":
                offenders.append(f"{path.name}:{node.lineno} uses a `trainer` object")
    assert not offenders, offenders


def test_modules_stay_small():
    big = {name: len(path.read_text().splitlines()) for name, path in package_modules().items()}
    assert not {n: lines for n, lines in big.items() if lines > MAX_LINES}
