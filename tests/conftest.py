"""Shared pytest configuration for the test suite.

Under CI (the environment variable ``CI`` set to a true value, as CI runners
do and ``.ci/run`` does) a test that would be skipped FAILS instead, with the
skip reason: a required check that did not run is not a pass.  Expected
failures (xfail) are left alone.  Locally, skips stay skips.
"""

from __future__ import annotations

import gc
import os

import pytest

_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _skip_reason(longrepr: object) -> str:
    # a skip's longrepr is (path, lineno, "Skipped: <reason>")
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _failure_message(reason: str) -> str:
    return f"skipped, and a skip is a failure under CI={os.environ.get('CI')}: {reason}"


def pytest_report_header(config: pytest.Config) -> str | None:
    return "CI is set: skipped tests fail" if _CI else None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Objects the tests left for the GC go now, before the summary.  An
    # asyncio future whose exception nobody read reports it when collected,
    # and Python 3.11 formats that report with ast.parse.  Collected in the
    # middle of another ast.parse (pytest rewriting a module the summary
    # imports), it broke that one: SystemError "AST constructor recursion
    # depth mismatch", the run's exit status 1 with every test passed.
    gc.collect()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if not (_CI and report.skipped) or hasattr(report, "wasxfail"):
        return report
    message = _failure_message(_skip_reason(report.longrepr))
    failed = pytest.CallInfo.from_call(lambda: pytest.fail(message, pytrace=False), call.when)
    report = pytest.TestReport.from_item_and_call(item, failed)
    report.skipped_under_ci = True
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    # a skip found while setting up (skipif, a fixture calling pytest.skip)
    # would otherwise be counted as an error, not as the failed test it is
    if getattr(report, "skipped_under_ci", False):
        return "failed", "F", "FAILED"
    return None


class _SkippedModule(pytest.Item):
    """Stands for a module skipped while collecting (importorskip): it fails."""

    def __init__(self, *, reason: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reason = reason

    def runtest(self) -> None:
        pytest.fail(_failure_message(self.reason), pytrace=False)

    def reportinfo(self):
        return self.path, None, self.name


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector: pytest.Collector):
    # Failing the collection itself would stop the whole run; one failing
    # test in the skipped module's place lets the rest of the suite run.
    report = yield
    if not (_CI and report.skipped):
        return report
    item = _SkippedModule.from_parent(collector, name="skipped-at-collection",
                                      reason=_skip_reason(report.longrepr))
    return pytest.CollectReport(report.nodeid, "passed", None, [item])


# -- twins: one fixture runs a test on both implementations ---------------------------

class Impl:
    """One implementation of fastroute's twins: ``"py"`` (the specifications) or ``"c"``.

    ``impl.of(spec)`` is what this run uses for ``spec`` (a ``py_`` function,
    a ``Py`` class, or a named specification such as ``DedupWindow``): the
    spec itself, or its compiled twin from ``fastroute._core``.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def of(self, spec):
        from fastroute import _compiled

        return spec if self.name == "py" else _compiled.compiled_twin(spec)

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> Impl:
    """Runs the requesting test once per implementation (yarl/multidict style)."""
    from fastroute import _compiled

    if request.param == "c" and not _compiled.COMPILED:
        pytest.skip("the compiled core is not built (FASTROUTE_NO_EXTENSIONS=1)")
    return Impl(request.param)
