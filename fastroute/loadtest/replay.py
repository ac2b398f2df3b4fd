"""``fastroute replay``: replay a trace against a relay, open loop, and account for every message.

Shape of a run::

    parent: read trace -> credentials for every user -> N worker processes
            progress bar, then merge the workers' events into one Accountant
            -> report.json, report.png, summary; exit 1 if anything was lost
    worker: one fastroute.Client per user it owns (one device per user),
            sends its users' messages at their scheduled times (run_open_loop),
            receives for its users, records raw events

Every process sees the same monotonic clock (``time.perf_counter`` is
CLOCK_MONOTONIC on Linux), so a message sent by one worker and received by
another still gets a true latency, measured from its *scheduled* time.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from ..errors import ErrorCode, FastrouteError, InvalidArgument
from .accounting import HEADER_SIZE, ID_SIZE, Accountant
from .schedule import LoopStats, Schedule, run_open_loop
from .trace import TraceRecord, read_any

__all__ = ["ReplayConfig", "replay", "cli_replay", "raise_fd_limit"]

# per-worker progress slots in a shared array
_P_SENT, _P_ACKED, _P_REFUSED, _P_DELIV, _P_READY, _P_DONE = range(6)
_NSLOTS = 6


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (thousands of sockets); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


@dataclass
class ReplayConfig:
    """What a replay run needs; ``users`` maps a trace pseudonym to ``(private, credential)``."""

    host: str
    port: int
    records: list[TraceRecord]
    users: dict[str, tuple[bytes, bytes]]
    provider: str
    speed: float | None = None
    processes: int = 1
    server_key: bytes | None = None
    drain_timeout_s: float = 30.0
    max_batch: int = 1024
    connect_concurrency: int = 64
    progress: bool = True
    trace_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def address_of(user: str, provider: str) -> str:
    """The relay address a trace pseudonym is replayed as."""
    return f"{user}@{provider}"


# ----------------------------------------------------------------- worker side
async def _worker(cfg: ReplayConfig, owned: list[str], nonce: bytes, progress, slot: int,
                  go, stop, start_at) -> dict:
    from ..client import Client
    from ..noise import KeyPair

    base = slot * _NSLOTS
    records = cfg.records
    owned_set = set(owned)
    clients: dict[str, Client] = {}
    sem = asyncio.Semaphore(cfg.connect_concurrency)

    async def connect(user: str) -> None:
        priv, cred = cfg.users[user]
        async with sem:
            for attempt in range(50):
                try:
                    clients[user] = await Client.connect(
                        cfg.host, cfg.port, credential=cred, static=KeyPair.from_private(priv),
                        server_key=cfg.server_key, timeout=30.0)
                    return
                except FastrouteError as exc:
                    # a provider enrolled a moment ago: the relay polls its registry
                    if exc.code != ErrorCode.UNKNOWN_PROVIDER or attempt == 49:
                        raise
                    await asyncio.sleep(0.1)

    await asyncio.gather(*(connect(u) for u in owned))
    progress[base + _P_READY] = 1
    while not go.is_set():
        await asyncio.sleep(0.005)
    # wait for the common start time, so every worker's schedule lines up
    delay = start_at.value - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)

    # raw events, flat arrays (cheap to pickle back to the parent)
    s_idx, s_tsched, s_tsent = array("q"), array("d"), array("d")
    a_idx, a_t, a_code = array("q"), array("d"), array("q")
    d_idx, d_slot, d_t, d_tns = array("q"), array("l"), array("d"), array("q")
    corrupt = [0]
    acc = Accountant(len(records), nonce=nonce)
    pending = {}  # idx -> recipients still to ack

    def on_ack(idx: int, fut: asyncio.Future) -> None:
        t = time.perf_counter()
        if fut.cancelled():
            code = int(ErrorCode.INTERNAL)
        else:
            exc = fut.exception()
            code = 0 if exc is None else int(getattr(exc, "code", ErrorCode.INTERNAL))
        left = pending.get(idx)
        if left is None:
            return
        if code or left == 1:
            del pending[idx]
            a_idx.append(idx)
            a_t.append(t)
            a_code.append(code)
            progress[base + (_P_REFUSED if code else _P_ACKED)] += 1
        else:
            pending[idx] = left - 1

    def send(batch) -> None:
        provider = cfg.provider
        n = 0
        for idx, rec, t_sched in batch:
            if rec.sender not in owned_set:
                continue
            client = clients[rec.sender]
            body = acc.make_body(idx, rec.size)
            eph = rec.cls == "e"
            pending[idx] = len(rec.recipients)
            for k, rcpt in enumerate(rec.recipients):
                # one wire id per recipient (ids are the relay's dedup key);
                # the first is the accountant's, carried in the body too
                cid = acc.message_id(idx) if k == 0 else os.urandom(16)
                fut = client.send_nowait(address_of(rcpt, provider), body, id=cid,
                                         ephemeral=eph)
                fut.add_done_callback(lambda f, i=idx: on_ack(i, f))
            s_idx.append(idx)
            s_tsched.append(t_sched)
            s_tsent.append(time.perf_counter())
            n += 1
        if n:
            progress[base + _P_SENT] += n

    async def receive(user: str, client: Client) -> None:
        while True:
            try:
                msgs = await client.recv_many()
            except FastrouteError:
                return
            t = time.perf_counter()
            for m in msgs:
                body = m.body
                if len(body) < HEADER_SIZE or body[:ID_SIZE][:8] != nonce:
                    corrupt[0] += 1
                    continue
                idx = int.from_bytes(body[8:ID_SIZE], "big")
                if not 0 <= idx < len(records):
                    corrupt[0] += 1
                    continue
                try:
                    rslot = records[idx].recipients.index(user)
                except ValueError:
                    rslot = 0xFFFF  # delivered to someone it was not for
                d_idx.append(idx)
                d_slot.append(rslot)
                d_t.append(t)
                d_tns.append(int.from_bytes(body[ID_SIZE:HEADER_SIZE], "big"))
            progress[base + _P_DELIV] += len(msgs)

    receivers = [asyncio.ensure_future(receive(u, c)) for u, c in clients.items()]
    st = LoopStats()
    loop_error = None
    try:
        await run_open_loop(Schedule(records, cfg.speed), send, accountant=acc,
                            max_batch=cfg.max_batch, stats=st)
    except FastrouteError as exc:  # e.g. a client's link closed under it
        loop_error = f"{type(exc).__name__}: {exc}"
    progress[base + _P_DONE] = 1
    while not stop.is_set():
        await asyncio.sleep(0.02)
    for c in clients.values():
        await c.close()
    for r in receivers:
        r.cancel()
    own_sent = sum(1 for r in records if r.sender in owned_set)
    return {
        "t0": acc.t0, "sent": (s_idx, s_tsched, s_tsent), "acks": (a_idx, a_t, a_code),
        "deliveries": (d_idx, d_slot, d_t, d_tns), "corrupt": corrupt[0],
        "unanswered": len(pending), "error": loop_error,
        "loop": {"late": st.late, "n": st.n_sent, "max_lag_s": st.max_lag_s,
                 "paced": st.paced, "own_sent": own_sent,
                 "first_send": st.first_send, "last_send": st.last_send,
                 "first_sched": st.first_sched, "last_sched": st.last_sched},
    }


def _worker_entry(cfg, owned, nonce, progress, slot, go, stop, start_at, pipe) -> None:
    raise_fd_limit()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        result = runner(_worker(cfg, owned, nonce, progress, slot, go, stop, start_at))
    except BaseException as exc:  # report, never hang the parent
        result = {"fatal": f"{type(exc).__name__}: {exc}"}
    pipe.send(result)
    pipe.close()


# ----------------------------------------------------------------- parent side
def replay(cfg: ReplayConfig) -> tuple[dict, Accountant]:
    """Run a replay; return ``(report, accountant)`` (see :mod:`.report`)."""
    from .report import build_report

    records = cfg.records
    if not records:
        raise InvalidArgument("the trace is empty")
    users = sorted({r.sender for r in records} | {u for r in records for u in r.recipients})
    missing = [u for u in users if u not in cfg.users]
    if missing:
        raise InvalidArgument(f"no credential for {len(missing)} trace users")
    nproc = max(1, min(cfg.processes, len(users)))
    # users are dealt round-robin over workers, weighted by nothing: simple and even enough
    parts = [users[i::nproc] for i in range(nproc)]
    nonce = os.urandom(8)
    ctx = mp.get_context("fork")
    progress = ctx.Array("q", _NSLOTS * nproc, lock=False)
    go, stop = ctx.Event(), ctx.Event()
    start_at = ctx.Value("d", 0.0, lock=False)
    procs, pipes = [], []
    for i, part in enumerate(parts):
        rx, tx = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker_entry, args=(cfg, part, nonce, progress, i, go, stop,
                                                   start_at, tx), daemon=True)
        p.start()
        tx.close()
        procs.append(p)
        pipes.append(rx)
    bar = _Progress(len(records), enabled=cfg.progress)
    results: list[dict | None] = [None] * nproc

    def total(k: int) -> int:
        return sum(progress[i * _NSLOTS + k] for i in range(nproc))

    def poll_results() -> None:
        for i, pipe in enumerate(pipes):
            if results[i] is None and pipe.poll():
                results[i] = pipe.recv()
                if "fatal" in results[i]:
                    raise FastrouteError(f"replay worker {i} failed: {results[i]['fatal']}",
                                         code=ErrorCode.INTERNAL)

    try:
        deadline = time.monotonic() + 120.0
        while total(_P_READY) < nproc:
            poll_results()
            if time.monotonic() > deadline:
                raise FastrouteError("workers could not connect their devices in 120 s",
                                     code=ErrorCode.INTERNAL)
            time.sleep(0.02)
        start_at.value = time.perf_counter() + 0.2
        go.set()
        while total(_P_DONE) < nproc:
            poll_results()
            bar.update(total(_P_SENT), total(_P_ACKED), total(_P_DELIV))
            time.sleep(0.1)
        # drain: wait for acks and deliveries to stop changing
        last, quiet_since = None, time.monotonic()
        while True:
            poll_results()
            snap = (total(_P_ACKED), total(_P_REFUSED), total(_P_DELIV))
            bar.update(total(_P_SENT), snap[0], snap[2])
            now = time.monotonic()
            if snap != last:
                last, quiet_since = snap, now
            answered = snap[0] + snap[1] >= total(_P_SENT)
            expected = _expected(records, cfg, total(_P_ACKED))
            if answered and snap[2] >= expected and now - quiet_since > 0.3:
                break
            if now - quiet_since > cfg.drain_timeout_s:
                break
            time.sleep(0.05)
        stop.set()
        for i, pipe in enumerate(pipes):
            if results[i] is None:
                if not pipe.poll(30.0):
                    raise FastrouteError(f"replay worker {i} did not report",
                                         code=ErrorCode.INTERNAL)
                results[i] = pipe.recv()
                if "fatal" in results[i]:
                    raise FastrouteError(f"replay worker {i} failed: {results[i]['fatal']}",
                                         code=ErrorCode.INTERNAL)
    finally:
        bar.close()
        stop.set()
        go.set()
        for p in procs:
            p.join(5.0)
            if p.is_alive():
                p.kill()
    acc = _merge(records, results, nonce)
    meta = {"speed": cfg.speed if cfg.speed is not None else "max", "trace": cfg.trace_name,
            "processes": nproc, "users": len(users), "target": f"{cfg.host}:{cfg.port}"}
    meta["duration_s"] = _duration(results)
    meta.update(cfg.meta)
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        meta["worker_errors"] = errors
    rep = build_report(acc, meta)
    return rep, acc


def _expected(records: list[TraceRecord], cfg: ReplayConfig, acked: int) -> int:
    # an estimate for the drain loop only (exact accounting happens in _merge)
    if not records:
        return 0
    mean_fanout = sum(len(r.recipients) for r in records) / len(records)
    return int(acked * mean_fanout)


def _duration(results: list[dict]) -> float | None:
    firsts = [r["loop"]["first_send"] for r in results if r["loop"]["first_send"] is not None]
    lasts = [r["loop"]["last_send"] for r in results if r["loop"]["last_send"] is not None]
    return round(max(lasts) - min(firsts), 3) if firsts and lasts else None


def _merge(records: list[TraceRecord], results: list[dict], nonce: bytes) -> Accountant:
    """Replay every worker's raw events into one Accountant, in a valid order.

    The time series' bucket width follows the run's length (:func:`.report.pick_interval`):
    a 7 s run gets 50 ms buckets, not 8 points; a long one never more than ~200.
    """
    from .report import pick_interval

    start = min(r["t0"] for r in results if r["t0"] is not None)
    last = start
    for r in results:
        for times in (r["sent"][2], r["acks"][1], r["deliveries"][2]):
            if len(times):
                last = max(last, max(times))
    acc = Accountant(len(records), nonce=nonce, interval_s=pick_interval(last - start))
    acc.span_s = last - start  # the plot's last bucket is only partly covered
    acc.start(start)
    t_ns_of: dict[int, int] = {}
    for r in results:
        t0 = r["t0"]
        for idx, t_sched, t_sent in zip(*r["sent"]):
            rec = records[idx]
            acc.scheduled(idx, t_sched, len(rec.recipients), ephemeral=rec.cls == "e")
            acc.sent(idx, t_sent)
            t_ns_of[idx] = max(0, int((t_sched - t0) * 1e9))
    for r in results:
        for idx, t, code in zip(*r["acks"]):
            acc.acked(idx, t, code)
    for r in results:
        acc.corrupt += r["corrupt"]
        for idx, rslot, t, t_ns in zip(*r["deliveries"]):
            if idx not in t_ns_of:
                acc.unexpected += 1
            elif t_ns != t_ns_of[idx]:
                acc.corrupt += 1
            else:
                acc.delivered(idx, rslot, t)
    # the driver statistics of the whole run: every worker walked the full
    # schedule, so the worst worker's lateness is the run's
    st = LoopStats()
    loops = [r["loop"] for r in results]
    st.paced = loops[0]["paced"]
    st.n_sent = sum(lp["own_sent"] for lp in loops)
    worst = max(loops, key=lambda lp: lp["late"] / lp["n"] if lp["n"] else 0.0)
    st.late = int(worst["late"] / worst["n"] * st.n_sent) if worst["n"] else 0
    st.max_lag_s = max(lp["max_lag_s"] for lp in loops)
    for name, pick in (("first_send", min), ("last_send", max), ("first_sched", min),
                       ("last_sched", max)):
        vals = [lp[name] for lp in loops if lp[name] is not None]
        setattr(st, name, pick(vals) if vals else None)
    st.finished = True
    acc.loop_stats = st
    return acc


class _Progress:
    """A tqdm bar on a terminal; silent otherwise (CI logs stay readable)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is in the replay extra
                return
            self.bar = tqdm(total=total, unit="msg", desc="sent", smoothing=0.1)

    def update(self, sent: int, acked: int, delivered: int) -> None:
        if self.bar is not None:
            self.bar.n = sent
            self.bar.set_postfix(acked=acked, delivered=delivered, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------ CLI
def make_users(records: list[TraceRecord], provider: str, provider_key) -> dict:
    """Issue a device credential (with a fresh key pair) for every user of a trace."""
    from ..identity import issue_credential
    from ..noise import KeyPair

    users = sorted({r.sender for r in records} | {u for r in records for u in r.recipients})
    out = {}
    for u in users:
        kp = KeyPair.generate()
        out[u] = (kp.private, issue_credential(provider_key, provider, address_of(u, provider),
                                               "replay", kp.public, ttl_s=7 * 86400))
    return out


def _check_target(host: str, port: int) -> None:
    """Fail in one line, before any worker starts, when no relay answers at the target."""
    import socket

    try:
        socket.create_connection((host, port), timeout=5.0).close()
    except OSError as exc:
        raise SystemExit(f"fastroute: no relay answers at {host}:{port} "
                         f"({exc.strerror or exc}); start one with `fastroute serve` "
                         f"or give its address with --target") from None


def cli_replay(args) -> int:
    """``fastroute replay`` (arguments from :func:`.cliargs.add_replay_args`).

    With ``--data-dir``, a throwaway provider is enrolled in the relay's
    registry for the run and removed afterwards, whatever the outcome.
    """
    from ..config import parse_hostport
    from ..datadir import require_initialised
    from ..identity import ProviderKey, Registry
    from .report import exit_status, summary_text, write_report

    host, port = parse_hostport(args.target)
    speed = None if args.speed == "max" else float(args.speed)
    records = list(read_any(args.trace))
    if args.limit:
        records = records[:args.limit]
    _check_target(host, port)
    throwaway = None
    if args.provider_key:
        pkey = ProviderKey.load(args.provider_key)
        provider = args.provider
    elif args.data_dir:
        # enrol a throwaway test provider in the relay's own registry
        require_initialised(args.data_dir, "from --data-dir")
        pkey = ProviderKey.generate()
        provider = args.provider or f"replay-{os.urandom(3).hex()}"
        with Registry(os.path.join(args.data_dir, "registry.db")) as reg:
            reg.add_provider(provider, pkey.public_key)
        throwaway = provider
    else:
        raise InvalidArgument("give --data-dir (the relay's, to enrol a test provider) or "
                              "--provider NAME --provider-key FILE (an enrolled provider)")
    try:
        server_key = bytes.fromhex(args.server_key) if args.server_key else None
        cfg = ReplayConfig(host=host, port=port, records=records,
                           users=make_users(records, provider, pkey), provider=provider,
                           speed=speed, processes=args.processes, server_key=server_key,
                           drain_timeout_s=args.drain_timeout,
                           trace_name=os.path.basename(args.trace),
                           progress=not args.no_progress)
        raise_fd_limit()
        rep, acc = replay(cfg)
    finally:
        if throwaway is not None:
            with Registry(os.path.join(args.data_dir, "registry.db")) as reg:
                reg.remove_provider(throwaway)
    if args.report:
        json_path, png_path = write_report(args.report, rep, acc)
        print(f"report: {json_path} {png_path}")
    print(summary_text(rep))
    if throwaway is not None:
        print(f"removed the test provider {throwaway} from the registry")
    return exit_status(rep)
