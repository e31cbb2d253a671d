"""The import graph: no cycle in keras_attn, and nothing heavy imported before it is used."""

import ast
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_attn

PACKAGE = pathlib.Path(keras_attn.__file__).parent


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, modules):
    """The keras_attn modules that `path` imports, anywhere: at the top, inside functions,
    methods and conditionals (a lazy import is an arrow of the graph all the same).

    ``from package import module`` is an arrow to the module and one to the package
    (it reads the package's namespace: a module inside `package` that does so climbs
    back up to the package face that imports it); ``import package.module`` and
    ``from package.module import name`` are arrows to the module only.
    """
    name = _module_name(path)
    tree = ast.parse(path.read_text())
    found = _imports_of_tree(tree, name, path.name == "__init__.py")
    return {m for m in found if m in modules and m != name}


def _imports_of_tree(tree, name, is_package):
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycles(graph):
    """``(one cycle, all its modules)`` for each strongly connected part of `graph` that has
    a cycle (Tarjan's algorithm)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.add(top)
                if top == node:
                    break
            if len(part) > 1:
                cycles.append((_path_back(graph, part, min(part)), sorted(part)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _path_back(graph, part, start):
    """The shortest path from `start` back to itself inside `part` (breadth first)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & part):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start} in {sorted(part)}")


def test_no_import_cycle_in_keras_attn():
    graph = _graph()
    assert graph["keras_attn.dispatch"] >= {"keras_attn.kernels", "keras_attn.block_sparse"}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{' -> '.join(cycle)} (modules on cycles there: {', '.join(part)})"
        for cycle, part in cycles
    )


def test_the_cycle_finder_sees_imports_inside_functions(tmp_path):
    # A package whose module imports another lazily, inside a method, which imports it
    # back at the top; and a module that imports its own package's face.
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("class A:\n    def f(self):\n        from pkg.b import B\n")
    (package / "b.py").write_text("from pkg import a\n")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.c import C\n")
    (package / "sub" / "c.py").write_text("from pkg.sub import d\nC = 1\n")
    (package / "sub" / "d.py").write_text("")
    paths = sorted(package.rglob("*.py"))
    names = {
        p: ".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__")
        for p in paths
    }
    graph = {
        name: _imports_of_tree(ast.parse(p.read_text()), name, p.name == "__init__.py")
        & set(names.values()) - {name}
        for p, name in names.items()
    }
    cycles = sorted(cycle for cycle, _ in _cycles(graph))
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.sub", "pkg.sub.c", "pkg.sub"]], cycles


def _run(code):
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize(
    "module", ["keras_attn", "keras_attn.pytest_plugin", "keras_attn.hookspecs"]
)
def test_importing_keras_attn_imports_no_backend(module):
    out = _run(
        f"""
        import sys
        import {module}
        heavy = sorted(m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules)
        print("heavy:", heavy)
        """
    )
    assert "heavy: []" in out


def test_the_registry_is_built_on_first_lookup_not_at_import():
    out = _run(
        """
        import keras_attn
        from keras_attn import plugins
        print("before:", plugins._registry is None)
        plugins.names("score")
        print("after:", plugins._registry is not None)
        """
    )
    assert "before: True" in out and "after: True" in out


@pytest.mark.parametrize(
    "order", ["keras_attn, keras", "keras, keras_attn", "keras_attn.patterns, keras"]
)
def test_a_keras_file_loads_whichever_is_imported_first(tmp_path, order):
    x_in = keras.Input((5, 8))
    model = keras.Model(x_in, keras_attn.LocalAttention(window=2, num_heads=2)(x_in))
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    _run(
        f"""
        import {order}
        import numpy as np
        model = keras.saving.load_model({str(tmp_path / "m.keras")!r})
        np.save({str(tmp_path / "y.npy")!r}, keras.ops.convert_to_numpy(
            model(np.load({str(tmp_path / "x.npy")!r}))))
        """
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model.predict(x, verbose=0), atol=1e-6)
