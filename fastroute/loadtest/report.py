"""The replay report: report.json, report.png and the terminal summary.

``build_report`` turns an :class:`~fastroute.loadtest.accounting.Accountant`
into a plain JSON-ready dict (field list in ``docs/TRACES.md``, "Report");
``write_report`` saves it with its plots; ``summary_text`` is what
``fastroute replay`` prints; ``exit_status`` is its process exit code.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import ErrorCode

__all__ = ["REPORT_FORMAT", "build_report", "write_report", "summary_text", "exit_status"]

#: Value of the report's ``format`` field; bumped if a field changes meaning.
REPORT_FORMAT = "fastroute-report v1"

_PCTS = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))


def _hist_ms(hist) -> dict[str, Any]:
    n = hist.get_total_count()
    out: dict[str, Any] = {"count": int(n)}
    for name, p in _PCTS:
        out[name] = hist.get_value_at_percentile(p) / 1000.0 if n else None
    out["max"] = hist.get_max_value() / 1000.0 if n else None
    out["mean"] = round(hist.get_mean_value() / 1000.0, 3) if n else None
    return out


def _finite(x: float | None) -> float | None:
    # json.dumps would write NaN/Infinity, which strict JSON readers reject
    return x if x is None or math.isfinite(x) else None


def build_report(accountant, meta: dict | None = None) -> dict[str, Any]:
    """Summarise a finished run as a JSON-ready dict.

    Top-level integers: ``scheduled``, ``sent``, ``acked``, ``delivered``
    (distinct message/device deliveries), ``lost``, ``duplicates`` and the
    diagnostic counts of ``Accountant.counts()``; ``refused`` maps the error
    code (as a string, JSON keys are strings) to a count; ``latency_ms``,
    ``ack_latency_ms`` and ``send_lag_ms`` hold ``count, p50, p90, p99,
    p99_9, max, mean`` (None without samples), latencies measured from the
    scheduled send time; ``throughput`` and ``latency_over_time`` are
    per-interval series; ``scheduled_rate``/``achieved_rate`` (messages/s,
    None if unpaced or too short), ``max_lag_ms`` and ``generator_bound``
    come from the driver's loop statistics; ``ok`` is True when nothing was
    lost, duplicated, corrupted or misdelivered.  ``meta`` is copied (speed,
    trace, duration_s, processes default to None).
    """
    counts = accountant.counts()
    series = accountant.series()
    st = accountant.loop_stats
    m = {"speed": None, "trace": None, "duration_s": None, "processes": None}
    m.update(meta or {})
    rep: dict[str, Any] = {"format": REPORT_FORMAT}
    rep.update(counts)
    rep["refused"] = {str(c): n for c, n in sorted(accountant.refused_by_code.items())}
    rep["latency_ms"] = _hist_ms(accountant.latency)
    rep["ack_latency_ms"] = _hist_ms(accountant.ack_latency)
    rep["send_lag_ms"] = _hist_ms(accountant.send_lag)
    rep["throughput"] = {
        "interval_s": accountant.interval_s,
        "sent": series["sent"],
        "acked": series["acked"],
        "delivered": series["delivered"],
    }
    rep["latency_over_time"] = {
        "interval_s": accountant.interval_s,
        "mean_ms": [None if v is None else round(v * 1000, 3) for v in series["latency_mean_s"]],
        "max_ms": [None if v is None else round(v * 1000, 3) for v in series["latency_max_s"]],
    }
    rep["scheduled_rate"] = _finite(st.scheduled_rate) if st else None
    rep["achieved_rate"] = _finite(st.achieved_rate) if st else None
    rep["max_lag_ms"] = round(st.max_lag_s * 1000, 3) if st else None
    rep["generator_bound"] = bool(st.generator_bound) if st else False
    rep["ok"] = not (counts["lost"] or counts["duplicates"] or counts["corrupt"]
                     or counts["unexpected"])
    rep["meta"] = m
    return rep


def exit_status(report: dict) -> int:
    """Process exit code for a report: 0 if ``ok`` (nothing lost or duplicated), else 1."""
    return 0 if report.get("ok") and not report.get("lost") else 1


def _code_name(code: str) -> str:
    try:
        return ErrorCode(int(code)).name
    except ValueError:
        return "?"


def _fmt(v: float | None, unit: str = "ms") -> str:
    return "-" if v is None else f"{v:.3f} {unit}" if v < 10 else f"{v:.1f} {unit}"


def summary_text(report: dict) -> str:
    """A short human-readable summary of ``report`` for the terminal."""
    r = report
    meta = r.get("meta", {})
    lines = [
        f"trace {meta.get('trace') or '-'}  speed "
        f"{'max' if meta.get('speed') in (None, 'max') else str(meta.get('speed')) + 'x'}  "
        f"duration {_fmt(meta.get('duration_s'), 's')}",
        f"messages  scheduled {r['scheduled']}  sent {r['sent']}  acked {r['acked']}  "
        f"refused {r['refused_total']}  unacked {r['unacked']}",
        f"delivery  {r['delivered']}/{r['expected_deliveries']} expected  lost {r['lost']}  "
        f"duplicates {r['duplicates']}  corrupt {r['corrupt']}  unexpected {r['unexpected']}  "
        f"ephemeral dropped {r['ephemeral_dropped']}",
    ]
    if r["refused"]:
        lines.append("refused   " + "  ".join(
            f"{c} {_code_name(c)}: {n}" for c, n in r["refused"].items()))
    for key, label in (("latency_ms", "latency "), ("ack_latency_ms", "ack lat ")):
        h = r[key]
        lines.append(f"{label}  p50 {_fmt(h['p50'])}  p90 {_fmt(h['p90'])}  "
                     f"p99 {_fmt(h['p99'])}  p99.9 {_fmt(h['p99_9'])}  max {_fmt(h['max'])}")
    sr, ar = r.get("scheduled_rate"), r.get("achieved_rate")
    lines.append(f"rate      scheduled {'-' if sr is None else f'{sr:.1f}'} msg/s  achieved "
                 f"{'-' if ar is None else f'{ar:.1f}'} msg/s  max lag {_fmt(r.get('max_lag_ms'))}")
    if r.get("generator_bound"):
        lines.append("WARNING   the load generator fell behind its schedule: the offered "
                     "load was lower than the trace's")
    if r.get("padded"):
        lines.append(f"note      {r['padded']} bodies padded to the 24-byte minimum")
    lines.append("RESULT    OK: every accepted message delivered exactly once" if r.get("ok")
                 else "RESULT    FAILED: messages lost, duplicated or misdelivered")
    return "\n".join(lines)


def write_report(directory: str | os.PathLike, report: dict, accountant) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.png`` into ``directory`` (created if needed).

    The PNG has three panels: delivery latency over time (mean and max per
    interval), the latency percentile distribution (x axis ``1/(1-p)`` on a
    log scale, delivery and ack latency) and throughput over time.  Uses
    matplotlib's Agg canvas directly, without pyplot, so it neither needs a
    display nor changes the caller's backend.  Returns both paths.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "report.json"
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, jpath)
    ppath = out / "report.png"
    _plot(ppath, report, accountant)
    return jpath, ppath


def _plot(path: Path, report: dict, accountant) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    # plain numbers on log axes: "5" reads better than "5 x 10^0" for ms
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")

    fig = Figure(figsize=(9, 11), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(3, 1)
    title = report.get("meta", {}).get("trace") or "replay"
    fig.suptitle(f"fastroute replay: {title}")

    lot = report["latency_over_time"]
    dt = lot["interval_s"]
    xs = [i * dt for i in range(len(lot["mean_ms"]))]
    pts = [(x, a, b) for x, a, b in zip(xs, lot["mean_ms"], lot["max_ms"]) if a is not None]
    if pts:
        ax1.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], label="mean")
        ax1.plot([p[0] for p in pts], [max(p[2], 1e-3) for p in pts], label="max", alpha=0.7)
        ax1.set_yscale("log")
        ax1.legend(loc="upper right")
    ax1.set_title("delivery latency over time (from scheduled send)")
    ax1.set_xlabel("time since start (s)")
    ax1.set_ylabel("ms")

    ticks = []
    for hist, label in ((accountant.latency, "delivery"), (accountant.ack_latency, "ack")):
        curve = list(accountant.percentile_curve(hist))
        if not curve:
            continue
        xs2 = [1.0 / (1.0 - p / 100.0) for p, _ in curve]
        ax2.plot(xs2, [max(v / 1000.0, 1e-3) for _, v in curve], label=label)
        ticks = max(ticks, xs2, key=len)
    if ticks:
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        marks = [(1 / (1 - q), lab) for q, lab in ((0.0, "0%"), (0.9, "90%"), (0.99, "99%"),
                                                   (0.999, "99.9%"), (0.9999, "99.99%"),
                                                   (0.99999, "99.999%"), (0.999999, "99.9999%"))
                 if 1 / (1 - q) <= ticks[-1] * 1.0001]
        ax2.set_xticks([m[0] for m in marks], [m[1] for m in marks])
        ax2.legend(loc="upper left")
    ax2.set_title("latency by percentile")
    ax2.set_xlabel("percentile (scale 1/(1-p))")
    ax2.set_ylabel("ms")

    tp = report["throughput"]
    xs3 = [i * tp["interval_s"] for i in range(len(tp["sent"]))]
    for key in ("sent", "acked", "delivered"):
        if tp[key]:
            ax3.plot(xs3, [v / tp["interval_s"] for v in tp[key]], label=key)
    if xs3:
        ax3.legend(loc="upper right")
    ax3.set_title("throughput")
    ax3.set_xlabel("time since start (s)")
    ax3.set_ylabel("messages / s")

    for ax in (ax1, ax2):
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
