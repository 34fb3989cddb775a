"""The code base stays lint- and type-clean, and each package exports exactly its API."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; install the test extra: pip install -e '.[test]'")
    return [found]


def test_ruff_clean() -> None:
    p = subprocess.run(
        [*_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy_clean() -> None:
    p = subprocess.run(
        _tool("mypy"), cwd=ROOT, capture_output=True, text=True, check=False, timeout=280
    )
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("module", ["radcache.embeddings.errors", "radcache.clients"])
def test_exported_members(module: str) -> None:
    """``__all__`` is exactly the public, non-module names (httpx's exported-members test)."""
    import importlib
    import types

    mod = importlib.import_module(module)
    public = {
        n
        for n, v in vars(mod).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"
    }
    assert set(mod.__all__) == public | {n for n in mod.__all__ if n.startswith("__")}


def test_lazy_package_exports_resolve_without_torch_until_used() -> None:
    """radcache.embeddings loads names on first use; each name in __all__ resolves."""
    code = (
        "import sys, radcache.embeddings as e, radcache.embeddings.errors, radcache.clients;"
        "assert 'torch' not in sys.modules, 'torch imported too early';"
        "[getattr(e, n) for n in e.__all__];"
        "assert set(e.__all__) <= set(dir(e))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
