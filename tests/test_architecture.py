"""The package's shape: no import cycle, a short path from a layer to the math, one face for the engines.

* The import graph of ``minibn/`` has no cycle.  Every import statement counts,
  function-local ones included: a local import hides a cycle from the
  interpreter, not from the design.
* With the reference engine, ``BatchNorm1d.forward`` reaches
  ``functional.batch_norm_forward`` in at most two calls (and ``backward``
  reaches ``functional.batch_norm_backward`` the same way): the path a student
  follows from a layer to the formula, recorded with ``sys.setprofile``.
* Outside ``minibn/engines/``, the package and the lessons import only the
  public face of ``minibn.engines``: no private name, no implementation module.
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Dict, Iterator, List, Set, Tuple

import numpy as np
import pytest

import minibn as mb
from minibn import engines, functional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "minibn")
ENGINES = os.path.join(PACKAGE, "engines")
LESSONS = os.path.join(REPO, "lessons")
MAX_CALLS = 2


# =========================================================================== the module graph

def python_files(folder: str) -> Iterator[str]:
    for directory, _, names in os.walk(folder):
        for name in sorted(names):
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def module_name(path: str) -> str:
    """``minibn/engines/__init__.py`` -> ``minibn.engines``; ``minibn/io.py`` -> ``minibn.io``."""
    dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted


def package_modules() -> Dict[str, str]:
    """``{module name: path}`` of every module of ``minibn/``."""
    return {module_name(path): path for path in python_files(PACKAGE)}


def is_package(path: str) -> bool:
    return os.path.basename(path) == "__init__.py"


def imported_names(tree: ast.AST, importer: str, importer_is_package: bool) -> Iterator[Tuple[str, List[str]]]:
    """``(absolute module, [names imported from it])`` for every import statement in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            yield absolute_module(node, importer, importer_is_package), [a.name for a in node.names]


