"""Typing: the package ships py.typed, and ``mypy --strict`` passes on every
Python snippet of the README and on examples/ (checked against the package's
annotations; errors inside the package itself are not this test's subject)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory):
    """One mypy cache for both runs: the second reuses what the first
    checked of the standard library and the package (mypy revalidates
    every cached module against its source)."""
    return str(tmp_path_factory.mktemp("mypy-cache"))


def readme_snippets() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_the_package_ships_py_typed():
    assert os.path.exists(os.path.join(ROOT, "netplex_native", "py.typed"))


def test_mypy_strict_passes_on_the_readme_snippets_and_examples(tmp_path, mypy_cache):
    files = []
    for i, src in enumerate(readme_snippets()):
        p = tmp_path / f"readme_snippet_{i}.py"
        p.write_text(src)
        files.append(str(p))
    files += sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))
    assert len(files) >= 6
    env = dict(os.environ, MYPYPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                        "--cache-dir", mypy_cache, "--no-error-summary",
                        "--scripts-are-modules", *files],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stdout + p.stderr


PUBLIC_MODULES = ["__init__.py", "_context.py", "mutex.py", "semaphore.py", "domain.py",
                  "gunicorn.py", "uvicorn.py", "hooks.py", "cenv.py", "sharedvar.py"]


def test_mypy_strict_passes_on_the_public_modules(mypy_cache):
    """The modules whose names users call are themselves --strict clean (their
    annotations are what user code is checked against)."""
    files = [os.path.join("netplex_native", m) for m in PUBLIC_MODULES]
    p = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                        "--cache-dir", mypy_cache, "--no-error-summary", *files],
                       cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stdout + p.stderr
