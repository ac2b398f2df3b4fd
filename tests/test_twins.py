"""Every compiled twin has a Python specification, where its ``.pxi`` header says.

The one extension module ``fastroute._core`` is built from ``_core.pyx`` and
its ``.pxi`` parts, one per stage.  Each part's header names the module that
holds its specification and pairs every Python-visible name with its spec::

    # Compiled twins of fastroute/relay/gate.py (the specification):
    #   accept_sends  = py_accept_sends

This test reads those headers, so a twin added without a spec, a spec
renamed or moved, or a header pointing at the wrong file fails here.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import fastroute
from fastroute import _compiled

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "ext" / "fastroute"
PARTS = sorted([*EXT.glob("*.pxi"), EXT / "_core.pyx"])

_HEADER = re.compile(r"^# Compiled twins of (\S+) \(the specification\):\s*$")
_PAIR = re.compile(r"^#   (\w+) += (\w+)\s*$")
_SPEC_ONLY = re.compile(r"Specification: .*?(fastroute/\S+?\.py)")
# Python-visible names of a part: def, cpdef, cdef class and class at the top level
_VISIBLE = re.compile(r"^(?:def|cpdef(?: \w+)?|cdef class|class) (\w+)", re.M)


def _header(path: Path) -> tuple[str | None, dict[str, str]]:
    """The spec file a part names, and its ``compiled -> spec`` pairs."""
    spec_file, pairs = None, {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines[:40]):
        m = _HEADER.match(line)
        if m:
            spec_file = m.group(1)
            for nxt in lines[i + 1:]:
                pm = _PAIR.match(nxt)
                if not pm:
                    break
                pairs[pm.group(1)] = pm.group(2)
            break
    if spec_file is None:
        m = _SPEC_ONLY.search(" ".join(ln.lstrip("# ") for ln in lines[:12]))
        spec_file = m.group(1) if m else None
    return spec_file, pairs


def _module(spec_file: str):
    assert spec_file.startswith("fastroute/") and spec_file.endswith(".py"), spec_file
    return importlib.import_module(spec_file[:-3].replace("/", "."))


def test_there_is_one_extension_module_and_it_includes_every_part():
    core = (EXT / "_core.pyx").read_text()
    included = set(re.findall(r'^include "(\w+\.pxi)"', core, re.M))
    assert included == {p.name for p in EXT.glob("*.pxi")}
    assert list(EXT.glob("*.pyx")) == [EXT / "_core.pyx"]


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.name)
def test_each_part_names_an_existing_specification(part):
    spec_file, pairs = _header(part)
    assert spec_file, f"{part.name}: no specification named in its header"
    assert (ROOT / spec_file).is_file(), f"{part.name} names {spec_file}, which does not exist"
    visible = set(_VISIBLE.findall(part.read_text())) - {"__init__"}
    # _core.pyx's private helper classes (_Device, _Address, _Group) are not API
    visible = {n for n in visible if not n.startswith("_")}
    assert visible == set(pairs), (
        f"{part.name}: Python-visible names {sorted(visible)} but header pairs "
        f"{sorted(pairs)}: every twin needs a header line naming its spec")
    module = _module(spec_file)
    for compiled_name, spec_name in pairs.items():
        spec = getattr(module, spec_name, None)
        assert spec is not None, f"{part.name}: {spec_file} has no {spec_name}"
        if fastroute.COMPILED:
            assert _compiled.compiled_twin(spec) is getattr(_compiled.core, compiled_name), (
                f"{spec_file}:{spec_name} is not bound to its twin _core.{compiled_name}")


def test_only_one_module_reads_the_switch_or_imports_the_core():
    offenders = []
    for path in (ROOT / "fastroute").rglob("*.py"):
        if path.name == "_compiled.py":
            continue
        text = path.read_text()
        if re.search(r"environ.*FASTROUTE_NO_EXTENSIONS|import _core|from \._core|"
                     r"fastroute\._core import|from fastroute import _core", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_compiled_core_is_the_one_loaded_unless_switched_off():
    # under CI the core is built: this must not silently run the slow model
    assert fastroute.COMPILED is (not _compiled.NO_EXTENSIONS)
    if fastroute.COMPILED:
        assert fastroute.Router.__module__ == "fastroute._core"


def _stub_classes() -> dict[str, set[str]]:
    """The classes ``fastroute/_core.pyi`` declares, and their declared members."""
    import ast

    tree = ast.parse((ROOT / "fastroute" / "_core.pyi").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)} | {
                n.target.id for n in node.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return out


def test_the_stub_declares_the_engine_and_dedup_window_as_they_are():
    # README sends readers to the stub for the engine's API: a method added,
    # renamed or dropped on either implementation without the stub fails here
    from fastroute import _model, dedup

    classes = _stub_classes()
    assert set(classes) == {"Router", "DedupTable"}
    impls = {"Router": [_model.Router], "DedupTable": [dedup.DedupWindow]}
    if fastroute.COMPILED:
        for name in classes:
            impls[name].append(getattr(_compiled.core, name))
    for name, declared in classes.items():
        for impl in impls[name]:
            public = {n for n in dir(impl) if not n.startswith("_")}
            public.discard("entries")  # the specification's own storage, not API
            assert declared - {"__init__", "__len__"} == public, (name, impl)
