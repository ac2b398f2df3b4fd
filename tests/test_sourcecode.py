"""Lint and documentation checks, run as tests (as uvloop's test_sourcecode does)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import shutil
import subprocess
from pathlib import Path

import pytest

import fastroute

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install '.[test]')")
    return path


def test_ruff_is_clean():
    targets = [p for p in ("fastroute", "tests", "benches", "tools") if (ROOT / p).exists()]
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    res = subprocess.run([_tool("ruff"), "check", *targets], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cython_lint_is_clean():
    sources = sorted(str(p) for p in (ROOT / "ext").rglob("*.p[xy][dxi]"))
    if not sources:
        pytest.skip("not a source checkout")
    res = subprocess.run([_tool("cython-lint"), "--max-line-length", "100", *sources],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _public_modules():
    yield fastroute
    for info in pkgutil.walk_packages(fastroute.__path__, "fastroute."):
        if info.name.rsplit(".", 1)[-1].startswith("_") and info.name != "fastroute._core":
            continue
        yield importlib.import_module(info.name)


def test_every_public_name_has_a_docstring():
    missing = []
    for mod in _public_modules():
        if not (mod.__doc__ or "").strip():
            missing.append(mod.__name__)
        names = getattr(mod, "__all__", None)
        if names is None:
            continue
        for name in names:
            obj = getattr(mod, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)
                    or type(obj).__name__ == "cython_function_or_method"):
                continue
            if not (inspect.getdoc(obj) or "").strip():
                missing.append(f"{mod.__name__}.{name}")
            if inspect.isclass(obj) and obj.__module__.startswith("fastroute"):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") or not callable(member):
                        continue
                    if not (inspect.getdoc(member) or "").strip():
                        missing.append(f"{mod.__name__}.{name}.{attr}")
    assert not missing, missing
