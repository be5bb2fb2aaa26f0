"""Dependencies point one way: ps and worker import common, never each other; common
imports neither, except the command line (common/cli.py), which imports roles lazily."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"common": {"ps", "worker"}, "ps": {"worker"}, "worker": {"ps"}}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package):
    for path in sorted((ROOT / package).glob("*.py")):
        if path == ROOT / "common" / "cli.py":
            continue
        bad = imported_packages(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_pickle_anywhere():
    for package in FORBIDDEN:
        for path in (ROOT / package).glob("*.py"):
            text = path.read_text()
            assert "pickle" not in imported_packages(path), path
            assert "send_pyobj" not in text and "recv_pyobj" not in text, path
