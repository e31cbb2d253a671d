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


def _import_time_imports(path, modules):
    """The keras_attn modules that `path` imports when it is imported (not inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                # `from package import module` needs only the module (a package is
                # always imported before its modules); `from module import name`
                # needs the module.
                for a in node.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)
            elif hasattr(node, "body") and isinstance(node.body, list):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_in_keras_attn():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _import_time_imports(p, modules) for p in paths}
    assert graph["keras_attn.dispatch"] >= {"keras_attn.kernels", "keras_attn.block_sparse"}
    state = {}

    def walk(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])


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
