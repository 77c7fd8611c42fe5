"""The package's import graph (every import in src/bstar, lazy ones in functions included): no cycle between
modules, and no import from a lower layer up to a higher one. Layers, lowest first; a module imports only its
own layer and those below."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
LAYERS = [
    ("bstar.errors", "bstar.utils"),
    ("bstar.kernels",),
    ("bstar.engine",),
    ("bstar.train", "bstar.vllm"),
    ("bstar.loop", "bstar.embedded"),
    ("bstar.results", "bstar.testing", "bstar.serve"),
    ("bstar.cli", "bstar.__main__"),
]
FACADE = "bstar"  # bstar/__init__.py re-exports the engine's public names: outside every layer


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (SRC / "bstar").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _resolve(name: str, mods) -> str | None:
    """The module an import of `name` loads last (a name inside a module: that module)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path, mods) -> set[str]:
    out = set()
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "bstar":
                r = _resolve(n, mods)
                if r is not None and r != mod:
                    out.add(r)
    return out


def _layer(mod: str) -> int | None:
    for i, roots in enumerate(LAYERS):
        if any(mod == r or mod.startswith(r + ".") for r in roots):
            return i
    return None


def _graph():
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_every_module_has_a_layer():
    assert [m for m in _graph() if m != FACADE and _layer(m) is None] == []


def test_no_import_reaches_up_a_layer():
    bad = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in _graph().items()
        if m != FACADE
        for d in deps
        if d == FACADE or (_layer(d) or 0) > _layer(m)
    ]
    assert bad == []


def test_no_import_cycle():
    g = _graph()
    color, stack, cycles = {}, [], []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d == FACADE:
                continue
            if color.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in color:
                visit(d)
        stack.pop()
        color[m] = 2

    for m in sorted(g):
        if m not in color:
            visit(m)
    assert cycles == []


def test_the_checker_sees_violations():
    """The graph is read right: known edges are found (a checker that reads nothing passes every test above)."""
    g = _graph()
    assert "bstar.kernels.dispatch" in g["bstar.kernels.decode_attention"]
    assert "bstar.engine.core.llm_engine" in g["bstar.engine.entrypoints.llm"]
    assert _layer("bstar.cli.run") > _layer("bstar.loop.controller") > _layer("bstar.engine.core.scheduler")


def test_engine_room_sizes():
    """The engine room reads by folder: no file over ~450 lines, no folder over 12 files (kernels apart)."""
    eng = SRC / "bstar" / "engine"
    long = {str(p.relative_to(eng)): n for p in eng.rglob("*.py") if (n := len(p.read_text().splitlines())) > 470}
    big = {
        str(d.relative_to(eng)): n
        for d in [eng, *eng.rglob("*")]
        if d.is_dir() and (n := len(list(d.glob("*.py")))) > 12
    }
    assert long == {} and big == {}
