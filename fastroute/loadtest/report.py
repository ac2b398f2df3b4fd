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

__all__ = ["REPORT_FORMAT", "build_report", "write_report", "summary_text", "exit_status",
           "pick_interval", "stalls"]

#: Value of the report's ``format`` field; bumped if a field changes meaning.
REPORT_FORMAT = "fastroute-report v1"

_PCTS = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))


#: bucket widths the time series may use, seconds
_STEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
          600.0, 1800.0, 3600.0)


def pick_interval(span_s: float, target: int = 200) -> float:
    """A round bucket width giving at most ``target`` buckets over ``span_s`` seconds.

    Short runs get fine buckets (a 7 s run: 50 ms, 140 points), long ones
    coarse (a day: 10 min); never below 10 ms.
    """
    for step in _STEPS:
        if span_s / step <= target:
            return step
    return _STEPS[-1]


def stalls(report: dict) -> list[tuple[float, float]]:
    """Spans ``(start_s, end_s)`` in which nothing was delivered while the run went on.

    A bucket is stalled when it delivered nothing although messages had
    been sent and were not all delivered yet (the delivered count still
    grows after it).  Consecutive stalled buckets make one span.
    """
    tp = report["throughput"]
    dt = tp["interval_s"]
    sent, deliv = tp["sent"], tp["delivered"]
    n = len(deliv)
    total = sum(deliv)
    out: list[tuple[float, float]] = []
    sent_so_far = deliv_so_far = 0
    for i in range(n):
        sent_so_far += sent[i] if i < len(sent) else 0
        if deliv[i] == 0 and sent_so_far > deliv_so_far and deliv_so_far < total:
            if out and abs(out[-1][1] - i * dt) < 1e-9:
                out[-1] = (out[-1][0], (i + 1) * dt)
            else:
                out.append((i * dt, (i + 1) * dt))
        deliv_so_far += deliv[i]
    return out


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
        # seconds from the start to the last event (None if the driver did not say):
        # the last bucket covers only part of its interval
        "span_s": _finite(getattr(accountant, "span_s", None)),
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


def _summary_box(report: dict) -> str:
    r = report
    meta = r.get("meta", {})
    lat = r["latency_ms"]
    speed = meta.get("speed")
    speed_s = ("max" if speed in (None, "max")
               else f"{int(speed):,}x" if float(speed).is_integer() else f"{speed:g}x")
    rate = r.get("achieved_rate")
    dur = meta.get("duration_s")
    return "\n".join([
        f"delivery latency   p50 {_fmt(lat['p50'])}   p99 {_fmt(lat['p99'])}   "
        f"p99.9 {_fmt(lat['p99_9'])}   max {_fmt(lat['max'])}",
        f"messages   sent {r['sent']}   acked {r['acked']}   delivered {r['delivered']}/"
        f"{r['expected_deliveries']}   lost {r['lost']}   duplicates {r['duplicates']}   "
        f"refused {r['refused_total']}",
        f"speed {speed_s}   processes {meta.get('processes') or '-'}   duration "
        f"{_fmt(dur, 's')}   achieved {'-' if rate is None else f'{rate:,.0f}'} msg/s   "
        f"stalls {len(stalls(r))}",
        "RESULT OK: every accepted message delivered exactly once" if r.get("ok")
        else "RESULT FAILED: messages lost, duplicated or misdelivered",
    ])


def _plot(path: Path, report: dict, accountant) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    # plain numbers on log axes: "5" reads better than "5 x 10^0" for ms
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    # minor ticks: label 2 and 5 of each decade only, or they run into each other
    sparse = FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")
    nan = float("nan")

    fig = Figure(figsize=(9, 12), dpi=100)
    FigureCanvasAgg(fig)
    box, ax1, ax2, ax3 = fig.subplots(4, 1, gridspec_kw={"height_ratios": [0.32, 1, 1, 1]})
    title = report.get("meta", {}).get("trace") or "replay"
    fig.suptitle(f"fastroute replay: {title}")
    box.axis("off")
    box.text(0.0, 0.5, _summary_box(report), family="monospace", fontsize=8.5, va="center",
             ha="left", transform=box.transAxes,
             bbox={"boxstyle": "round", "facecolor": "#eef5ee" if report.get("ok")
                   else "#f8e0e0", "edgecolor": "#888888"})

    spans = stalls(report)
    lot = report["latency_over_time"]
    dt = lot["interval_s"]
    # a bucket without deliveries is a gap in the line (NaN), never joined across
    xs = [(i + 0.5) * dt for i in range(len(lot["mean_ms"]))]
    means = [nan if v is None else max(v, 1e-3) for v in lot["mean_ms"]]
    maxes = [nan if v is None else max(v, 1e-3) for v in lot["max_ms"]]
    if any(v == v for v in means):
        marker = "o" if len(xs) <= 30 else None
        ax1.plot(xs, means, label="mean", marker=marker, markersize=3)
        ax1.plot(xs, maxes, label="max", alpha=0.7, marker=marker, markersize=3)
        ax1.set_yscale("log")
    ax1.set_title(f"delivery latency over time (from scheduled send; {dt:g} s buckets)")
    ax1.set_xlabel("time since start (s)")
    ax1.set_ylabel("ms")

    ticks: list[float] = []
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
    dt3 = tp["interval_s"]
    n3 = len(tp["sent"])
    duration = report.get("meta", {}).get("duration_s")
    xs3 = [(i + 0.5) * dt3 for i in range(n3)]
    widths = [dt3] * n3
    if n3:
        # the last bucket is only partly covered by the run: its rate uses the part covered
        covered = max((tp.get("span_s") or duration or n3 * dt3) - (n3 - 1) * dt3, dt3 * 0.05)
        widths[-1] = min(dt3, covered)
    marker3 = "o" if n3 <= 30 else None
    for key in ("sent", "acked", "delivered"):
        if tp[key]:
            ax3.plot(xs3, [v / w for v, w in zip(tp[key], widths)], label=key,
                     marker=marker3, markersize=3)
    ax3.set_ylim(bottom=0)
    if n3 and not any(any(tp[k]) for k in ("sent", "acked", "delivered")):
        ax3.set_ylim(0, 1)
    ax3.set_title(f"throughput ({dt3:g} s buckets)")
    ax3.set_xlabel("time since start (s)")
    ax3.set_ylabel("messages / s")

    for ax in (ax1, ax3):
        for i, (a, b) in enumerate(spans):
            ax.axvspan(a, b, color="red", alpha=0.15, lw=0,
                       label="stall (nothing delivered)" if i == 0 else None)
        if n3:
            ax.set_xlim(0, n3 * dt3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right")

    for ax in (ax1, ax2):
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
