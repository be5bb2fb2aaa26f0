"""Container tests are opt-in (tests/conftest.py): a plain `python -m pytest` starts no
container, `--docker` asks for them, and CI (.ci/run) runs the README's container form."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

PYTEST_TIMEOUT_S = 120        # collecting tests/test_containers.py takes about a second


def pytest_run(*args):
    """`python -m pytest ARGS` on tests/test_containers.py in the repository, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "pytest", "tests/test_containers.py", "-q",
                           "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=PYTEST_TIMEOUT_S)


def test_container_tests_are_skipped_without_docker_and_none_starts():
    pytest.importorskip("docker", reason="the Docker SDK: pip install -e '.[test]'")
    collected = pytest_run("--collect-only")
    n = int(re.search(r"(\d+) tests? collected", collected.stdout).group(1))
    assert n > 0, collected.stdout

    r = pytest_run()
    assert r.returncode == 0, r.stdout + r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"{n} skipped in [\d.]+s", summary), summary   # none passed, failed or erred
    assert r.stdout.count("opt in with --docker") >= 1


def test_docker_opts_in_without_skipping():
    """--setup-plan shows what would run and runs nothing: no fixture, so no engine is touched."""
    pytest.importorskip("docker", reason="the Docker SDK: pip install -e '.[test]'")
    r = pytest_run("--docker", "--setup-plan", "-k", "fresh_clone_runs_to_the_end")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"SETUP\s+S engine", r.stdout) and "skipped" not in r.stdout, r.stdout


def test_ci_runs_the_readme_container_command_and_the_readme_shows_both():
    readme = (ROOT / "README.md").read_text()
    plain = 'pip install -e ".[test]" && ruff check . && python -m pytest'
    assert f"\n{plain}\n" in readme and f"\n{plain} --docker\n" in readme
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-2:] == ["bash ../shared/tools/docker-engine.sh", f"{plain} --docker"]
