"""The engine's layout holds: no import cycles, no imports hidden in functions, no streamlit below the app.

These read the source with `ast` (nothing is imported), so they are fast and name the offending line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE, KERNELS = "headlab.engine", "headlab.kernels"
PACKAGES = (ENGINE, KERNELS)
# Lower layers never import higher ones (docs/architecture.md); kernels import no engine module.
LAYERS = ["core", "distributed", "models", "data", "importance", "runtime", "dynamic", "pruning", "export", "recovery",
          "routing", "cli"]
ALLOWED = {
    "core": {"core"},
    "distributed": {"core", "distributed"},
    "models": {"core", "models"},
    "data": {"data"},
    "importance": {"core", "distributed", "models", "data", "importance", "runtime"},
    "runtime": {"core", "models", "data", "runtime"},
    "dynamic": {"core", "distributed", "models", "data", "runtime", "importance", "dynamic"},
    "pruning": {"core", "distributed", "models", "data", "importance", "runtime", "pruning", "export"},
    "export": {"core", "models", "data", "runtime", "export"},
    "recovery": {"core", "distributed", "models", "data", "importance", "runtime", "pruning", "export", "recovery"},
    "routing": {"core", "distributed", "models", "data", "runtime", "pruning", "routing"},
    "cli": set(LAYERS),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg.replace(".", "/")).rglob("*.py")):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[ast.stmt, list[str]]]:
    """Every import statement of our own modules in `path`, with the modules it names."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [base] if base in MODULES else []
            targets += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name in MODULES]
        else:
            continue
        if targets:
            out.append((node, targets))
    return out


def _top_level_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {t for node, ts in _imports(name, path) if node.col_offset == 0 for t in ts if t != name}
    return graph


def test_no_module_level_import_cycle():
    graph, state, stack, cycles = _top_level_graph(), {}, [], []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_engine_modules_are_imported_at_module_level_only():
    """An import of our own module inside a function is how cycles hide; kernels may defer Triton's."""
    hidden = [f"{MODULES[name].relative_to(ROOT)}:{node.lineno}"
              for name in MODULES if name.startswith(ENGINE)
              for node, _ in _imports(name, MODULES[name]) if node.col_offset > 0]
    assert not hidden, "imports inside functions: " + ", ".join(hidden)


def test_folders_import_only_the_layers_below_them():
    wrong = []
    for name, path in MODULES.items():
        parts = name.removeprefix(ENGINE + ".").split(".")
        if not name.startswith(ENGINE + ".") or len(parts) < 2:
            continue
        folder = parts[0]
        for node, targets in _imports(name, path):
            for t in targets:
                tp = t.removeprefix(ENGINE + ".").split(".")
                if t.startswith(ENGINE + ".") and tp[0] in ALLOWED and tp[0] not in ALLOWED[folder]:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} ({folder} -> {tp[0]})")
        if folder not in ALLOWED:
            wrong.append(f"{path.relative_to(ROOT)}: folder {folder!r} has no place in the layering")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_kernels_import_no_engine_module():
    bad = [f"{MODULES[n].relative_to(ROOT)}:{node.lineno}" for n in MODULES if n.startswith(KERNELS)
           for node, ts in _imports(n, MODULES[n]) if any(t.startswith(ENGINE) for t in ts)]
    assert not bad, bad


def test_engine_and_kernels_never_import_streamlit():
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(m.split(".")[0] == "streamlit" for m in mods):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


def test_engine_top_level_holds_only_the_package_entry_points():
    loose = sorted(p.name for p in (ROOT / "headlab" / "engine").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside a concept folder: {loose}"
