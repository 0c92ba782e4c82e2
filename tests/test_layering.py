"""The sqc package imports downward only, and no two sqc modules import each other (STYLE.md 16).

The graph is read from the source with ``ast``: every ``import`` / ``from ... import``
statement counts, module-level and function-local alike, relative and absolute.
An import names the module it loads (``from .x import y`` is an edge to ``x``, or to
``x.y`` when that is a module); the parent packages Python initialises on the way
are not edges.

Layers (what each may import besides itself)::

    config    nothing                          (everyone may read it)
    quant     config                           pure quantization math
    runtime   config                           running a compiled model needs no compiler
    codegen   runtime, config                  kernels are built for the runtime's layouts
    trace     config                           the traced graph and its site metadata
    passes    trace, quant, runtime, config    graph rewrites
    face      anything                         compile, save / load, CLI, reports
"""
from __future__ import annotations

import ast
import os
import pathlib

import pytest

import sqc

ROOT = pathlib.Path(sqc.__file__).resolve().parent

#: what each layer may import besides itself
ALLOWED = {
    "config": set(),
    "quant": {"config"},
    "runtime": {"config"},
    "codegen": {"runtime", "config"},
    "trace": {"config"},
    "passes": {"trace", "quant", "runtime", "config"},
    "face": {"config", "quant", "runtime", "codegen", "trace", "passes"},
}
_PACKAGES = ("runtime", "codegen", "passes", "quant")


def layer_of(module: str) -> str:
    """``sqc.runtime.cpu.kernels`` -> ``runtime``; ``sqc.config`` -> ``config``; ``sqc.compiler`` -> ``face``."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in _PACKAGES:
        return parts[1]
    if module in ("sqc.config", "sqc.trace"):
        return parts[1]
    return "face"


def _module_name(path: pathlib.Path, root: pathlib.Path, package: str) -> tuple[str, bool]:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def import_graph(root: pathlib.Path = ROOT, package: str = "sqc") -> dict[str, set[str]]:
    """Module -> the sqc modules it imports (module-level and function-local)."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            if n.endswith(".py"):
                p = pathlib.Path(dirpath) / n
                files[_module_name(p, root, package)] = p
    modules = {name for name, _ in files}
    graph: dict[str, set[str]] = {}
    for (name, is_pkg), path in files.items():
        here = name if is_pkg else name.rpartition(".")[0]  # the package relative imports start from
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges.add(_known_prefix(alias.name, modules))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if sub in modules else _known_prefix(base, modules))
        edges.discard(None)
        edges.discard(name)
        graph[name] = edges
    return graph


