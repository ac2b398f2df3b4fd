"""Direction 2: grade a vendor's client against what ``docs/PROTOCOL.md`` requires of it.

The kit is a small test relay with a scripted peer (``peer@conformance-kit``).
It issues the client a credential for ``device@vendor-test``, writes it, the
device's private key and the relay's public key to files, and waits for the
client (or launches it with ``--client-cmd``, passing the paths in
environment variables).  The client under test runs an *adapter*: a few
lines on top of the vendor's client library that behave as an echo device
(``docs/CONFORMANCE.md``, "The adapter contract"):

* ``echo:<text>``: send the same body back to the sender (persistent), and
  never give up on it: a refusal 400 or 504 is retried later with the same id;
* ``pause:<ms>``: the application takes nothing for that long (a slow app);
* ``bye``: wait for every SACK, close with BYE, exit 0.

Everything else (acks, dedup, resends, reconnecting) is the client library's
job, and that is what the scenarios grade, from the bytes on the wire.  The
reference adapter for :class:`fastroute.Client` is
:mod:`fastroute.conformance.adapter`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import msgpack

from ..identity import ProviderKey, is_valid_address, is_valid_provider, issue_credential
from ..noise import KeyPair
from .framework import CLIENT_BEHAVIOURS, FAIL, NA, PASS, Verdict, client_behaviour
from .link import (BUNDLES, BYE, CONSENT, DACK, DDELIVER, DEVICES, DSEND, ERROR, EVENT,
                   FEATURES, FEATURES_OK, GDELIVER, GEVENT, GMEMBERS, KEYS_ADD, KEYS_SET, PING,
                   REPLY, SEND, ServerSide, pack)

__all__ = ["VendorKit", "ENV_HOST", "ENV_PORT", "ENV_CREDENTIAL", "ENV_DEVICE_KEY",
           "ENV_SERVER_KEY", "ENV_ADDRESS", "render_grades"]

ENV_HOST = "FASTROUTE_CONFORMANCE_HOST"
ENV_PORT = "FASTROUTE_CONFORMANCE_PORT"
ENV_CREDENTIAL = "FASTROUTE_CONFORMANCE_CREDENTIAL"
ENV_DEVICE_KEY = "FASTROUTE_CONFORMANCE_DEVICE_KEY"
ENV_SERVER_KEY = "FASTROUTE_CONFORMANCE_SERVER_KEY"
ENV_ADDRESS = "FASTROUTE_CONFORMANCE_ADDRESS"

PEER = "peer@conformance-kit"
PROVIDER = "vendor-test"
ADDRESS = f"device@{PROVIDER}"
DEVICE = "conformance-1"
# Backoff is graded by counting: a client that waits at least ~100 ms after a
# refusal and doubles makes 4 attempts in 0.8 s; one that ignores the refusal
# makes hundreds.
MAX_ATTEMPTS = 6
# What the kit grants a client that asks (14.2; "groups" only with "e2ee", 18); it
# answers the "e2ee" requests a client makes on its own (key publishing, 17.3),
# serves only the scripted peer's directory, and sends group ops, never receives them.
KIT_FEATURES = ("e2ee", "groups")
UNREGISTERED_OP = 2099  # the last opcode of e2ee's relay -> client block, never assigned


@dataclass
class Msg:
    """A persistent delivery the kit sends to the client: a message of the peer
    (DELIVER, or DDELIVER / GDELIVER with ``device`` and ``group``), or a GEVENT
    of ``kind`` (``body`` then holds its msgpack data)."""

    sender: str
    id: bytes
    body: bytes
    opcode: int = 18
    device: int = 1
    group: bytes = b""
    kind: int = 0


@dataclass
class Seen:
    """One op the client sent: when, on which link, and whether after its BYE."""

    t: float
    link: int
    op: Any
    after_bye: bool


@dataclass
class Link:
    """One authenticated connection of the client."""

    no: int
    side: ServerSide
    t_open: float
    next_seq: int = 1
    inflight: dict[int, Msg] = field(default_factory=dict)  # delivered, not acked
    delivered: list[tuple[int, Msg, float]] = field(default_factory=list)
    bye_at: float | None = None
    open: bool = True
    features: set[str] = field(default_factory=set)  # granted on this link (14.2)


def _deliver_op(seq: int, m: Msg, wide_seq: bool = False) -> bytes:
    # as the relay does (section 13): seq as uint32 (uint64 when wide), ts as uint64
    seq_b = (b"\xcf" + seq.to_bytes(8, "big")) if wide_seq else b"\xce" + seq.to_bytes(4, "big")
    ts = b"\xcf" + int(time.time() * 1000).to_bytes(8, "big")
    if m.opcode == DDELIVER:  # 17.6
        return (b"\x98" + pack(DDELIVER) + seq_b + pack(m.sender) + pack(m.device)
                + pack(m.id) + pack(m.body) + ts + b"\x00")
    if m.opcode == GDELIVER:  # 18.5
        return (b"\x99" + pack(GDELIVER) + seq_b + pack(m.group) + pack(m.sender)
                + pack(m.device) + pack(m.id) + pack(m.body) + ts + b"\x00")
    if m.opcode == GEVENT:  # 18.6
        return b"\x97" + pack(GEVENT) + seq_b + pack(m.kind) + pack(m.id) + pack(m.body) + ts \
            + b"\x00"
    return (b"\x97\x12" + seq_b + pack(m.sender) + pack(m.id) + pack(m.body)
            + ts + b"\x00")


class VendorKit:
    """The test relay and its scenarios; :meth:`run` grades one client."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, out_dir: str = ".", *,
                 pause_s: float = 0.8, refuse_s: float = 0.8, shutdown_s: float = 1.2,
                 timeout: float = 5.0, connect_timeout: float = 30.0) -> None:
        self.host, self.port, self.out_dir = host, port, out_dir
        self.pause_s, self.refuse_s, self.shutdown_s = pause_s, refuse_s, shutdown_s
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.relay_key = KeyPair.generate()
        self.impostor_key = KeyPair.generate()
        self.device_key = KeyPair.generate()
        self.provider_key = ProviderKey.generate()
        self.credential = issue_credential(self.provider_key, PROVIDER, ADDRESS, DEVICE,
                                           self.device_key.public, ttl_s=86400)
        self.mode = "impostor"
        self.log: list[Seen] = []
        self.accepts: list[float] = []
        self.links: list[Link] = []
        self.backlog: list[Msg] = []
        self.pinning: list[str] = []
        self.handshake: list[str] = []
        self.sack_policy: Callable[[Link, list, float], int | None] = lambda lk, op, t: 0
        self.news = asyncio.Event()
        self.pools = [0, 0]  # one-time EC and KEM prekeys the client published (17.3)
        self.peer_devices: dict[int, int] = {1: 111, 2: 222}  # the peer's list (17.1)
        self.dsends: list[tuple[bytes, dict[int, int], int]] = []  # id, entries, REPLY code
        # group id -> (version, members, admins) as the GEVENTs the kit sent say (18.6)
        self.group_state: dict[bytes, tuple[int, set[str], set[str]]] = {}
        self.files: dict[str, str] = {}
        self._server: asyncio.base_events.Server | None = None
        self._gone: Callable[[], bool] = lambda: False  # the client process has exited
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ plumbing
    def now(self) -> float:
        """The kit's clock (the event loop's)."""
        return asyncio.get_running_loop().time()

    @property
    def link(self) -> Link | None:
        """The newest open link, if any."""
        return self.links[-1] if self.links and self.links[-1].open else None

    def write_files(self) -> dict[str, str]:
        """Write the credential, device key and relay key; the env for the client."""
        os.makedirs(self.out_dir, exist_ok=True)
        paths = {ENV_CREDENTIAL: os.path.join(self.out_dir, "device.cred"),
                 ENV_DEVICE_KEY: os.path.join(self.out_dir, "device.key"),
                 ENV_SERVER_KEY: os.path.join(self.out_dir, "relay.pub")}
        for env, data in ((ENV_CREDENTIAL, self.credential),
                          (ENV_DEVICE_KEY, self.device_key.private),
                          (ENV_SERVER_KEY, self.relay_key.public.hex().encode() + b"\n")):
            fd = os.open(paths[env], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        self.files = paths
        return {ENV_HOST: self.host, ENV_PORT: str(self.port), ENV_ADDRESS: ADDRESS, **paths}

    async def start(self) -> dict[str, str]:
        """Listen and write the files; returns the client's environment."""
        self._server = await asyncio.start_server(self._on_conn, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.write_files()

    async def close(self) -> None:
        """Stop listening and drop every link."""
        if self._server is not None:
            self._server.close()
        for lk in self.links:
            lk.side.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self) -> None:
        self.news.set()

    async def until(self, pred: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``pred()`` holds (re-checked on every client op); False on timeout."""
        deadline = self.now() + (self.timeout if timeout is None else timeout)
        while not pred():
            left = deadline - self.now()
            if left <= 0:
                return False
            self.news.clear()
            try:
                await asyncio.wait_for(self.news.wait(), min(left, 0.05))
            except asyncio.TimeoutError:
                pass
        return True

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts.append(self.now())
        self._notify()
        side = ServerSide(reader, writer)
        mode = self.mode
        key = self.impostor_key if mode == "impostor" else self.relay_key
        hello = pack({"v": 1, "t": int(time.time() * 1000)})
        try:
            res = await side.handshake(key, hello, self.timeout)
        except Exception:
            res = None
        if mode == "impostor":
            self.pinning.append("msg3 sent" if res is not None else "closed before msg3")
            self.mode = "normal"
            side.abort()
            self._notify()
            return
        if res is None:
            side.abort()
            return
        if mode == "shutdown":
            side.send([pack([21, 503, "shutting down"])])
            await asyncio.sleep(0.01)
            side.abort()
            return
        problem = self._check_hello(side, *res)
        if problem:
            self.handshake.append(problem)
            side.send([pack([21, 102, "bad client hello"])])
            await asyncio.sleep(0.01)
            side.abort()
            self._notify()
            return
        self.handshake.append("ok")
        lk = Link(len(self.links) + 1, side, self.now())
        self.links.append(lk)
        side.send([pack([16, ADDRESS, DEVICE, int(time.time() * 1000)])])
        backlog, self.backlog = self.backlog, []
        if backlog:
            self.deliver(lk, backlog)
        self._notify()
        try:
            await side.pump(lambda ops: self._on_ops(lk, ops))
        finally:
            lk.open = False
            # what the client did not ack is redelivered, in order, on its next link (9.3)
            self.backlog = [m for _, m in sorted(lk.inflight.items())] + self.backlog
            self._notify()

    def _check_hello(self, side: ServerSide, p1: bytes, p3: bytes) -> str:
        if p1 != b"" or side.msg1_len != 32:
            return f"msg1 carries a payload ({side.msg1_len - 32} bytes; section 4.2 says empty)"
        try:
            hello = msgpack.unpackb(p3, raw=False)
        except Exception:
            return "client hello is not msgpack (section 5)"
        if not isinstance(hello, dict) or set(hello) != {"v", "cred"}:
            return f"client hello keys {sorted(hello) if isinstance(hello, dict) else hello!r}"
        if type(hello["v"]) is not int or hello["v"] != 1:
            return f"client hello v = {hello['v']!r}"
        if type(hello["cred"]) is not bytes:
            return "cred is not msgpack bin (section 5)"
        if hello["cred"] != self.credential:
            return "cred is not the credential as issued (section 5)"
        if side.remote_static != self.device_key.public:
            return "the handshake's static key is not the credential's (section 6.3 #6)"
        return ""

    def _on_ops(self, lk: Link, ops: list | None) -> None:
        t = self.now()
        if ops is None:
            self.log.append(Seen(t, lk.no, None, lk.bye_at is not None))
            self._notify()
            return
        out: list[bytes] = []
        for op in ops:
            self.log.append(Seen(t, lk.no, op, lk.bye_at is not None))
            if not isinstance(op, list) or not op or lk.bye_at is not None:
                continue
            kind = op[0]
            if kind == DACK and len(op) == 2 and type(op[1]) is int:
                for seq in [s for s in lk.inflight if s <= op[1]]:
                    del lk.inflight[seq]
            elif kind == SEND and len(op) == 5:
                code = self.sack_policy(lk, op, t) if _op_problem(op) is None else 102
                if code is not None:
                    out.append(pack([17, op[1], code]))
            elif kind == CONSENT and len(op) == 4:
                out.append(pack([17, op[1], 0]))
            elif kind == FEATURES and len(op) == 3 and isinstance(op[2], list):
                granted = sorted(set(KIT_FEATURES).intersection(
                    n for n in op[2] if isinstance(n, str)))
                if "e2ee" not in granted and "e2ee" not in lk.features:
                    granted = [n for n in granted if n != "groups"]  # 18: only with e2ee
                lk.features.update(granted)
                out.append(pack([FEATURES_OK, op[1], granted]))
            elif "e2ee" in lk.features and kind == KEYS_SET and _op_problem(op) is None:
                if op[6]:
                    self.pools = [0, 0]
                out.append(pack([REPLY, op[1], 0, True, 1]))  # the device id (17.3)
            elif "e2ee" in lk.features and kind == KEYS_ADD and _op_problem(op) is None:
                self.pools[op[2]] += len(op[3])
                out.append(pack([REPLY, op[1], 0, True, self.pools[op[2]]]))
            elif "e2ee" in lk.features and kind in (DEVICES, BUNDLES, DSEND) \
                    and _op_problem(op) is None:
                out.append(self._directory(op))
            elif "groups" in lk.features and 1100 <= kind <= 1107 and _op_problem(op) is None:
                out.append(self._group_answer(op))
            elif kind == PING and len(op) == 2:
                out.append(pack([20, op[1]]))
            elif kind == BYE:
                lk.bye_at = t
                self._spawn(self._answer_bye(lk))
        if out and lk.open:
            lk.side.send(out)
        self._notify()

    def _directory(self, op: list) -> bytes:
        """The kit's answer to DEVICES, BUNDLES and DSEND (17.4, 17.5): only the
        scripted peer has a device list."""
        if op[2] != PEER:
            return pack([REPLY, op[1], 300, True, None])
        devs = self.peer_devices
        if op[0] == DEVICES:
            return pack([REPLY, op[1], 0, True, [[d, devs[d]] for d in sorted(devs)]])
        if op[0] == BUNDLES:
            ids = sorted(d for d in (op[3] or devs) if d in devs)
            return pack([REPLY, op[1], 0, True, [
                [d, devs[d], b"\x05" + bytes(32), [1, b"\x05" + bytes(32), bytes(64)],
                 None, [2, bytes(1569), bytes(64)], True] for d in ids]])
        given = {e[0]: e[1] for e in op[4]}
        lists = [sorted(d for d in devs if d not in given),
                 sorted(d for d in given if d not in devs),
                 sorted(d for d in given if d in devs and devs[d] != given[d]), [], [], []]
        code = 306 if any(lists) else 0
        self.dsends.append((op[1], given, code))
        return pack([REPLY, op[1], code, True, lists if code else None])

    def _group_answer(self, op: list) -> bytes:
        """GMEMBERS of the kit's group from its events so far (18.3); any other
        group request is answered as the relay would a non-member's (308)."""
        state = self.group_state.get(op[2]) if op[0] == GMEMBERS else None
        if state is None:
            return pack([REPLY, op[1], 308, True, None])
        version, members, admins = state
        return pack([REPLY, op[1], 0, True, [version, *[
            [a, a in admins, [[1, 111]] if a == PEER else []] for a in sorted(members)]]])

    async def _answer_bye(self, lk: Link) -> None:
        # hold the link a moment to see whether anything follows the BYE (8.1)
        await asyncio.sleep(0.4)
        lk.side.send([pack([21, 0, "bye"])])
        await asyncio.sleep(0.01)
        lk.side.abort()

    def deliver(self, lk: Link, msgs: list[Msg], *, before: list[bytes] | None = None,
                wide_seq: bool = False) -> list[int]:
        """DELIVER ``msgs`` on ``lk`` in one frame (after ``before`` ops); their seqs."""
        ops = list(before or [])
        seqs = []
        t = self.now()
        for m in msgs:
            seq = lk.next_seq
            lk.next_seq += 1
            lk.inflight[seq] = m
            lk.delivered.append((seq, m, t))
            ops.append(_deliver_op(seq, m, wide_seq))
            seqs.append(seq)
        lk.side.send(ops)
        return seqs

    def next_seq(self, lk: Link, opcode: int) -> int:
        """Number an op the scenario sends by hand (not kept for redelivery), so
        that acks of it are graded as acks of a delivered seq."""
        seq = lk.next_seq
        lk.next_seq += 1
        lk.delivered.append((seq, Msg("", b"", b"", opcode=opcode), self.now()))
        return seq

    def drop(self, lk: Link) -> None:
        """Break the link (TCP reset), as a network failure would."""
        lk.side.abort()

    async def next_link(self, after: int, timeout: float | None = None) -> Link | None:
        """The newest open link numbered above ``after`` (waiting for a reconnection)."""
        def found() -> Link | None:
            return next((lk for lk in reversed(self.links[after:]) if lk.open), None)
        await self.until(lambda: found() is not None, timeout)
        return found()

    def sends(self, prefix: bytes) -> list[Seen]:
        """Every SEND the client made whose body starts with ``prefix``."""
        return [s for s in self.log if isinstance(s.op, list) and s.op and s.op[0] == SEND
                and len(s.op) == 5 and isinstance(s.op[3], bytes) and s.op[3].startswith(prefix)]

    def dacks(self, link_no: int) -> list[Seen]:
        """Every DACK the client sent on one link."""
        return [s for s in self.log if s.link == link_no and isinstance(s.op, list)
                and s.op and s.op[0] == DACK and len(s.op) == 2 and type(s.op[1]) is int]

    @staticmethod
    def msg(body: bytes) -> Msg:
        """A new message from the kit's peer."""
        return Msg(PEER, os.urandom(16), body)

    # ------------------------------------------------------------- running
    async def run(self, client: Callable[[dict[str, str]], Awaitable[Any]] | None = None,
                  client_cmd: str | None = None, print_fn=print,
                  only: list[str] | None = None) -> dict[str, Any]:
        """Grade one client; the report as a dict.

        ``client`` is an in-process adapter (``async def f(env)``),
        ``client_cmd`` a shell command run with the environment; with neither,
        the kit waits for a client started by hand.  ``only`` names the
        scenarios to run (pinning and the handshake always run).
        """
        env = await self.start()
        print_fn(f"conformance relay listening on {self.host}:{self.port}")
        for k, v in env.items():
            print_fn(f"  {k}={v}")
        proc = None
        runner: asyncio.Task | None = None
        if client is not None:
            runner = asyncio.ensure_future(client(env))
        elif client_cmd is not None:
            proc = await asyncio.create_subprocess_exec(
                *shlex.split(client_cmd), env={**os.environ, **env})
            self._gone = lambda: proc.returncode is not None
        try:
            verdicts = await self._grade(print_fn, only)
            exit_status: int | None = None
            # only the bye scenario tells the adapter to exit; otherwise it is stopped
            grace = self.timeout if only is None or "bye" in only or self._gone() else 0.0
            if proc is not None:
                try:
                    exit_status = await asyncio.wait_for(proc.wait(), grace)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
            elif runner is not None:
                if grace:
                    await asyncio.wait({runner}, timeout=grace)
                if runner.done() and not runner.cancelled() and runner.exception() is None:
                    res = runner.result()
                    exit_status = res if isinstance(res, int) else 0
                else:
                    exit_status = None
        finally:
            if runner is not None and not runner.done():
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            await self.close()
        failed = [v.name for v in verdicts if v.status == FAIL]
        return {"direction": "client", "listen": f"{self.host}:{self.port}",
                "files": self.files, "client_exit_status": exit_status,
                "behaviours": [v.__dict__ for v in verdicts], "failed": failed,
                "passed": not failed}

    async def _grade(self, print_fn, only: list[str] | None) -> list[Verdict]:
        verdicts: list[Verdict] = []

        def add(name: str, section: str, ok: bool | None, detail: str) -> None:
            v = Verdict(name, section, NA if ok is None else PASS if ok else FAIL, detail)
            verdicts.append(v)
            print_fn(f"{v.status.upper():4}  {name} ({_where(section)}): {detail}")

        got = await self.until(lambda: bool(self.pinning) or self._gone(), self.connect_timeout)
        got = bool(self.pinning)
        add("pinning", "4.2, 15.3", got and self.pinning[0] == "closed before msg3",
            (self.pinning[0] if got else "the client never connected")
            + " when the relay presented another static key")
        first = await self.next_link(0, self.connect_timeout if got else 0.1)
        add("handshake", "4.2, 5, 6", first is not None and self.handshake[:1] == ["ok"],
            "; ".join(self.handshake[:1]) or "no handshake after the pinning probe")
        ordered = [b for b in CLIENT_BEHAVIOURS if b.live] + [
            b for b in CLIENT_BEHAVIOURS if not b.live]
        for beh in ordered:
            if only is not None and beh.name not in only:
                continue
            lk = self.link
            if lk is None and beh.live and self.links and not self._gone():
                lk = await self.next_link(len(self.links))
            if lk is None and beh.live:
                for name, section in beh.grades:
                    add(name, section, False, "not run: the client is not connected")
                continue
            try:
                res = await beh.fn(self, lk)
            except Exception as exc:  # the kit must report, not crash, on a strange client
                res = {name: (False, f"scenario error: {type(exc).__name__}: {exc}")
                       for name, _ in beh.grades}
            self.sack_policy = lambda lk, op, t: 0
            for name, section in beh.grades:
                ok, detail = res.get(name, (False, "not observed"))
                add(name, section, ok, detail)
        return verdicts


def _where(section: str) -> str:
    return f"PROTOCOL.md {section}" if section[:1].isdigit() else section


def render_grades(report: dict[str, Any]) -> str:
    """A one-line-per-behaviour summary of a client report."""
    out = [f"{b['status'].upper():4}  {b['name']:<33} {_where(b['section'])}"
           for b in report["behaviours"]]
    if report.get("client_exit_status") is not None:
        out.append(f"the client exited with status {report['client_exit_status']}")
    out.append(f"{len(report['behaviours'])} behaviours, {len(report['failed'])} failed"
               + (": " + ", ".join(report["failed"]) if report["failed"] else ""))
    return "\n".join(out)


# ----------------------------------------------------------------- scenarios
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bools are not ints (13)


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_bin(n: int | None = None) -> Callable[[object], bool]:
    return lambda v: type(v) is bytes and (n is None or len(v) == n)


# the client -> relay ops of PROTOCOL.md 7 and 8.1: each field's check
def _entries(v: object) -> bool:
    """DSEND's ``entries``/``own``: ``[device_id, reg_id, ciphertext]`` arrays (17.5)."""
    return isinstance(v, list) and len(v) <= 127 and all(
        isinstance(e, list) and len(e) == 3 and _is_uint(e[0]) and _is_uint(e[1])
        and type(e[2]) is bytes and len(e[2]) <= 61440 for e in v)


_CLIENT_OPS: dict[int, tuple[Callable[[object], bool], ...]] = {
    1: (_is_bin(16), lambda v: type(v) is str and is_valid_address(v),
        lambda v: type(v) is bytes and len(v) <= 61440, lambda v: _is_int(v) and v in (0, 1)),
    2: (_is_uint,),
    3: (_is_int,),
    4: (),
    5: (_is_bin(16), lambda v: v == "*" or is_valid_provider(v), lambda v: type(v) is bool),
    6: (_is_bin(16), lambda v: _is_uint(v) and v != 0, _is_bin(32)),
    7: (_is_bin(16), _is_bin(16), _is_uint, _is_bin()),
    8: (_is_bin(16), _is_bin(16)),
    9: (_is_bin(16), _is_bin(32), _is_uint),
    10: (_is_bin(16), lambda v: isinstance(v, list) and len(v) <= 64 and all(
        type(n) is str and 1 <= len(n.encode()) <= 32 for n in v)),
    # "e2ee" (17.3): the shapes of the two publishing ops
    1000: (_is_bin(16), lambda v: type(v) is int and 1 <= v <= 16383, _is_bin(),
           lambda v: isinstance(v, list) and len(v) == 3,
           lambda v: isinstance(v, list) and len(v) == 3, lambda v: type(v) is bool),
    1001: (_is_bin(16), lambda v: v in (0, 1), lambda v: isinstance(v, list)),
    1002: (_is_bin(16), lambda v: type(v) is str and is_valid_address(v)),
    1003: (_is_bin(16), lambda v: type(v) is str and is_valid_address(v),
           lambda v: isinstance(v, list) and len(v) <= 127 and all(_is_uint(d) for d in v)),
    1004: (_is_bin(16), lambda v: type(v) is str and is_valid_address(v),
           lambda v: type(v) is bool, _entries, _entries),
    # "groups" (18.2-18.4)
    1100: (_is_bin(16),),
    1101: (_is_bin(16), _is_bin(16), lambda v: type(v) is str and is_valid_address(v)),
    1102: (_is_bin(16), _is_bin(16), lambda v: type(v) is bool),
    1103: (_is_bin(16), _is_bin(16), lambda v: type(v) is str and is_valid_address(v)),
    1104: (_is_bin(16), _is_bin(16)),
    1105: (_is_bin(16), _is_bin(16), lambda v: type(v) is str and is_valid_address(v),
           lambda v: type(v) is bool),
    1106: (_is_bin(16), _is_bin(16)),
    1107: (_is_bin(16), _is_bin(16), _is_int, lambda v: type(v) is bytes and len(v) <= 61440),
}


def _op_problem(op: Any) -> str | None:
    """Why a client op breaks PROTOCOL.md 7/8.1/13, or None."""
    if not isinstance(op, list) or not op or not _is_int(op[0]):
        return "not an op array with an integer opcode"
    fields = _CLIENT_OPS.get(op[0])
    if fields is None:
        return f"opcode {op[0]} is not a client op"
    if len(op) != 1 + len(fields):
        return f"opcode {op[0]} with {len(op) - 1} fields instead of {len(fields)}"
    for i, (check, value) in enumerate(zip(fields, op[1:]), 1):
        if not check(value):
            return f"opcode {op[0]} field {i} is {type(value).__name__} {value!r:.40}"
    return None



def _echoes(kit: VendorKit, body: bytes) -> list[Seen]:
    return [s for s in kit.sends(body) if s.op[3] == body]


@client_behaviour("adapter", ("adapter-echo", "CONFORMANCE.md adapter contract"))
async def _echo(kit: VendorKit, lk: Link) -> dict[str, tuple[bool, str]]:
    m = kit.msg(b"echo:hello")
    kit.deliver(lk, [m])
    ok = await kit.until(lambda: bool(_echoes(kit, m.body)))
    return {"adapter-echo": (ok, "the adapter echoed a message" if ok else
                             "no echo: the adapter does not follow the contract")}


@client_behaviour("dedup", ("dedup", "9.2, 15.7"))
async def _dedup(kit: VendorKit, lk: Link) -> dict[str, tuple[bool, str]]:
    m = kit.msg(b"echo:dup-1")
    (s1,) = kit.deliver(lk, [m])
    await kit.until(lambda: bool(_echoes(kit, m.body)))
    await kit.until(lambda: any(d.op[1] >= s1 for d in kit.dacks(lk.no)))
    # the same (from, id) again, as a relay may after losing an ack or its window
    (s2,) = kit.deliver(lk, [m])
    marker = kit.msg(b"echo:dup-2")
    (s3,) = kit.deliver(lk, [marker])
    await kit.until(lambda: bool(_echoes(kit, marker.body))
                    and any(d.op[1] >= s3 for d in kit.dacks(lk.no)))
    ids = {s.op[1] for s in _echoes(kit, m.body)}
    acked = any(d.op[1] >= s2 for d in kit.dacks(lk.no))
    ok = len(ids) == 1 and acked
    return {"dedup": (ok, f"a redelivered (from, id) was processed {len(ids)}x; "
                          f"the duplicate was {'acked' if acked else 'never acked'}")}


def _early_acks(kit: VendorKit, links: list[Link | None], takes: list[Msg],
                taken_at: float) -> list[str]:
    """DACKs that covered a message before the application could take it, or a
    seq never delivered on that link."""
    bad = []
    for link in links:
        if link is None:
            continue
        seq_of = {m.id: seq for seq, m, _ in link.delivered if m in takes}
        for d in kit.dacks(link.no):
            early = [m.body.decode() for m in takes
                     if m.id in seq_of and d.op[1] >= seq_of[m.id] and d.t < taken_at]
            if early:
                bad.append(f"link {link.no}: DACK {d.op[1]} covered {early[0]} "
                           f"{taken_at - d.t:.2f} s before the application could take it")
            top = max([seq for seq, _, t in link.delivered if t <= d.t] or [0])
            if d.op[1] > top:
                bad.append(f"link {link.no}: DACK {d.op[1]} above the highest seq "
                           f"delivered on that link ({top})")
    return bad


def _pause_then(kit: VendorKit, lk: Link, tag: bytes) -> tuple[list[Msg], float]:
    """Deliver ``pause:<ms>`` and three echo requests behind it; when the app may take them."""
    takes = [kit.msg(b"echo:%s-%d" % (tag, i)) for i in range(1, 4)]
    t0 = kit.now()
    kit.deliver(lk, [kit.msg(b"pause:%d" % int(kit.pause_s * 1000)), *takes])
    return takes, t0 + kit.pause_s  # the application cannot take them earlier


async def _taken_then_acked(kit: VendorKit, lk: Link, takes: list, taken_at: float,
                            what: str) -> list[str]:
    """Wait until the application took ``takes`` (queued behind a pause) and
    acked them; what went wrong: early acks, never taken, never acked."""
    done = await kit.until(lambda: all(_echoes(kit, m.body) for m in takes),
                           kit.pause_s + kit.timeout)
    last = max(seq for seq, m, _ in lk.delivered if m in takes)
    acked = await kit.until(lambda: any(d.op[1] >= last for d in kit.dacks(lk.no)))
    bad = _early_acks(kit, [lk], takes, taken_at)
    if not done:
        bad.append(f"the application never took the {what} behind the pause")
    elif not acked:
        bad.append(f"the {what} were never acked once taken")
    return bad


@client_behaviour("acks", ("acks-only-taken", "8.1 DACK, 15.7"))
async def _acks(kit: VendorKit, lk: Link) -> dict[str, tuple[bool, str]]:
    takes, taken_at = _pause_then(kit, lk, b"take")
    bad = await _taken_then_acked(kit, lk, takes, taken_at, "messages")
    return {"acks-only-taken": (not bad, "; ".join(bad[:3]) or
                                "acks came only after the application took each message")}


@client_behaviour("acks-reconnect", ("acks-only-taken-across-reconnect", "8.1 DACK, 9.3, 15.7"))
async def _acks_reconnect(kit: VendorKit, lk: Link) -> dict[str, tuple[bool, str]]:
    takes, taken_at = _pause_then(kit, lk, b"retake")
    await asyncio.sleep(min(0.25, kit.pause_s / 3))
    kit.drop(lk)  # while the application sleeps: nothing after the pause is taken yet
    lk2 = await kit.next_link(lk.no)
    await kit.until(lambda: all(_echoes(kit, m.body) for m in takes),
                    kit.pause_s + kit.timeout)
    await asyncio.sleep(0.2)
    if lk2 is None:
        return {"acks-only-taken-across-reconnect": (False, "the client did not reconnect")}
    bad = _early_acks(kit, [lk, lk2], takes, taken_at)
    redelivered = [seq for seq, m, _ in lk2.delivered if m in takes]
    if redelivered and not any(d.op[1] >= max(redelivered) for d in kit.dacks(lk2.no)):
        bad.append("the redelivered messages were never acked once taken")
    return {"acks-only-taken-across-reconnect": (
        not bad, "; ".join(bad[:3]) or "messages redelivered while the application was "
                                         "busy were acked only once it took them")}


@client_behaviour("resend", ("resend-same-id", "9.2, 10.4, 15.6"),
                  ("resend-in-order", "9.5, 15.6"))
async def _resend(kit: VendorKit, lk: Link) -> dict[str, tuple[bool, str]]:
    kit.sack_policy = lambda link, op, t: None if op[3].startswith(b"echo:rs-") else 0
    msgs = [kit.msg(b"echo:rs-%d" % i) for i in range(1, 6)]
    kit.deliver(lk, msgs)
    got = await kit.until(lambda: all(_echoes(kit, m.body) for m in msgs))
    if not got:
        return {}
    original = [s.op[1] for s in kit.sends(b"echo:rs-") if s.link == lk.no]
    await asyncio.sleep(0.1)
    kit.sack_policy = lambda link, op, t: 0
    kit.drop(lk)  # none of the five was SACKed: their outcome is unknown to the client
    lk2 = await kit.next_link(lk.no)
    if lk2 is None:
        return {"resend-same-id": (False, "the client did not reconnect")}
    await kit.until(lambda: {s.op[1] for s in kit.sends(b"echo:rs-")
                             if s.link == lk2.no} >= set(original))
    await asyncio.sleep(0.2)
    again = [s.op[1] for s in kit.sends(b"echo:rs-") if s.link == lk2.no]
    resent = [cid for cid in dict.fromkeys(again) if cid in original]
    new = [cid for cid in dict.fromkeys(again) if cid not in original]
    same_ok = len(resent) == len(original) and not new
    order_ok = resent == original
    return {"resend-same-id": (same_ok, f"{len(resent)} of {len(original)} unacked SENDs "
                                        f"resent with their id; {len(new)} with a new id"),
            "resend-in-order": (order_ok and same_ok,
                                "resent in the original order" if order_ok and same_ok else
                                f"resent in the order {[original.index(c) + 1 for c in resent]}"
                                f" (sent as 1..{len(original)})")}


def _refusing(code: int, body: bytes, window: float, kit: VendorKit):
    first: list[float] = []

    def policy(lk: Link, op: list, t: float) -> int | None:
        if op[3] != body:
            return 0
        if not first:
            first.append(t)
        return code if t < first[0] + window else 0
    return policy, first


async def _backoff(kit: VendorKit, lk: Link, code: int, tag: bytes) -> tuple[bool, str]:
    m = kit.msg(b"echo:" + tag)
    policy, first = _refusing(code, m.body, kit.refuse_s, kit)
    kit.sack_policy = policy
    kit.deliver(lk, [m])

    def stored() -> bool:
        return bool(first) and any(s.t >= first[0] + kit.refuse_s for s in _echoes(kit, m.body))
    ok = await kit.until(stored, kit.refuse_s + kit.timeout)
    tries = _echoes(kit, m.body)
    if not tries:
        return False, "the message was never sent"
    in_window = [s for s in tries if s.t < first[0] + kit.refuse_s]
    ids = {s.op[1] for s in tries}
    detail = (f"{len(in_window)} attempts in the {kit.refuse_s:.1f} s of refusals "
              f"(at most {MAX_ATTEMPTS}), {len(ids)} id(s), "
              + ("then stored" if ok else "never retried after the refusals ended"))
    return ok and len(ids) == 1 and len(in_window) <= MAX_ATTEMPTS, detail


@client_behaviour("rate-limited", ("backoff-rate-limited", "9.2, 11, 12"))
async def _rate(kit: VendorKit, lk: Link) -> dict[str, tuple[bool, str]]:
    return {"backoff-rate-limited": await _backoff(kit, lk, 400, b"rl-1")}


@client_behaviour("store-failed", ("backoff-store-failed", "9.2, 12"))
async def _store_failed(kit: VendorKit, lk: Link) -> dict[str, tuple[bool, str]]:
    return {"backoff-store-failed": await _backoff(kit, lk, 504, b"sf-1")}


@client_behaviour("v1-tolerance", ("error-op-and-encodings", "8.2 ERROR, 13"))
async def _tolerance(kit: VendorKit, lk: Link) -> dict[str, tuple[bool, str]]:
    # v1 links never see unknown relay ops (14); what a v1 client must take is an
    # ERROR that leaves the link open and any valid integer encoding
    m = kit.msg(b"echo:v1-1")
    kit.deliver(lk, [m], before=[pack([ERROR, 101, "unknown op"])], wide_seq=True)
    ok = await kit.until(lambda: any(s.link == lk.no for s in _echoes(kit, m.body)))
    same = lk.open and kit.link is lk
    return {"error-op-and-encodings": (ok and same, "kept the link and processed a DELIVER "
                                       "with a uint64 seq after an ERROR" if ok and same else
                                       "the DELIVER after an ERROR was not processed on the "
                                       "same link")}


@client_behaviour("shutdown", ("backoff-shutting-down", "10.4"))
async def _shutdown(kit: VendorKit, lk: Link) -> dict[str, tuple[bool, str]]:
    kit.mode = "shutdown"
    t0 = kit.now()
    lk.side.send([pack([21, 503, "shutting down"])])
    await asyncio.sleep(0.01)
    kit.drop(lk)
    await asyncio.sleep(kit.shutdown_s)
    kit.mode = "normal"
    tries = [t for t in kit.accepts if t >= t0]
    back = await kit.next_link(lk.no, kit.timeout)
    ok = back is not None and len(tries) <= MAX_ATTEMPTS
    return {"backoff-shutting-down": (ok, f"{len(tries)} connection attempts in the "
                                          f"{kit.shutdown_s:.1f} s the relay was stopping "
                                          f"(at most {MAX_ATTEMPTS}); "
                                          + ("reconnected after" if back else "never came back"))}


def _keys_ops(kit: VendorKit, opcode: int, after: int = 0) -> list[Seen]:
    return [s for s in kit.log[after:] if isinstance(s.op, list) and s.op
            and s.op[0] == opcode and _op_problem(s.op) is None]


@client_behaviour("keys", ("key-publishing", "17.3, 15.11"), ("pool-top-up", "17.3, 17.7, 15.11"))
async def _keys(kit: VendorKit, lk: Link) -> dict[str, tuple[bool | None, str]]:
    # a client that negotiated "e2ee" publishes its keys (KEYS_SET, then both
    # one-time pools with KEYS_ADD) and tops a pool up when EVENT 1 says it runs low
    if "e2ee" not in lk.features:
        na = 'the client did not negotiate "e2ee"'
        return {"key-publishing": (None, na), "pool-top-up": (None, na)}

    def published() -> bool:
        sets = _keys_ops(kit, KEYS_SET)
        return bool(sets) and {s.op[2] for s in _keys_ops(kit, KEYS_ADD)
                               if s.t >= sets[0].t} >= {0, 1}
    ok = await kit.until(published)
    sets, adds = _keys_ops(kit, KEYS_SET), _keys_ops(kit, KEYS_ADD)
    early = [s for s in adds if sets and s.t < sets[0].t]
    pub = ok and not early
    counts = {k: sum(len(s.op[3]) for s in adds if s.op[2] == k) for k in (0, 1)}
    res: dict[str, tuple[bool | None, str]] = {"key-publishing": (pub, (
        f"KEYS_SET, then {counts[0]} one-time EC and {counts[1]} KEM prekeys" if pub else
        "KEYS_ADD before KEYS_SET" if early else
        "no KEYS_SET" if not sets else "not both one-time pools filled after KEYS_SET"))}
    used = {k[0] for s in adds for k in s.op[3] if isinstance(k, list) and k}
    mark = len(kit.log)
    seq = kit.next_seq(lk, EVENT)
    lk.side.send([pack([EVENT, seq, 1, os.urandom(16), pack([0, 3]),
                        int(time.time() * 1000), 0])])

    def topped() -> list[Seen]:
        return [s for s in _keys_ops(kit, KEYS_ADD, mark) if s.op[2] == 0 and s.op[3]]
    got = await kit.until(lambda: bool(topped()))
    acked = await kit.until(lambda: any(d.op[1] >= seq for d in kit.dacks(lk.no)))
    new = [k for s in topped() for k in s.op[3] if isinstance(k, list) and k]
    reused = [k[0] for k in new if k[0] in used]
    ok = got and acked and not reused
    res["pool-top-up"] = (ok, (
        f"EVENT 1 (EC pool, 3 left): {len(new)} new EC prekeys, the event acked" if ok else
        "after EVENT 1: " + ", ".join(w for w, bad in (
            ("no KEYS_ADD for the EC pool", not got), ("the event never acked", not acked),
            (f"key ids reused {reused[:3]}", bool(reused))) if bad)))
    return res


@client_behaviour("mismatch", ("mismatch-refresh-resend", "17.4, 17.5, 15.11"))
async def _mismatch(kit: VendorKit, lk: Link) -> dict[str, tuple[bool | None, str]]:
    # 17.5: on DEVICE_MISMATCH the sender refreshes (DEVICES / BUNDLES) and
    # resends with the same id, to exactly the current devices
    if "e2ee" not in lk.features:
        return {"mismatch-refresh-resend": (None, 'the client did not negotiate "e2ee"')}
    kit.peer_devices = {1: 111, 2: 222}
    kit.deliver(lk, [kit.msg(b"dsend:warm-up")])
    if not await kit.until(lambda: any(c == 0 for _, _, c in kit.dsends)):
        return {"mismatch-refresh-resend": (False, "no accepted DSEND for a dsend: message "
                                                   "(the adapter contract, step 3)")}
    # device 1 re-created, 2 gone, 3 new: stale [1], extra [2], missing [3]
    kit.peer_devices = {1: 112, 3: 333}
    mark, n = len(kit.log), len(kit.dsends)
    kit.deliver(lk, [kit.msg(b"dsend:after-change")])
    await kit.until(lambda: any(c == 0 for _, _, c in kit.dsends[n:]))
    tries = kit.dsends[n:]
    refused = [cid for cid, _, c in tries if c == 306]
    done = [(cid, given) for cid, given, c in tries if c == 0]
    refresh = [s for s in kit.log[mark:] if isinstance(s.op, list) and s.op
               and s.op[0] in (DEVICES, BUNDLES)]
    problems = []
    if not refused:
        problems.append("the first DSEND after the change was not refused (kit error)")
    if not done:
        problems.append("no DSEND accepted after the DEVICE_MISMATCH")
    elif refused and done[0][0] != refused[0]:
        problems.append("resent with a new id")
    if not refresh:
        problems.append("no DEVICES or BUNDLES between the refusal and the resend")
    if len(tries) > 4:
        problems.append(f"{len(tries)} DSENDs for one message")
    return {"mismatch-refresh-resend": (not problems, "; ".join(problems) or (
        f"DEVICE_MISMATCH, then {len(refresh)} refresh request(s) and the same id "
        "to exactly the current devices"))}


@client_behaviour("unknown-op", ("unknown-relay-op", "14.3, 15.10, 15.11"))
async def _unknown_op(kit: VendorKit, lk: Link) -> dict[str, tuple[bool | None, str]]:
    # 14.3: an op a client cannot read reaches it only on a link that negotiated a
    # feature, and is acked by its seq like any delivery; the link goes on
    if not lk.features:
        return {"unknown-relay-op": (None, "the client negotiated no feature: the kit "
                                           "sends unknown ops only on negotiated links")}
    seq = kit.next_seq(lk, UNREGISTERED_OP)
    unknown = pack([UNREGISTERED_OP, seq, os.urandom(16), b"future", 0])
    m = kit.msg(b"echo:after-unknown")
    (s2,) = kit.deliver(lk, [m], before=[unknown])
    echoed = await kit.until(lambda: any(s.link == lk.no for s in _echoes(kit, m.body)))
    acked = await kit.until(lambda: any(d.op[1] >= s2 for d in kit.dacks(lk.no)))
    same = lk.open and kit.link is lk
    ok = echoed and acked and same
    return {"unknown-relay-op": (ok, (
        f"skipped opcode {UNREGISTERED_OP} (seq {seq}), acked past it and went on"
        if ok else "after an unknown op on a negotiated link: " + ", ".join(
            w for w, bad in (("no echo of the next DELIVER", not echoed),
                             ("its seq never acked", not acked),
                             ("the link was dropped", not same)) if bad)))}


GROUP_X, GROUP_Y = "x@conformance-kit", "y@conformance-kit"


def _gevent(kind: int, data: list) -> Msg:
    return Msg("", os.urandom(16), pack(data), opcode=GEVENT, kind=kind)


@client_behaviour("group-events", ("group-events", "18.6, 8.1 DACK, 15.11"))
async def _group_events(kit: VendorKit, lk: Link) -> dict[str, tuple[bool | None, str]]:
    # 18.6: a member applies its group's GEVENTs in the order of the stream (the
    # order of the changes) and acks them like messages; the adapter reports the
    # state it holds when asked with "group:<id>" (CONFORMANCE.md, the contract)
    if "groups" not in lk.features:
        return {"group-events": (None, 'the client did not negotiate "groups"')}
    gid = os.urandom(16)
    script = [(5, [gid, 2, PEER, ADDRESS]), (5, [gid, 3, PEER, GROUP_X]),
              (9, [gid, 4, GROUP_X, 1, 111]), (6, [gid, 5, PEER, GROUP_X]),
              (2, [gid, 5, PEER, GROUP_Y]), (3, [gid, 6, GROUP_Y]),
              (8, [gid, 6, PEER, GROUP_Y, True])]
    want = [6, sorted([ADDRESS, GROUP_Y]), [GROUP_Y]]
    kit.group_state[gid] = (6, {ADDRESS, GROUP_Y}, {GROUP_Y})
    events = [_gevent(kind, data) for kind, data in script]
    seqs = kit.deliver(lk, events[:4]) + kit.deliver(lk, events[4:])  # across two frames
    ask = kit.msg(b"group:" + gid)
    kit.deliver(lk, [ask])

    def answers() -> list[Seen]:
        return [s for s in kit.sends(b"group=") if s.link == lk.no]
    got = await kit.until(lambda: bool(answers()))
    acked = await kit.until(lambda: any(d.op[1] >= seqs[-1] for d in kit.dacks(lk.no)))
    state = None
    if got:
        try:
            state = msgpack.unpackb(answers()[0].op[3][6:], raw=False)
        except Exception:  # noqa: BLE001 - graded as a wrong answer
            state = "not msgpack"
    problems = []
    if not got:
        problems.append("no group= answer to group:<id>")
    elif state != want:
        problems.append(f"state {state!r:.120} instead of {want!r} (the events applied "
                        "out of order, or not all of them)")
    if not acked:
        problems.append("the GEVENTs were never acked")
    return {"group-events": (not problems, "; ".join(problems) or (
        f"{len(events)} GEVENTs over two frames applied in order (version 6, "
        "members and admins as the events say) and acked"))}


@client_behaviour("feature-deliveries",
                  ("feature-acks-only-taken", "8.1 DACK, 17.6, 18.5, 15.7"),
                  ("feature-dedup", "9.2, 17.6, 18.5, 15.7"))
async def _feature_deliveries(kit: VendorKit, lk: Link) -> dict[str, tuple[bool | None, str]]:
    # DDELIVER (17.6) and GDELIVER (18.5) are deliveries like DELIVER: acked only
    # once the application took them, processed once per (from, id)
    if "e2ee" not in lk.features:
        na = 'the client did not negotiate "e2ee"'
        return {"feature-acks-only-taken": (None, na), "feature-dedup": (None, na)}
    takes = [Msg(PEER, os.urandom(16), b"echo:fd-1", opcode=DDELIVER, device=2)]
    if "groups" in lk.features:
        takes.append(Msg(PEER, os.urandom(16), b"echo:fg-1", opcode=GDELIVER, device=2,
                         group=os.urandom(16)))
    kinds = " and ".join(("DDELIVER", "GDELIVER")[:len(takes)])
    t0 = kit.now()
    kit.deliver(lk, [kit.msg(b"pause:%d" % int(kit.pause_s * 1000)), *takes])
    taken_at = t0 + kit.pause_s
    bad = await _taken_then_acked(kit, lk, takes, taken_at, kinds)
    res: dict[str, tuple[bool | None, str]] = {"feature-acks-only-taken": (
        not bad, "; ".join(bad[:3]) or f"{kinds} acked only once the application took them")}
    # the same (from, id) again, then a marker in a frame of its own
    dups = kit.deliver(lk, takes)
    marker = kit.msg(b"echo:fd-marker")
    (s3,) = kit.deliver(lk, [marker])
    await kit.until(lambda: bool(_echoes(kit, marker.body))
                    and any(d.op[1] >= s3 for d in kit.dacks(lk.no)))
    times = [len({s.op[1] for s in _echoes(kit, m.body)}) for m in takes]
    dup_acked = any(d.op[1] >= max(dups) for d in kit.dacks(lk.no))
    ok = times == [1] * len(takes) and dup_acked
    res["feature-dedup"] = (ok, f"redelivered {kinds} processed {times} time(s); the "
                                f"duplicates {'acked' if dup_acked else 'never acked'}")
    return res


@client_behaviour("bye", ("no-ops-after-bye", "8.1 BYE, 10.4, 15.9"))
async def _bye(kit: VendorKit, lk: Link) -> dict[str, tuple[bool, str]]:
    kit.deliver(lk, [kit.msg(b"bye")])
    got = await kit.until(lambda: lk.bye_at is not None)
    if not got:
        return {"no-ops-after-bye": (False, "the client never sent BYE")}
    await kit.until(lambda: not lk.open, 2.0)
    n_links = len(kit.links)
    t_closed = kit.now()
    await asyncio.sleep(0.6)
    after = [s for s in kit.log if s.link == lk.no and s.after_bye]
    again = [t for t in kit.accepts if t > t_closed]
    problems = []
    if after:
        problems.append(f"{len(after)} op(s) after BYE (first: opcode "
                        f"{after[0].op[0] if isinstance(after[0].op, list) else '?'})")
    if again or len(kit.links) > n_links:
        problems.append("reconnected after its own BYE")
    return {"no-ops-after-bye": (not problems, "; ".join(problems) or
                                 "nothing after BYE, no reconnection")}


@client_behaviour("wire", ("well-formed-ops", "7, 8.1, 13"), live=False)
async def _wire(kit: VendorKit, lk: Link | None) -> dict[str, tuple[bool, str]]:
    bad = [(s.link, _op_problem(s.op)) for s in kit.log]
    bad = [(no, why) for no, why in bad if why is not None]
    n = len(kit.log)
    return {"well-formed-ops": (not bad and n > 0, (
        f"{len(bad)} of {n} ops malformed, e.g. link {bad[0][0]}: {bad[0][1]}" if bad else
        f"all {n} ops the client sent were well formed" if n else "the client sent no op"))}


def main_vendor(args: Any) -> int:
    """``fastroute conformance --listen``: run the kit and report (the
    arguments checked by :func:`fastroute.conformance.cli.cmd_conformance`)."""
    from ..config import parse_hostport
    from .framework import write_json

    host, port = parse_hostport(args.listen)
    kit = VendorKit(host, port, args.out_dir, connect_timeout=args.wait)
    report = asyncio.run(kit.run(client_cmd=args.client_cmd, only=args.only))
    print(render_grades(report))
    if args.json:
        write_json(args.json, report)
    sys.stdout.flush()
    return 0 if report["passed"] else 1

