"""Dependencies point one way, with no exemption.

    downpour (app/)          the application: may import everything
    downpour.ps, .worker     import downpour.common only, never each other
    downpour.common          imports nothing else of the project, in three layers:
      .nn    the core        imports only downpour.common.errors; neither zmq nor msgpack
      .wire  the wire        imports only downpour.common.errors, itself and the core's
                             layout types (downpour.common.nn.layout)
      *      the run level   may import the core, never the wire; neither zmq nor msgpack
    worker/single.py, worker/hogwild.py   never the wire, neither zmq nor msgpack: the
                             single-process and Hogwild! trainers run without a network

An import counts however it is written: `import`, `from ... import` (relative ones
resolved), `importlib.import_module` / `__import__` with a constant name, and a module
named in a string ("downpour.ps.server" or a "pkg.module:function" table entry). A
dynamic import whose name the test cannot read is itself a violation in the library.
Third-party imports are checked too (NETWORK below), so the core and the run level stay
usable where the wire's libraries are not.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"app": "downpour", "common": "downpour.common", "ps": "downpour.ps",
           "worker": "downpour.worker"}
LIBRARY = ("downpour.common", "downpour.ps", "downpour.worker")
SUBLAYERS = ("downpour.common.nn", "downpour.common.wire", "downpour.common.errors")
COMMON = {"downpour.common", *SUBLAYERS}
ALLOWED = {  # layer -> the project layers (or modules) it may import (itself always allowed)
    "downpour.common.nn": {"downpour.common.errors"},
    "downpour.common.wire": {"downpour.common.errors", "downpour.common.nn.layout"},
    "downpour.common": {"downpour.common.errors", "downpour.common.nn"},
    "downpour.common.errors": set(),
    "downpour.ps": COMMON,
    "downpour.worker": COMMON,
}
NETWORK = {"zmq", "msgpack"}          # the wire's libraries
OFFLINE = {  # module or layer -> what it may not import beyond ALLOWED: the trainers without a network
    "downpour.common.nn": NETWORK,
    "downpour.common": NETWORK,
    "downpour.worker.single": NETWORK | {"downpour.common.wire"},
    "downpour.worker.hogwild": NETWORK | {"downpour.common.wire"},
}
OLD_TOP_LEVEL = {"common", "ps", "worker"}  # the names before the namespace; never imported
MODULE_STRING = re.compile(r"^(?:downpour(?:\.\w+)+|(?:downpour|common|ps|worker)(?:\.\w+)*:\w+)$")
IMPORT_CALLS = {"import_module", "__import__"}


def layer(module: str) -> str | None:
    """The layer a dotted module name belongs to: a library package or one of common's
    layers, the application ("downpour"), or None for anything outside the project."""
    parts = module.split(".")
    if parts[0] in OLD_TOP_LEVEL:
        parts = ["downpour", *parts]
    if parts[0] != "downpour":
        return None
    for sub in SUBLAYERS:
        if module == sub or module.startswith(sub + "."):
            return sub
    return ".".join(parts[:2]) if ".".join(parts[:2]) in LIBRARY else "downpour"


def allowed(own: str, target: str) -> bool:
    """Whether layer `own` may import module `target` (of another layer)."""
    return any(target == a or target.startswith(a + ".") or layer(target) == a for a in ALLOWED[own])


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:-1]]
    return ".".join(parts + ([] if rel.stem == "__init__" else [rel.stem]))


def docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def imports(source: str, module: str, is_package: bool = False) -> tuple[set[str], list[str]]:
    """(every module `source` imports, problems the test cannot resolve), for the module
    named `module`."""
    tree = ast.parse(source)
    found, problems = set(), []
    package = module if is_package else module.rpartition(".")[0]
    skip = docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in IMPORT_CALLS:
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value)
                else:
                    problems.append(f"line {node.lineno}: {name}() of a name the test cannot read")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in skip and MODULE_STRING.match(node.value)):
            found.add(node.value.split(":")[0])
    return found, problems


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What in `source` (the text of `module`) breaks the layering."""
    own = layer(module)
    found, problems = imports(source, module, is_package)
    banned = set().union(*(v for k, v in OFFLINE.items() if k in (module, own)))
    for target in sorted(found):
        if target.split(".")[0] in OLD_TOP_LEVEL:
            problems.append(f"imports {target!r}: use the namespace, downpour.{target}")
        theirs = layer(target)
        if own in ALLOWED and theirs is not None and theirs != own and not allowed(own, target):
            problems.append(f"imports {target!r}: {own} may import only "
                            f"{sorted(ALLOWED[own]) or 'nothing else of the project'}")
        if target.split(".")[0] in banned or theirs in banned:
            problems.append(f"imports {target!r}: {module} runs without the wire "
                            f"(no {', '.join(sorted(banned))})")
    return problems


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


