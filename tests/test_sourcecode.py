"""Lint and documentation checks, run as tests (as uvloop's test_sourcecode does)."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import fastroute

ROOT = Path(__file__).resolve().parents[1]


# Each tool runs as a module of this interpreter: `.venv/bin/pytest` does not
# put .venv/bin on PATH, so looking the console script up there would miss it
# (and a skip would hide the check).  A tool that is not installed fails with
# "No module named ...": pip install '.[test]'.  The environment's scripts
# directory goes first on PATH for tools that start others (cython-lint runs
# `pycodestyle`).
def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PATH=path))


def _pyproject() -> dict:
    path = ROOT / "pyproject.toml"
    assert path.is_file(), f"{path} not found: the tests run from a source checkout"
    with path.open("rb") as f:
        return tomllib.load(f)


def test_ruff_is_clean():
    _pyproject()
    targets = [p for p in ("fastroute", "tests", "benches", "tools") if (ROOT / p).exists()]
    res = _run("ruff", "check", *targets)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cython_lint_is_clean():
    sources = sorted(str(p) for p in (ROOT / "ext").rglob("*.p[xy][dxi]"))
    assert sources, f"no Cython source under {ROOT / 'ext'}"
    # cython-lint has no __main__.py; its console script calls cython_lint.cython_lint:main
    res = _run("cython_lint.cython_lint", "--max-line-length", "100", *sources)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compiled_parts_write_no_wide_int_literal_without_a_suffix():
    # Cython makes an integer literal that does not fit a C int a Python
    # object: `v < 0x100000000` with `long long v` boxed v and compared
    # objects, once per message (sql_rows spent half its time there).  A
    # wide literal in C arithmetic carries its suffix (LL, ULL).
    literal = re.compile(r"(?<![\w.])(0[xX][0-9a-fA-F]+|\d+)(?![\w.])")
    wide = []
    for path in sorted((ROOT / "ext").rglob("*.p[xy][dxi]")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if '"' in code or "'" in code:
                code = re.sub(r"(\"[^\"]*\"|'[^']*')", "", code)
            for m in literal.finditer(code):
                if int(m.group(1), 0) > 0x7FFFFFFF:
                    wide.append(f"{path.name}:{n}: {line.strip()}")
    assert not wide, "wide literals without LL/ULL:\n" + "\n".join(wide)


def test_mypy_is_clean():
    # mypy reads [tool.mypy] from pyproject.toml and checks its `files`; a
    # configured path that is missing is a failure, not something to skip.
    files = _pyproject().get("tool", {}).get("mypy", {}).get("files")
    assert files, "pyproject.toml [tool.mypy] names no files"
    missing = [f for f in files if not (ROOT / f).exists()]
    assert not missing, f"[tool.mypy] files not found: {missing}"
    res = _run("mypy", "--config-file", "pyproject.toml")
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


def _relay_imports() -> dict[str, dict[str, set[str]]]:
    """module -> {relay module it imports from -> the names it takes}: every
    import, at the top, under TYPE_CHECKING or inside a function (each is a
    dependency a reader has to follow)."""
    import ast

    folder = ROOT / "fastroute" / "relay"
    mods = {p.stem for p in folder.glob("*.py")}
    out: dict[str, dict[str, set[str]]] = {}
    for path in sorted(folder.glob("*.py")):
        edges: dict[str, set[str]] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1 and node.module in mods:
                target = node.module
            elif node.level == 0 and (node.module or "").startswith("fastroute.relay."):
                target = node.module.split(".")[2]
            elif node.level == 1 and node.module is None:  # from . import x
                for alias in node.names:
                    if alias.name in mods:
                        edges.setdefault(alias.name, set())
                continue
            else:
                continue
            edges.setdefault(target, set()).update(a.name for a in node.names)
        edges.pop(path.stem, None)
        out[path.stem] = edges
    return out


def test_the_relay_stages_import_one_way():
    # the relay is a pipeline: link -> the feature stages (groups -> keys ->
    # safety) -> gate -> delivery, with batch, replies and senders below them;
    # what flows back up (device-list changes, carried pairs) is handed in by
    # the server, so no stage imports one above it, not even for a type
    graph = {m: set(e) for m, e in _relay_imports().items()}

    def reach(m: str) -> set[str]:
        seen: set[str] = set()
        todo = [m]
        while todo:
            for n in graph.get(todo.pop(), ()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    circles = sorted(m for m in graph if m in reach(m))
    assert not circles, f"relay modules in a circle of imports: {circles}"
    # the stages' order, which a layout without circles could still turn over
    for above, below in (("link", "groups"), ("groups", "keys"), ("keys", "safety"),
                         ("safety", "gate"), ("gate", "delivery"), ("server", "metrics")):
        assert above not in reach(below), f"{below} reaches {above}"


def test_no_relay_stage_imports_another_ones_private_names():
    taken = {(m, t, n) for m, edges in _relay_imports().items()
             for t, names in edges.items() for n in names if n.startswith("_")}
    assert not taken, taken