def _known_prefix(name: str, modules: set[str]) -> str | None:
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every edge from a module to a layer its own layer may not import."""
    bad = []
    for mod, deps in sorted(graph.items()):
        src = layer_of(mod)
        for dep in sorted(deps):
            dst = layer_of(dep)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{mod} ({src}) imports {dep} ({dst})")
    return bad


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# -- the checker on fake graphs -----------------------------------------------------------------------------------


def test_checker_finds_a_planted_upward_import():
    graph = {"sqc.runtime.cpu.kernels": {"sqc.codegen.build", "sqc.runtime.layout"}, "sqc.codegen.build": set(),
             "sqc.runtime.layout": {"sqc.config"}, "sqc.config": set()}
    assert upward_imports(graph) == ["sqc.runtime.cpu.kernels (runtime) imports sqc.codegen.build (codegen)"]
    for src, dst in [("sqc.runtime.x", "sqc.passes.lower"), ("sqc.runtime.x", "sqc.compiler"),
                     ("sqc.runtime.x", "sqc.trace"), ("sqc.quant.kmeans", "sqc.runtime.layout"),
                     ("sqc.codegen.cpu", "sqc.passes.base"), ("sqc.codegen.cpu", "sqc.artifact"),
                     ("sqc.passes.lower", "sqc.codegen.cpu"), ("sqc.passes.lower", "sqc.hf"),
                     ("sqc.config", "sqc.runtime.layout")]:
        assert upward_imports({src: {dst}, dst: set()}), (src, dst)
    for src, dst in [("sqc.compiler", "sqc.codegen.cpu"), ("sqc.codegen.cpu", "sqc.runtime.cpu.lanes"),
                     ("sqc.passes.lower", "sqc.runtime.qlinear"), ("sqc.quant.kmeans", "sqc.config"),
                     ("sqc.passes.lower", "sqc.trace"), ("sqc.runtime.cpu.kernels", "sqc.config")]:
        assert not upward_imports({src: {dst}, dst: set()}), (src, dst)


def test_checker_finds_a_planted_cycle():
    graph = {"sqc.a": {"sqc.b"}, "sqc.b": {"sqc.c"}, "sqc.c": {"sqc.a"}, "sqc.d": {"sqc.a"}}
    assert import_cycles(graph) == [["sqc.a", "sqc.b", "sqc.c"]]
    assert import_cycles({"sqc.a": {"sqc.b"}, "sqc.b": set()}) == []


def test_graph_reader_sees_local_relative_and_absolute_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "codegen").mkdir()
    (pkg / "__init__.py").write_text("from .compiler import compile\n")
    (pkg / "compiler.py").write_text("def compile():\n    from .runtime import cpu\n")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "runtime" / "cpu.py").write_text(
        "import os\n\ndef f():\n    from ..codegen.build import x\n    import pkg.compiler\n")
    (pkg / "codegen" / "__init__.py").write_text("")
    (pkg / "codegen" / "build.py").write_text("from pkg.runtime.cpu import f\nfrom . import build\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg"] == {"pkg.compiler"}
    assert graph["pkg.compiler"] == {"pkg.runtime.cpu"}
    assert graph["pkg.runtime.cpu"] == {"pkg.codegen.build", "pkg.compiler"}
    assert graph["pkg.codegen.build"] == {"pkg.runtime.cpu"}
    assert {layer_of(m.replace("pkg", "sqc", 1)) for m in graph["pkg.runtime.cpu"]} == {"codegen", "face"}
    assert import_cycles(graph) == [["pkg.codegen.build", "pkg.compiler", "pkg.runtime.cpu"]]


# -- the real package -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_graph_covers_the_package(graph):
    assert {"sqc", "sqc.compiler", "sqc.runtime.cpu.kernels", "sqc.codegen.cpu", "sqc.passes.lower"} <= set(graph)
    assert "sqc.runtime.layout" in graph["sqc.runtime.cpu.kernels"]


def test_imports_point_downward(graph):
    bad = upward_imports(graph)
    assert not bad, "upward imports (see the layer table in this file's docstring):\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    cycles = import_cycles(graph)
    assert not cycles, "sqc modules that import each other (function-local imports count):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


#: what loading a saved model (``sqc.load``, ``from_pretrained``) imports at module level
LOAD_PATH = ("sqc", "sqc.artifact", "sqc.restore", "sqc.compiled", "sqc.hf", "sqc.hf_format", "sqc.hf_quantizer")
COMPILER = ("sqc.passes", "sqc.codegen", "sqc.compiler")


def test_the_load_path_imports_no_compiler_module():
    """Loading a saved model needs the runtime only: importing sqc and the loaders (the Hugging Face quantizer
    included) in a fresh process imports nothing from sqc/passes, sqc/codegen or sqc/compiler.py. (The loads
    themselves are checked the same way in test_artifact.py and test_hf_surface.py.)"""
    import subprocess
    import sys

    script = ("import importlib, sys\n"
              f"for m in {LOAD_PATH!r}: importlib.import_module(m)\n"
              f"print(sorted(k for k in sys.modules if k.startswith({COMPILER!r})))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_sqc_compile_still_imports_on_use():
    assert callable(sqc.compile) and callable(sqc.compile_pretrained)
    from sqc import compile as c

    assert c is sqc.compile