def absolute_module(node: ast.ImportFrom, importer: str, importer_is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = importer.split(".") if importer_is_package else importer.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def innermost_module(dotted: str, modules) -> str:
    """The longest prefix of ``dotted`` that is a module of the package ('' when none is)."""
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted


def holds(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def packages_run_first(module: str, importer: str) -> List[str]:
    """The sub-packages whose ``__init__`` runs before ``module`` when ``importer`` imports it.

    ``minibn`` itself is left out (its ``__init__`` is the face that imports
    everything), and so are the packages that hold ``importer`` (their
    ``__init__`` is already running when ``importer`` runs).
    """
    parts = module.split(".")
    parents = [".".join(parts[:n]) for n in range(2, len(parts))]
    return [p for p in parents if p != importer and not holds(p, importer)]


def import_graph() -> Dict[str, Set[str]]:
    """``{module: modules of minibn it imports}``, function-local imports included.

    An import of the package that holds the importer (``from . import x``) is no
    edge to that package: its ``__init__`` is already running.
    """
    modules = package_modules()
    graph = {name: set() for name in modules}
    for importer, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for target, names in imported_names(tree, importer, is_package(path)):
            for dotted in [target] + [f"{target}.{name}" for name in names]:
                module = innermost_module(dotted, modules)
                if module and module != "minibn" and module != importer and not holds(module, importer):
                    graph[importer].add(module)
                    graph[importer].update(packages_run_first(module, importer))
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every cycle met by a depth-first search, each as ``[a, b, ..., a]``."""
    cycles, done = [], set()

    def visit(module, path):
        for target in sorted(graph[module]):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return cycles


def test_the_import_graph_of_the_package_has_no_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in minibn/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_a_function_local_import_is_an_edge_and_the_cycle_finder_sees_it():
    tree = ast.parse("import numpy\n\ndef f():\n    from .b import g\n")
    assert list(imported_names(tree, "minibn.a", False)) == [("numpy", []), ("minibn.b", ["g"])]
    graph = {"minibn.a": {"minibn.b"}, "minibn.b": {"minibn.c"}, "minibn.c": {"minibn.a"}}
    assert find_cycles(graph) == [["minibn.a", "minibn.b", "minibn.c", "minibn.a"]]
    assert find_cycles({"minibn.a": {"minibn.b"}, "minibn.b": set()}) == []


def test_importing_a_module_of_a_subpackage_runs_the_subpackage_first():
    assert packages_run_first("minibn.engines.tiling", "minibn.functional") == ["minibn.engines"]
    assert packages_run_first("minibn.engines.tiling", "minibn.engines.numpy_tiled") == []
    assert packages_run_first("minibn.checks", "minibn.engines.interface") == []


# =========================================================================== the student's path

def code_name(code) -> str:
    """``module.py:Class.method`` (the qualified name from Python 3.11, the bare name before)."""
    return f"{os.path.basename(code.co_filename)}:{getattr(code, 'co_qualname', code.co_name)}"


def calls_from(outer_code, inner_code, run) -> List[List[str]]:
    """Each chain of frames from a frame running ``outer_code`` down to one running ``inner_code``,
    as qualified names, recorded while ``run()`` runs."""
    chains = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is inner_code:
            chain, caller = [code_name(frame.f_code)], frame.f_back
            while caller is not None and caller.f_code is not outer_code:
                chain.append(code_name(caller.f_code))
                caller = caller.f_back
            if caller is not None:
                chains.append([code_name(caller.f_code)] + chain[::-1])

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return chains


def reference_layer(choose):
    layer = mb.BatchNorm1d(4)
    if choose == "layer":
        layer.engine = "reference"
    return layer


def under_reference(choose, run):
    if choose == "context":
        with engines.using_engine("reference"):
            run()
    else:
        run()


def assert_short_path(chains, inner):
    assert chains, f"{inner} was not reached from the layer"
    for chain in chains:
        assert len(chain) - 1 <= MAX_CALLS, f"{len(chain) - 1} calls: " + " -> ".join(chain)


@pytest.mark.parametrize("choose", ["context", "layer"])
def test_the_layer_reaches_the_forward_formula_in_at_most_two_calls(choose):
    layer = reference_layer(choose)
    x = np.random.default_rng(0).standard_normal((8, 4))
    chains = calls_from(type(layer).forward.__code__, functional.batch_norm_forward.__code__,
                        lambda: under_reference(choose, lambda: layer(x)))
    assert_short_path(chains, "functional.batch_norm_forward")


@pytest.mark.parametrize("choose", ["context", "layer"])
def test_the_layer_reaches_the_backward_formula_in_at_most_two_calls(choose):
    layer = reference_layer(choose)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((8, 4)), rng.standard_normal((8, 4))

    def forward_and_backward():
        layer(x)
        layer.backward(dy)

    chains = calls_from(type(layer).backward.__code__, functional.batch_norm_backward.__code__,
                        lambda: under_reference(choose, forward_and_backward))
    assert_short_path(chains, "functional.batch_norm_backward")


# =========================================================================== the engines' face

def outside_the_engines() -> Iterator[str]:
    for folder in (PACKAGE, LESSONS):
        for path in python_files(folder):
            if not path.startswith(ENGINES + os.sep):
                yield path


def engine_modules() -> Set[str]:
    return {module_name(path) for path in python_files(ENGINES)} - {"minibn.engines"}


def engine_aliases(tree: ast.AST, importer: str, importer_is_package: bool) -> Set[str]:
    """The local names bound to the module ``minibn.engines`` in ``tree``."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.name == "minibn.engines" and a.asname)
        elif isinstance(node, ast.ImportFrom):
            source = absolute_module(node, importer, importer_is_package)
            aliases.update(a.asname or a.name for a in node.names
                           if f"{source}.{a.name}" == "minibn.engines")
    return aliases


def uses_behind_the_face(source: str, importer: str, importer_is_package: bool = False) -> Iterator[str]:
    """What the module ``importer`` (its text: ``source``) takes from ``minibn.engines`` besides
    the public names of its face."""
    tree = ast.parse(source)
    implementations, face = engine_modules(), set(engines.__all__)
    for module, names in imported_names(tree, importer, importer_is_package):
        if innermost_module(module, implementations):
            yield f"imports {module}"
        elif module == "minibn.engines":
            yield from (f"imports minibn.engines.{name}" for name in names if name not in face)
    aliases = engine_aliases(tree, importer, importer_is_package)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr not in face:
            yield f"uses minibn.engines.{node.attr}"


def uses_in_file(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        source = f.read()
    importer = module_name(path) if path.startswith(PACKAGE) else "lessons"
    yield from uses_behind_the_face(source, importer, is_package(path))


def test_outside_the_engines_only_their_public_face_is_used():
    found = [f"{os.path.relpath(path, REPO)}: {use}" for path in outside_the_engines()
             for use in uses_in_file(path)]
    assert not found, "\n".join(found)


def test_the_face_check_sees_private_names_and_implementation_modules():
    source = ("from .engines import select_engine, _registry\n"
              "from .engines.selection import using_engine\n"
              "import minibn.engines.reference\n"
              "from . import engines as E\n"
              "E.get_engine('numpy')\n"
              "E._default_name\n")
    assert list(uses_behind_the_face(source, "minibn.batchnorm")) == [
        "imports minibn.engines._registry", "imports minibn.engines.selection",
        "imports minibn.engines.reference", "uses minibn.engines._default_name"]


def test_the_face_is_public_and_complete():
    assert all(not name.startswith("_") for name in engines.__all__)
    assert {"Engine", "get_engine", "select_engine", "using_engine", "engine_names",
            "default_engine_name"} <= set(engines.__all__)