@pytest.mark.parametrize("folder", ["common", "ps", "worker", "app", "tests"])
def test_dependency_direction(folder):
    bad = {}
    for path in sources(folder):
        module = module_name(path) if folder != "tests" else f"tests.{path.stem}"
        problems = violations(path.read_text(), module, path.stem == "__init__")
        if problems:
            bad[str(path.relative_to(ROOT))] = problems
    assert not bad, bad


@pytest.mark.parametrize("module, source, expected", [
    ("downpour.common.nn.model", "from downpour.ps import server", "downpour.ps.server"),
    ("downpour.common.nn.model", "from downpour.cli import main", "downpour.cli"),
    ("downpour.common.nn.model", "from ...ps.piece import PieceState", "downpour.ps.piece"),
    ("downpour.common.nn.model", "import zmq", "runs without the wire"),
    ("downpour.common.nn.model", "from downpour.common.config import Config", "downpour.common.config"),
    ("downpour.common.nn.model", "from downpour.common.wire import protocol", "downpour.common.wire"),
    ("downpour.common.training", "from downpour.common.wire import protocol", "downpour.common.wire"),
    ("downpour.common.config", "import msgpack", "runs without the wire"),
    ("downpour.common.wire.client", "from downpour.common.config import Config", "downpour.common.config"),
    ("downpour.common.wire.client", "from downpour.common.nn.model import Model", "downpour.common.nn.model"),
    ("downpour.worker.single", "from downpour.common.wire.client import ShardClient", "without the wire"),
    ("downpour.worker.hogwild", "import zmq.asyncio", "without the wire"),
    ("downpour.ps.server", "import downpour.worker.replica", "downpour.worker.replica"),
    ("downpour.worker.single", "from downpour.launch import launch", "downpour.launch"),
    ("downpour.worker.single", "ROLES = {'x': 'downpour.ps.scheduler:main'}", "downpour.ps.scheduler"),
    ("downpour.common.cfg", "importlib.import_module('downpour.worker.single')", "downpour.worker"),
    ("downpour.common.cfg", "import_module(f'downpour.worker.{mode}')", "cannot read"),
    ("downpour.ps.piece", "from common.nn.layout import Layout", "use the namespace"),
])
def test_the_check_catches_every_kind_of_upward_import(module, source, expected):
    assert any(expected in p for p in violations(source, module)), violations(source, module)


@pytest.mark.parametrize("module, source", [
    ("downpour.ps.server", "from downpour.common.wire import protocol\nfrom . import piece"),
    ("downpour.worker.replica", '"""Runs downpour.ps.server beside it."""\nimport numpy'),
    ("downpour.worker.replica", "import zmq\nfrom downpour.common.wire.client import ShardClient"),
    ("downpour.cli", "from downpour.ps.scheduler import main\nfrom downpour.worker import single"),
    ("downpour.common.wire.client", "from downpour.common.nn.layout import Piece\nimport zmq"),
    ("downpour.common.training", "from downpour.common.nn.model import Model\n"
     "from downpour.common.errors import ConfigError"),
    ("downpour.common.nn.model", "from downpour.common.errors import ConfigError\n"
     "from .layout import Layout"),
])
def test_the_check_allows_what_the_layering_allows(module, source):
    assert violations(source, module) == []


def test_no_pickle_anywhere():
    for path in sources("app", "common", "ps", "worker"):
        text = path.read_text()
        found, _ = imports(text, module_name(path))
        assert not {"pickle", "cPickle", "dill"} & {m.split(".")[0] for m in found}, path
        assert "send_pyobj" not in text and "recv_pyobj" not in text, path
