"""The package's structure stays as docs/ARCHITECTURE.md draws it: dependencies point one way
(cluster -> server -> engine -> sched; engine -> executor -> model -> ops), no import cycle, and files and
functions stay small. Read from the source with `ast` (nothing is imported)."""
from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tetri_engine"

# Which layers each layer may import. "base" is the plain modules every layer shares; "entry" (the
# package root, the CLI and its commands) wires everything together and may import anything.
LAYERS = {
    "base": {"base"},
    "ops": {"base", "ops", "native"},
    "model": {"base", "ops", "model"},
    "executor": {"base", "ops", "model", "executor"},
    "sched": {"base", "sched"},
    "engine": {"base", "sched", "executor", "engine"},
    "server": {"base", "sched", "engine", "server"},
    "cluster": {"base", "sched", "engine", "server", "cluster"},  # beside server: replicas on Ray Serve
}

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 64  # "about 60"
SIZE_EXCEPTIONS: set[str] = set()  # (the scheduler's, issue 14, are gone: it has landed)


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


NATIVE = "tetri_engine._C"  # the compiled extension (no .py source)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module in ("tetri_engine.config", "tetri_engine.request", "tetri_engine.errors"):
        return "base"
    if module == NATIVE:
        return "native"
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return "entry"


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported tetri_engine module, under `if TYPE_CHECKING`) for every import in `module`,
    module level or inside functions."""
    tree = ast.parse(MODULES[module].read_text())
    typing_only = {id(n) for block in ast.walk(tree) if _type_checking_block(block)
                   for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself.
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES.keys() | {NATIVE}
                       else node.module for a in node.names]
        else:
            continue
        found += [(t, id(node) in typing_only) for t in targets if t.startswith("tetri_engine")]
    return found


def test_no_import_climbs_a_layer():
    wrong = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
             for m in sorted(MODULES) if layer_of(m) != "entry"
             for t, _ in imports(m) if layer_of(t) not in LAYERS[layer_of(m)]]
    assert not wrong, "\n".join(wrong)


def test_the_engine_imports_neither_the_model_nor_ops():
    engine = [m for m in MODULES if layer_of(m) == "engine"]
    assert engine
    bad = [(m, t) for m in engine for t, _ in imports(m) if layer_of(t) in ("model", "ops", "native")]
    assert not bad, bad


def test_no_import_cycle():
    graph = {m: {t for t, typing_only in imports(m) if not typing_only and t != m} for m in MODULES}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_files_and_functions_stay_small():
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES and rel not in SIZE_EXCEPTIONS:
            too_big.append(f"{rel}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in SIZE_EXCEPTIONS:
                    too_big.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    assert not too_big, "\n".join(too_big)
