"""Direction 1: prove a relay gives a home-provider client and a third-party
client the same checks.

Every check below runs twice, once with a *subject* device of the home
provider and once with one of the third-party provider (the *other*
provider is then the home one).  Each run yields an :class:`Outcome`; the
report puts the two side by side.  A check fails when it fails on its own
against ``docs/PROTOCOL.md``, or when the two columns observed different
things, unless the difference is explained by the two providers' enrolled
policy (``fastroute provider add --max-body/--max-msgs-per-s/...``) on a
key the check declares.

Everything is written from the spec: raw Noise, raw msgpack ops
(:mod:`fastroute.conformance.link`); the relay's internals are not used.
The only operator actions are the documented ones on the relay's data
directory (enrolling the two test providers, revoking a test device).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from ..identity import ProviderKey, Registry
from ..noise import KeyPair
from .framework import FAIL, NA, PASS, RELAY_CHECKS, CheckFailed, Outcome, outcome_dict, relay_check
from .link import (BLOCK, BLOCKS, BUNDLES, BYE, CONSENT, DACK, DDELIVER, DELIVER, DEVICES,
                   DSEND, ERROR, EVENT, FEATURES, FEATURES_OK, GADD, GADMIN, GANSWER, GCREATE,
                   GDELIVER, GEVENT, GLEAVE, GMEMBERS, GREMOVE, GSEND, KEYS_ADD, KEYS_SET,
                   MBEGIN, MCHUNK, MFINISH, MGET, MREPLY, PING, PONG, REPLY, REPORT, SACK, SEND,
                   SERVER_BYE, WELCOME, Closed, RawLink, frame_of, pack)

__all__ = ["ProviderSetup", "RelayTarget", "run_relay_suite", "render_table"]

CRED_DOMAIN = b"fastroute/cred/1\x00"  # section 6.1
PROTOCOL_MAX_BODY = 61440  # section 11


@dataclass
class ProviderSetup:
    """One test provider: its name, signing key and enrolled policy."""

    name: str
    key: ProviderKey
    policy: dict[str, Any]


@dataclass
class RelayTarget:
    """What the kit knows about the relay under test."""

    host: str
    port: int
    server_key: bytes
    registry_path: str | None = None  # the data dir's registry, for revocations
    relay_max_body: int = PROTOCOL_MAX_BODY
    rate_probe: int = 25000
    ops_probe: int = 48000  # PINGs sent to find the op budget (default burst 20000)
    bundle_probe: int = 260  # BUNDLES sent to find the fetch limit (default burst 200)
    sender_probe: int = 60  # strangers written to for the new-sender rule (default 20)
    quarantine_probe: int = 260  # ... to be quarantined (default score 200)
    report_probe: int = 20  # reporters of one provider (default cap 15 per provider)
    backlog_probe: int = 1000  # persistent SENDs to one address to reach a backlog cap
    timeout: float = 3.0


def make_credential(key: ProviderKey, provider: str, address: str, device: str,
                    static_pub: bytes, issued_at: int, expires_at: int) -> bytes:
    """A credential built from section 6.1 (so invalid ones can be built too)."""
    body = pack([1, provider, address, device, static_pub, issued_at, expires_at])
    return pack([body, key.sign(CRED_DOMAIN + body)])


def hello(cred: Any, v: Any = 1, **extra: Any) -> bytes:
    """A client hello (section 5); ``cred`` may be of any type, to provoke errors."""
    return pack({"v": v, "cred": cred, **extra})


class Subject:
    """One column: a device of ``me`` facing users of ``me`` and of ``other``."""

    def __init__(self, target: RelayTarget, me: ProviderSetup, other: ProviderSetup,
                 column: str) -> None:
        self.t = target
        self.me = me
        self.other = other
        self.column = column
        self._links: list[RawLink] = []

    def fresh(self, tag: str, provider: str | None = None) -> str:
        """A new address of ``provider`` (default: the subject's)."""
        return f"{tag}-{os.urandom(5).hex()}@{provider or self.me.name}"

    def credential(self, address: str, device: str, static: KeyPair, *,
                   key: ProviderKey | None = None, provider: str | None = None,
                   issued_at: int | None = None, expires_at: int | None = None) -> bytes:
        """A valid credential unless told otherwise."""
        prov = provider or address.split("@", 1)[1]
        if key is None:
            key = self.me.key if prov == self.me.name else self.other.key
        now = int(time.time())
        issued = now - 60 if issued_at is None else issued_at
        return make_credential(key, prov, address, device, static.public, issued,
                               now + 3600 if expires_at is None else expires_at)

    async def raw(self, hello_payload: bytes, static: KeyPair, **kw: Any) -> RawLink:
        """Open a link with the given client hello (no WELCOME awaited)."""
        link = await RawLink.open(self.t.host, self.t.port, static, hello_payload,
                                  timeout=self.t.timeout, **kw)
        self._links.append(link)
        return link

    async def connect(self, address: str, device: str = "d1",
                      static: KeyPair | None = None) -> RawLink:
        """A device online (WELCOME received), or :class:`CheckFailed`."""
        kp = static or KeyPair.generate()
        link = await self.raw(hello(self.credential(address, device, kp)), kp)
        w = await link.wait(lambda o: o[0] in (WELCOME, 21), self.t.timeout)
        if w is None or w[0] != WELCOME:
            raise CheckFailed(f"no WELCOME for a valid credential (got {w!r})")
        return link

    async def refusal(self, hello_payload: bytes, static: KeyPair) -> str:
        """How the relay answers a handshake: ``"BYE <code>"``, ``"silent close"``, ..."""
        try:
            link = await self.raw(hello_payload, static)
        except Closed:
            return "closed before msg2"
        op = await link.wait(lambda o: o[0] in (WELCOME, 21), self.t.timeout)
        if op is None:
            return "silent close" if link.silent else "no answer"
        if op[0] == WELCOME:
            return "WELCOME"
        closed = await link.until_closed(self.t.timeout)
        return f"BYE {op[1]}" + ("" if closed else " (link left open)")

    async def known(self, provider: str | None = None) -> str:
        """An address the relay knows (a device connected once), now offline."""
        addr = self.fresh("known", provider)
        link = await self.connect(addr)
        await link.close()
        return addr

    async def sack(self, link: RawLink, cid: bytes, timeout: float | None = None,
                   after: int = 0) -> int | None:
        """The code of the SACK for ``cid`` (the first from op index ``after``), or None."""
        op = await link.op(SACK, cid, timeout=timeout or self.t.timeout, after=after)
        return None if op is None else op[2]

    async def close_all(self) -> None:
        """Drop every link the check opened."""
        await asyncio.gather(*(link.close() for link in self._links), return_exceptions=True)
        self._links.clear()

    def registry(self) -> Registry:
        """The relay's registry (only for checks marked ``needs_registry``)."""
        assert self.t.registry_path is not None
        return Registry(self.t.registry_path)


def new_id() -> bytes:
    """16 random bytes: a message or request id."""
    return os.urandom(16)


def expect(observed: str, wanted: str, detail: str = "") -> Outcome:
    """Pass when ``observed == wanted``."""
    ok = observed == wanted
    return Outcome(PASS if ok else FAIL, observed,
                   detail or ("" if ok else f"expected {wanted}"))


# ----------------------------------------------------- handshake, credentials
@relay_check("handshake.welcome", "2, 5, 8.2")
async def _welcome(s: Subject) -> Outcome:
    """A valid credential gets a strict server hello and a WELCOME naming the device."""
    addr = s.fresh("u")
    kp = KeyPair.generate()
    link = await s.raw(hello(s.credential(addr, "phone-1", kp)), kp)
    w = await link.op(WELCOME, timeout=s.t.timeout)
    sh = link.server_hello
    hello_ok = (isinstance(sh, dict) and set(sh) == {"v", "t"} and sh["v"] == 1
                and type(sh["t"]) is int and sh["t"] >= 0)
    ok = (w is not None and w[1:3] == [addr, "phone-1"] and type(w[3]) is int and hello_ok)
    return Outcome(PASS if ok else FAIL, "WELCOME" if ok else f"{w!r}/{sh!r}")


@relay_check("handshake.pinned-key", "4.2")
async def _pinned(s: Subject) -> Outcome:
    """The relay's static key is the pinned one."""
    link = await s.connect(s.fresh("u"))
    ok = link.remote_static == s.t.server_key
    return Outcome(PASS if ok else FAIL, "pinned key" if ok else "other key")


@relay_check("handshake.tampered-msg3", "4.4")
async def _tampered(s: Subject) -> Outcome:
    """A msg3 that does not authenticate is closed without a byte."""
    kp = KeyPair.generate()
    link = await s.raw(hello(s.credential(s.fresh("u"), "d1", kp)), kp, msg3_tamper=True)
    closed = await link.until_closed(s.t.timeout)
    return expect("silent close" if closed and link.silent else "answered", "silent close")


def _refusal_check(name: str, section: str, wanted: str, build):
    async def check(s: Subject) -> Outcome:
        kp = KeyPair.generate()
        return expect(await s.refusal(build(s, kp), kp), wanted)
    check.__doc__ = f"refused with {wanted} (section {section})"
    relay_check(name, section)(check)


_refusal_check("hello.version", "5", "BYE 102",
               lambda s, kp: hello(s.credential(s.fresh("u"), "d1", kp), v=2))
_refusal_check("hello.unknown-key", "5", "BYE 102",
               lambda s, kp: hello(s.credential(s.fresh("u"), "d1", kp), x=1))
_refusal_check("hello.cred-not-bin", "6.3 #0", "BYE 102",
               lambda s, kp: pack({"v": 1, "cred": "not bin"}))
_refusal_check("credential.malformed", "6.3 #1a", "BYE 100",
               lambda s, kp: hello(pack([1, 2, 3])))
_refusal_check("credential.unknown-provider", "6.3 #2", "BYE 201",
               lambda s, kp: hello(make_credential(
                   s.me.key, "not-enrolled-" + os.urandom(3).hex(),
                   "u@x", "d1", kp.public, int(time.time()) - 60, int(time.time()) + 60)))
_refusal_check("credential.bad-signature", "6.3 #4", "BYE 202",
               lambda s, kp: hello(s.credential(s.fresh("u"), "d1", kp,
                                                key=ProviderKey.generate())))


def _address_elsewhere(s: Subject, kp: KeyPair) -> bytes:
    # signed by the subject's provider for an address of the other provider
    now = int(time.time())
    return hello(make_credential(s.me.key, s.me.name, s.fresh("u", s.other.name), "d1",
                                 kp.public, now - 60, now + 3600))


_refusal_check("credential.address-provider", "6.3 #5", "BYE 200", _address_elsewhere)
_refusal_check("credential.key-mismatch", "6.3 #6", "BYE 203",
               lambda s, kp: hello(s.credential(s.fresh("u"), "d1", KeyPair.generate())))
_refusal_check("credential.expired", "6.3 #7a", "BYE 204",
               lambda s, kp: hello(s.credential(s.fresh("u"), "d1", kp,
                                                issued_at=int(time.time()) - 7200,
                                                expires_at=int(time.time()) - 3600)))
_refusal_check("credential.issued-in-future", "6.3 #7b", "BYE 110",
               lambda s, kp: hello(s.credential(s.fresh("u"), "d1", kp,
                                                issued_at=int(time.time()) + 3600,
                                                expires_at=int(time.time()) + 7200)))


@relay_check("credential.revoked-device", "6.3 #8, 10.4", needs_registry=True)
async def _revoked(s: Subject) -> Outcome:
    """A revoked device is refused at the handshake, and a live link of it is closed."""
    addr = s.fresh("u")
    kp = KeyPair.generate()
    live = await s.connect(addr, "d1", kp)
    with s.registry() as reg:
        reg.revoke_device(addr, "d1")
    closed = await live.until_closed(5.0)
    live_seen = f"live: BYE {live.bye[0]}" if closed and live.bye else "live: not closed"
    again = await s.refusal(hello(s.credential(addr, "d1", kp)), kp)
    return expect(f"{live_seen}; reconnect: {again}", "live: BYE 205; reconnect: BYE 205")


@relay_check("session.replaced", "6.3")
async def _replaced(s: Subject) -> Outcome:
    """A newer connection of the same device closes the older one with 206."""
    addr = s.fresh("u")
    kp = KeyPair.generate()
    old = await s.connect(addr, "d1", kp)
    await s.connect(addr, "d1", kp)
    closed = await old.until_closed(s.t.timeout)
    return expect(f"BYE {old.bye[0]}" if closed and old.bye else "old link kept", "BYE 206")


# ------------------------------------------------------------ op validation
def _op_check(name: str, section: str, wanted: str, frame_ops, answer):
    """An op-level check: send ``frame_ops(addr)``, read the answer ``answer(link, ids)``."""
    async def check(s: Subject) -> Outcome:
        link = await s.connect(s.fresh("u"))
        ops, key = frame_ops(s, link)
        if isinstance(ops, bytes):
            link.send_plain(ops)
        else:
            link.send(*ops)
        return expect(await answer(s, link, key), wanted)
    check.__doc__ = f"answered {wanted} (section {section})"
    relay_check(name, section)(check)


async def _sack_of(s: Subject, link: RawLink, cid: bytes) -> str:
    code = await s.sack(link, cid)
    return "no SACK" if code is None else f"SACK {code}"


async def _error_of(s: Subject, link: RawLink, _key: Any) -> str:
    op = await link.op(ERROR, timeout=s.t.timeout)
    return "no ERROR" if op is None else f"ERROR {op[1]}"


_ID = b"\x11" * 16
_op_check("send.wrong-arity", "10.2", "SACK 100",
          lambda s, link: ([[SEND, _ID, s.fresh("x"), b"b"]], _ID), _sack_of)
_op_check("send.bad-cls", "8.1, 10.2", "SACK 102",
          lambda s, link: ([[SEND, _ID, s.fresh("x"), b"b", 2]], _ID), _sack_of)
_op_check("send.bad-address", "8.1, 10.2", "SACK 102",
          lambda s, link: ([[SEND, _ID, "no-at-sign", b"b", 0]], _ID), _sack_of)
_op_check("send.body-over-protocol-limit", "10.2, 11", "SACK 401",
          lambda s, link: ([[SEND, _ID, s.fresh("x"), bytes(PROTOCOL_MAX_BODY + 1), 0]], _ID),
          _sack_of)
_op_check("send.no-usable-id", "10.2", "ERROR 102",
          lambda s, link: ([[SEND, b"short", s.fresh("x"), b"b", 0]], None), _error_of)
_op_check("op.unknown-client-opcode", "10.2, 14", "ERROR 101",
          lambda s, link: ([[15, 1]], None), _error_of)
_op_check("op.relay-opcode-from-client", "7, 10.2", "ERROR 101",
          lambda s, link: ([[SACK, _ID, 0]], None), _error_of)
_op_check("op.not-an-array", "10.2", "ERROR 100",
          lambda s, link: ([7], None), _error_of)
_op_check("dack.bad-field", "10.2", "ERROR 102",
          lambda s, link: ([[DACK, -1]], None), _error_of)
_op_check("dack.wrong-arity", "10.2", "ERROR 100",
          lambda s, link: ([[DACK]], None), _error_of)
_op_check("ping.bad-field", "10.2", "ERROR 102",
          lambda s, link: ([[PING, "x"]], None), _error_of)
_op_check("bye.wrong-arity", "10.2", "ERROR 100",
          lambda s, link: ([[BYE, 1]], None), _error_of)
_op_check("consent.bad-provider", "8.1 CONSENT, 10.2", "SACK 102",
          lambda s, link: ([[CONSENT, _ID, "Not A Provider", True]], _ID), _sack_of)
_op_check("consent.allow-not-bool", "8.1 CONSENT, 13", "SACK 102",
          lambda s, link: ([[CONSENT, _ID, "*", 1]], _ID), _sack_of)
_op_check("send.body-as-str", "8.1 SEND, 13", "SACK 102",
          lambda s, link: ([[SEND, _ID, s.fresh("x"), "text", 0]], _ID), _sack_of)
_op_check("ping.wrong-arity", "10.2", "ERROR 100",
          lambda s, link: ([[PING]], None), _error_of)


@relay_check("frame.malformed", "8.2 ERROR, 10.2")
async def _bad_frame(s: Subject) -> Outcome:
    """A frame that is not one msgpack array gets ERROR 100 and none of its SENDs is taken."""
    link = await s.connect(s.fresh("u"))
    to = await s.known()
    cid = new_id()
    link.send_plain(frame_of([pack([SEND, cid, to, b"x", 1])]) + b"\xc1")  # trailing byte
    err = await link.op(ERROR, timeout=s.t.timeout)
    sack = await s.sack(link, cid, 0.3)
    return expect(f"{'ERROR %d' % err[1] if err else 'no ERROR'}, "
                  f"{'no SACK' if sack is None else 'SACK'}", "ERROR 100, no SACK")


@relay_check("ping.pong", "8.1 PING")
async def _ping(s: Subject) -> Outcome:
    """PING is answered with PONG carrying the same token, at both ends of its range."""
    link = await s.connect(s.fresh("u"))
    link.send([PING, 2**64 - 1], [PING, -2**63])
    got = [await link.op(PONG, t, timeout=s.t.timeout) for t in (2**64 - 1, -2**63)]
    return expect("PONG x2" if all(got) else f"{got!r}", "PONG x2")


@relay_check("bye.orderly", "8.1 BYE")
async def _bye(s: Subject) -> Outcome:
    """BYE: the SENDs before it are SACKed, what follows it is ignored, then SERVER_BYE 0."""
    link = await s.connect(s.fresh("u"))
    to = s.fresh("peer")
    peer = await s.connect(to)
    before, after = new_id(), new_id()
    link.send([SEND, before, to, b"last", 0], [BYE], [SEND, after, to, b"ignored", 0])
    closed = await link.until_closed(s.t.timeout)
    await asyncio.sleep(0.1)

    def name(op: list) -> str:
        if op[0] == SACK:
            return "SACK" if op[1] == before else "SACK after BYE"
        return f"SERVER_BYE {op[1]}"
    order = [name(o) for o in link.ops if o[0] in (SACK, 21)]
    got = [o[4] for o in peer.ops if o[0] == DELIVER]
    seen = f"{', '.join(order)}; closed={closed}; delivered {got}"
    return expect(seen, f"SACK, SERVER_BYE 0; closed=True; delivered {[b'last']}")


@relay_check("errors.budget", "10.2")
async def _budget(s: Subject) -> Outcome:
    """Protocol errors beyond the budget end the link with SERVER_BYE 100."""
    link = await s.connect(s.fresh("u"))
    link.send(*([[PING, "x"]] * 200))
    closed = await link.until_closed(s.t.timeout)
    n_err = sum(1 for o in link.ops if o[0] == ERROR)
    seen = f"BYE {link.bye[0]}" if closed and link.bye else "not closed"
    out = expect(seen, "BYE 100")
    out.detail = (out.detail + f" after {n_err} ERRORs").strip()
    out.observed += f" after {n_err} ERRORs"
    return out


# ------------------------------------------------------------------- limits
@relay_check("limits.max-body", "8.1 SEND, 11", policy=("max_body",))
async def _max_body(s: Subject) -> Outcome:
    """A body of exactly the sender's limit is taken, one byte more is refused with 401."""
    limit = min(s.t.relay_max_body, s.me.policy.get("max_body") or PROTOCOL_MAX_BODY)
    link = await s.connect(s.fresh("u"))
    to = await s.known()
    a, b = new_id(), new_id()
    link.send([SEND, a, to, bytes(limit), 1])
    link.send([SEND, b, to, bytes(limit + 1), 1])
    seen = f"limit {limit}: {await s.sack(link, a)}, {await s.sack(link, b)}"
    out = expect(seen, f"limit {limit}: 0, 401")
    out.policy = {"max_body": s.me.policy.get("max_body")}
    return out


@relay_check("limits.rate", "8.1 SEND, 11", policy=("msgs_per_s", "bytes_per_s"))
async def _rate(s: Subject) -> Outcome:
    """A burst over the message quota is refused with 400; the same id is taken later."""
    link = await s.connect(s.fresh("u"))
    to = await s.known()
    ids = [new_id() for _ in range(s.t.rate_probe)]
    for i in range(0, len(ids), 500):  # 500 ops of <= 130 bytes fit in a frame
        link.send(*[[SEND, cid, to, b"r", 1] for cid in ids[i:i + 500]])
    last = await s.sack(link, ids[-1], 10.0)
    codes = {o[1]: o[2] for o in link.ops if o[0] == SACK}
    refused = [cid for cid in ids if codes.get(cid) == 400]
    policy = {k: s.me.policy.get(k) for k in ("msgs_per_s", "bytes_per_s")}
    if last is None:
        return Outcome(FAIL, "SACKs missing", f"{len(codes)} of {len(ids)} SACKs", policy)
    if not refused:
        return Outcome(NA, f"no refusal in {len(ids)} sends",
                       "the burst is above --rate-probe", policy)
    others = sorted({c for c in codes.values() if c not in (0, 400)})
    again = None
    for _ in range(30):  # "resend later with the same id" (section 12): it is taken once refilled
        await asyncio.sleep(0.2)
        mark = len(link.ops)
        link.send([SEND, refused[0], to, b"r", 1])
        again = await s.sack(link, refused[0], after=mark)
        if again != 400:
            break
    seen = f"refused 400{' and %s' % others if others else ''}; later same id: {again}"
    return Outcome(PASS if again == 0 and not others else FAIL, seen, "", policy)


# ---------------------------------------------------------- routing, consent
@relay_check("route.unknown-recipient", "8.1 SEND (No enumeration), 9.4")
async def _unknown(s: Subject) -> Outcome:
    """A SEND to an address no device ever used: 300 at the sender's own provider;
    at the other provider the same 402 an existing address that has not opted
    in gets, so that nobody can test whether an address exists."""
    link = await s.connect(s.fresh("u"))
    a, b = new_id(), new_id()
    link.send([SEND, a, s.fresh("nobody"), b"x", 0],
              [SEND, b, s.fresh("nobody", s.other.name), b"x", 0])
    return expect(f"{await s.sack(link, a)}, {await s.sack(link, b)}", "300, 402")


@relay_check("consent", "8.1 CONSENT, 8.1 SEND")
async def _consent(s: Subject) -> Outcome:
    """Cross-provider SENDs need the recipient's opt-in: 402 until CONSENT and after withdrawal."""
    me = await s.connect(s.fresh("u"))
    peer_addr = s.fresh("peer", s.other.name)
    peer = await s.connect(peer_addr)
    same = await s.known()

    async def send(to: str, cid: bytes | None = None) -> int | None:
        cid = cid or new_id()
        mark = len(me.ops)
        me.send([SEND, cid, to, b"c", 0])
        return await s.sack(me, cid, after=mark)

    refused = new_id()
    seq = [await send(peer_addr, refused), await send(same)]
    cid = new_id()
    peer.send([CONSENT, cid, s.me.name, True])
    seq.append(await s.sack(peer, cid))
    # a refused SEND is not remembered (8.1): the same id is taken once allowed
    seq.append(await send(peer_addr, refused))
    got = await peer.op(DELIVER, timeout=s.t.timeout)
    cid = new_id()
    peer.send([CONSENT, cid, s.me.name, False])
    seq.append(await s.sack(peer, cid))
    seq.append(await send(peer_addr))
    seen = ", ".join(map(str, seq)) + (", delivered" if got else ", not delivered")
    if seq[0] == 0 and seq[-1] == 0:
        # a relay configured with require_consent = false (documented, relay-wide)
        return expect(seen, "0, 0, 0, 0, 0, 0, delivered",
                      "the relay does not require consent (require_consent = false)")
    return expect(seen, "402, 0, 0, 0, 0, 402, delivered")


@relay_check("dedup.resend", "9.2")
async def _dedup(s: Subject) -> Outcome:
    """A resent id is SACKed again and not routed twice."""
    me = await s.connect(s.fresh("u"))
    to = s.fresh("peer")
    peer = await s.connect(to)
    cid = new_id()
    me.send([SEND, cid, to, b"once", 0])
    first = await s.sack(me, cid)
    mark = len(me.ops)
    me.send([SEND, cid, to, b"once", 0])
    second = await me.op(SACK, cid, timeout=s.t.timeout, after=mark)
    await asyncio.sleep(0.3)
    n = sum(1 for o in peer.ops if o[0] == DELIVER and o[3] == cid)
    return expect(f"SACK {first}, SACK {second[2] if second else None}, delivered {n}x",
                  "SACK 0, SACK 0, delivered 1x")


@relay_check("delivery.fifo-redelivery", "9.3, 9.5")
async def _fifo(s: Subject) -> Outcome:
    """Messages from the other provider arrive in order; unacked ones are redelivered in order."""
    addr = s.fresh("u")
    kp = KeyPair.generate()
    me = await s.connect(addr, "d1", kp)
    cid = new_id()
    me.send([CONSENT, cid, s.other.name, True])
    await s.sack(me, cid)
    sender = await s.connect(s.fresh("peer", s.other.name))
    ids = [new_id() for _ in range(10)]
    sender.send(*[[SEND, m, addr, b"%d" % i, 0] for i, m in enumerate(ids)])
    await sender.wait(lambda o: sum(1 for x in sender.ops if x[0] == SACK) >= 10, s.t.timeout)
    await me.wait(lambda o: sum(1 for x in me.ops if x[0] == DELIVER) >= 10, s.t.timeout)
    first = [o for o in me.ops if o[0] == DELIVER]
    order1 = [ids.index(o[3]) for o in first if o[3] in ids]
    me.send([DACK, first[3][1]] if len(first) > 3 else [DACK, 0])
    await asyncio.sleep(0.1)
    await me.close()
    again = await s.connect(addr, "d1", kp)
    await again.wait(lambda o: sum(1 for x in again.ops if x[0] == DELIVER) >= 6, s.t.timeout)
    await asyncio.sleep(0.1)
    second = [o for o in again.ops if o[0] == DELIVER]
    order2 = [ids.index(o[3]) for o in second if o[3] in ids]
    seqs = [o[1] for o in second]
    return expect(f"first {order1}; after reconnect {order2} seq {seqs}",
                  f"first {list(range(10))}; after reconnect {list(range(4, 10))} "
                  f"seq {list(range(1, 7))}")


@relay_check("ephemeral.offline-dropped", "7 classes, 9.4")
async def _ephemeral(s: Subject) -> Outcome:
    """An ephemeral SEND to a known offline address is accepted and never delivered."""
    addr = s.fresh("u")
    kp = KeyPair.generate()
    first = await s.connect(addr, "d1", kp)
    await first.close()
    me = await s.connect(s.fresh("u"))
    cid = new_id()
    me.send([SEND, cid, addr, b"typing", 1])
    code = await s.sack(me, cid)
    back = await s.connect(addr, "d1", kp)
    got = await back.op(DELIVER, timeout=0.4)
    return expect(f"SACK {code}, {'delivered' if got else 'dropped'}", "SACK 0, dropped")


# -------------------------------------------------------------------- media

async def _media_request(s: Subject, link: Any, *op: Any) -> list:
    """Send one media request (its id added after the opcode) and return its MREPLY."""
    rid = new_id()
    link.send([op[0], rid, *op[1:]])
    rep = await link.op(MREPLY, rid, timeout=s.t.timeout)
    if rep is None:
        raise CheckFailed(f"no MREPLY to opcode {op[0]}")
    return rep


@relay_check("media.roundtrip", "8.1 Media")
async def _media(s: Subject) -> Outcome:
    """A blob uploads with MBEGIN/MCHUNK/MFINISH and comes back whole with MGET."""
    link = await s.connect(s.fresh("u"))
    blob = os.urandom(3000)
    digest = hashlib.sha256(blob).digest()

    async def call(*op: Any) -> list:
        return await _media_request(s, link, *op)

    rep = await call(MBEGIN, len(blob), digest)
    if rep[2] != 0:
        return Outcome(FAIL, f"MBEGIN {rep[2]}")
    upload, chunk = rep[3]
    codes = []
    for i in range(0, len(blob), chunk):
        codes.append((await call(MCHUNK, upload, i // chunk, blob[i:i + chunk]))[2])
    fin = await call(MFINISH, upload)
    got = await call(MGET, digest, 0)
    ok_data = got[2] == 0 and got[3][0] == len(blob)
    return expect(f"chunks {set(codes)}, finish {fin[2]} id ok={fin[3] == digest}, "
                  f"get {got[2]} size ok={ok_data}",
                  "chunks {0}, finish 0 id ok=True, get 0 size ok=True")


@relay_check("media.codes", "8.1 Media, 12")
async def _media_codes(s: Subject) -> Outcome:
    """Media refusals: unknown blob 304, unknown upload 305, oversized 401."""
    link = await s.connect(s.fresh("u"))
    reqs = {"mget": [MGET, new_id(), os.urandom(32), 0],
            "mchunk": [MCHUNK, new_id(), os.urandom(16), 0, b"x"],
            "mfinish": [MFINISH, new_id(), os.urandom(16)],
            "mbegin-huge": [MBEGIN, new_id(), 2**50, os.urandom(32)]}
    link.send(*reqs.values())
    out = []
    for name, op in reqs.items():
        rep = await link.op(MREPLY, op[1], timeout=s.t.timeout)
        out.append(f"{name} {rep[2] if rep else None}")
    return expect(", ".join(out), "mget 304, mchunk 305, mfinish 305, mbegin-huge 401")


@relay_check("media.upload-refusals", "8.1 Media, 12")
async def _media_refusals(s: Subject) -> Outcome:
    """Upload refusals in turn: short chunk 112, early finish 114, wrong hash 113, then 305."""
    link = await s.connect(s.fresh("u"))

    async def call(*op: Any) -> list:
        return await _media_request(s, link, *op)

    blob = os.urandom(100)
    rep = await call(MBEGIN, len(blob), hashlib.sha256(b"other bytes").digest())
    if rep[2] != 0 or rep[3][1] < len(blob):
        return Outcome(FAIL, f"MBEGIN {rep[2]} {rep[3]!r}")
    upload = rep[3][0]
    codes = [(await call(MCHUNK, upload, 0, blob[:-1]))[2],  # the only chunk is 100 bytes
             (await call(MFINISH, upload))[2],  # before every chunk arrived
             (await call(MCHUNK, upload, 0, blob))[2],
             (await call(MFINISH, upload))[2],  # the declared hash is not the content's
             (await call(MFINISH, upload))[2]]  # a mismatch discards the upload
    return expect(", ".join(map(str, codes)), "112, 114, 0, 113, 305")


# ------------------------------------------- features and "e2ee" (14, 17)
async def e2ee_link(s: Subject, address: str, device: str = "d1",
                    features: tuple[str, ...] = ("e2ee",),
                    static: KeyPair | None = None) -> RawLink:
    """A device online with ``features`` granted: FEATURES in its first frame (14.2)."""
    kp = static or KeyPair.generate()
    link = await s.raw(hello(s.credential(address, device, kp)), kp)
    fid = new_id()
    link.send([FEATURES, fid, list(features)])  # pipelined right after msg3
    w = await link.wait(lambda o: o[0] in (WELCOME, SERVER_BYE), s.t.timeout)
    if w is None or w[0] != WELCOME:
        raise CheckFailed(f"no WELCOME for a valid credential (got {w!r})")
    ok = await link.op(FEATURES_OK, fid, timeout=s.t.timeout)
    if ok is None or not set(features) <= set(ok[2]):
        raise CheckFailed(f"features {list(features)} not granted (got {ok!r})")
    return link


async def request(s: Subject, link: RawLink, opcode: int, *fields: Any,
                  rid: bytes | None = None) -> tuple[int, Any]:
    """Send one request of feature "e2ee" (id ``rid``, default a fresh one) and gather
    its REPLY parts (17.2): ``(code, result)``, array results of several parts concatenated."""
    rid = rid or new_id()
    mark = len(link.ops)
    link.send([opcode, rid, *fields])
    last = await link.wait(lambda o: o[0] == REPLY and o[1] == rid and o[3] is True,
                           s.t.timeout, after=mark)
    if last is None:
        raise CheckFailed(f"no final REPLY to op {opcode}")
    parts = [o for o in link.ops[mark:] if isinstance(o, list) and o[:2] == [REPLY, rid]]
    if len(parts) == 1:
        return last[2], last[4]
    return last[2], [x for p in parts for x in (p[4] or [])]


def key_set(reg_id: int) -> list:
    """KEYS_SET fields (17.3) with random key material of libsignal's sizes."""
    return [reg_id, b"\x05" + os.urandom(32), [7, b"\x05" + os.urandom(32), os.urandom(64)],
            [9, os.urandom(1569), os.urandom(64)], False]


async def publish(s: Subject, link: RawLink, reg_id: int) -> tuple[int, list]:
    """KEYS_SET on ``link``: the device id it was given and the fields sent."""
    fields = key_set(reg_id)
    code, dev = await request(s, link, KEYS_SET, *fields)
    if code != 0 or type(dev) is not int:
        raise CheckFailed(f"KEYS_SET answered {code}, {dev!r}")
    return dev, fields


async def consent(s: Subject, link: RawLink, provider: str) -> None:
    """Opt ``link``'s address in to ``provider`` (8.1 CONSENT), or CheckFailed."""
    cid = new_id()
    link.send([CONSENT, cid, provider, True])
    code = await s.sack(link, cid)
    if code != 0:
        raise CheckFailed(f"CONSENT answered {code}")


@relay_check("features.negotiation", "14.2")
async def _negotiation(s: Subject) -> Outcome:
    """FEATURES in the first frame is answered FEATURES_OK with the same id and the
    granted subset of the names asked (an unknown name is ignored, not an error)."""
    kp = KeyPair.generate()
    link = await s.raw(hello(s.credential(s.fresh("u"), "d1", kp)), kp)
    fid = new_id()
    asked = ["e2ee", "zz-no-such-feature"]
    link.send([FEATURES, fid, asked])
    ok = await link.op(FEATURES_OK, fid, timeout=s.t.timeout)
    err = [o for o in link.ops if o[0] == ERROR]
    if ok is None:
        return Outcome(FAIL, "no FEATURES_OK", f"errors: {err!r}")
    granted = ok[2]
    subset = isinstance(granted, list) and set(granted) <= set(asked)
    seen = (f"granted {sorted(granted) if isinstance(granted, list) else granted!r}"
            + ("" if subset else " (not a subset of the request)")
            + (f", ERROR {err[0][1]}" if err else ""))
    return expect(seen, "granted ['e2ee']")


@relay_check("features.ops-need-negotiation", "14.1, 14.3")
async def _ops_need_negotiation(s: Subject) -> Outcome:
    """A feature op on a link that did not negotiate the feature, and an unregistered
    opcode of the feature's block on one that did, get ERROR UNKNOWN_OP; the link goes on."""
    to = s.fresh("u")
    v1 = await s.connect(s.fresh("u"))
    v1.send([DEVICES, new_id(), to])
    first = await v1.wait(lambda o: o[0] in (ERROR, REPLY), s.t.timeout)
    neg = await e2ee_link(s, s.fresh("u"))
    mark = len(neg.ops)
    neg.send([1099, new_id(), to])
    second = await neg.wait(lambda o: o[0] in (ERROR, REPLY), s.t.timeout, after=mark)
    neg.send([PING, 77])
    pong = await neg.op(PONG, 77, timeout=s.t.timeout)

    def name(op: list | None) -> str:
        if op is None:
            return "nothing"
        return f"ERROR {op[1]}" if op[0] == ERROR else f"REPLY {op[2]}"
    seen = f"v1 link DEVICES: {name(first)}; e2ee link op 1099: {name(second)}; " + (
        "PONG" if pong else "no PONG")
    return expect(seen, "v1 link DEVICES: ERROR 101; e2ee link op 1099: ERROR 101; PONG")


@relay_check("e2ee.keys-roundtrip", "17.3, 17.4")
async def _keys_roundtrip(s: Subject) -> Outcome:
    """Published keys come back byte for byte (DEVICES, BUNDLES) to a user of the other
    provider; each one-time prekey is handed out once, then nil / the last-resort KEM key."""
    addr = s.fresh("keys", s.other.name)
    owner = await e2ee_link(s, addr)
    dev, fields = await publish(s, owner, 4242)
    ec = [[11, b"\x05" + os.urandom(32)], [12, b"\x05" + os.urandom(32)]]
    kem = [[21, os.urandom(1569), os.urandom(64)]]
    adds = [await request(s, owner, KEYS_ADD, 0, ec), await request(s, owner, KEYS_ADD, 1, kem)]
    await consent(s, owner, s.me.name)
    me = await e2ee_link(s, s.fresh("u"))
    steps = [f"KEYS_SET id {dev}", "KEYS_ADD " + ", ".join(f"{c}/{r}" for c, r in adds)]
    code, devs = await request(s, me, DEVICES, addr)
    steps.append("DEVICES " + ("exact" if (code, devs) == (0, [[dev, 4242]]) else
                               f"{code} {devs!r}"))
    head = [dev, 4242, fields[1], fields[2]]
    handed = []
    for _ in range(3):
        code, res = await request(s, me, BUNDLES, addr, [])
        if code != 0 or not isinstance(res, list) or len(res) != 1 or len(res[0]) != 7:
            steps.append(f"BUNDLES {code} {res!r:.80}")
            continue
        b = res[0]
        parts = ["head exact" if b[:4] == head else "head differs"]
        parts.append("nil" if b[4] is None else
                     "ec" if b[4] in ec else f"unknown ec {b[4]!r:.40}")
        parts.append("kem" if (b[5], b[6]) == (kem[0], False) else
                     "last-resort" if (b[5], b[6]) == (fields[3], True) else "kem differs")
        handed.append(b[4])
        steps.append("BUNDLES " + " ".join(parts))
    once = [x for x in handed if x is not None]
    steps.append("one-time EC keys distinct" if len(once) == len({bytes(x[1]) for x in once})
                 else "a one-time EC key handed out twice")
    return expect("; ".join(steps), "; ".join([
        "KEYS_SET id 1", "KEYS_ADD 0/2, 0/1", "DEVICES exact",
        "BUNDLES head exact ec kem", "BUNDLES head exact ec last-resort",
        "BUNDLES head exact nil last-resort", "one-time EC keys distinct"]))


@relay_check("e2ee.dsend", "17.5, 17.6, 9.2")
async def _dsend(s: Subject) -> Outcome:
    """A DSEND naming exactly the recipient's devices is accepted and delivered as a
    DDELIVER carrying the sending device's id; a resend of the id is not delivered twice."""
    addr = s.fresh("peer", s.other.name)
    peer = await e2ee_link(s, addr)
    pdev, _ = await publish(s, peer, 101)
    await consent(s, peer, s.me.name)
    me_addr = s.fresh("u")
    me = await e2ee_link(s, me_addr)
    mdev, _ = await publish(s, me, 202)
    mid, body = new_id(), os.urandom(300)
    code, _res = await request(s, me, DSEND, addr, False, [[pdev, 101, body]], [], rid=mid)
    got = await peer.op(DDELIVER, timeout=s.t.timeout)
    if got is None:
        dd = "no DDELIVER"
    else:
        dd = ", ".join([
            "from ok" if got[2] == me_addr else "from differs",
            "device id ok" if got[3] == mdev else f"device id {got[3]!r} not {mdev}",
            "id ok" if got[4] == mid else "id differs",
            "body exact" if got[5] == body else "body differs", f"cls {got[7]}"])
    again, _res = await request(s, me, DSEND, addr, False, [[pdev, 101, body]], [], rid=mid)
    await asyncio.sleep(0.3)
    copies = sum(1 for o in peer.ops if o[0] == DDELIVER and o[4] == mid)
    seen = f"REPLY {code}; DDELIVER {dd}; resend: REPLY {again}, delivered {copies}x"
    return expect(seen, "REPLY 0; DDELIVER from ok, device id ok, id ok, body exact, cls 0; "
                  "resend: REPLY 0, delivered 1x")


@relay_check("e2ee.dsend-mismatch", "17.5")
async def _dsend_mismatch(s: Subject) -> Outcome:
    """A DSEND that misses a device, names one that is not listed and one with an old
    registration id is refused whole with DEVICE_MISMATCH and the three lists; the same
    id resent with the right entries is accepted and reaches every device."""
    addr = s.fresh("peer", s.other.name)
    a = await e2ee_link(s, addr, "pa")
    b = await e2ee_link(s, addr, "pb")
    da, _ = await publish(s, a, 301)
    db, _ = await publish(s, b, 302)
    await consent(s, a, s.me.name)
    me = await e2ee_link(s, s.fresh("u"))
    await publish(s, me, 303)
    dx = next(i for i in range(1, 128) if i not in (da, db))
    names = {da: "a", db: "b", dx: "x"}
    mid = new_id()
    code, res = await request(s, me, DSEND, addr, False,
                              [[da, 999, b"old"], [dx, 5, b"ghost"]], [], rid=mid)
    if code == 306 and isinstance(res, list) and len(res) == 6:
        lists = " ".join("[" + ",".join(names.get(d, "?") for d in sorted(lst)) + "]"
                         for lst in res)
    else:
        lists = repr(res)[:80]
    early = sum(1 for link in (a, b) for o in link.ops if o[0] == DDELIVER)
    code2, _r = await request(s, me, DSEND, addr, False,
                              [[da, 301, b"to a"], [db, 302, b"to b"]], [], rid=mid)
    got = [await link.op(DDELIVER, timeout=s.t.timeout) for link in (a, b)]
    bodies = [o[5] if o and o[4] == mid else None for o in got]
    seen = (f"{code} {lists}; stored before: {early}; same id resent: {code2}, "
            f"delivered {'each its copy' if bodies == [b'to a', b'to b'] else bodies}")
    return expect(seen, "306 [b] [x] [a] [] [] []; stored before: 0; same id resent: 0, "
                  "delivered each its copy")


@relay_check("enumeration.no-directory", "8.1 SEND (No enumeration), 17.8")
async def _no_directory(s: Subject) -> Outcome:
    """An address of the other provider that never existed and one with published keys
    that has not opted in get the same answers to SEND, DEVICES, BUNDLES and DSEND."""
    hidden = s.fresh("hidden", s.other.name)
    h = await e2ee_link(s, hidden)
    hdev, _ = await publish(s, h, 404)
    nobody = s.fresh("nobody", s.other.name)
    me = await e2ee_link(s, s.fresh("u"))
    await publish(s, me, 405)
    answers = []
    for to in (nobody, hidden):
        mark = len(me.ops)
        cid = new_id()
        me.send([SEND, cid, to, b"x", 0])
        sack = await s.sack(me, cid, after=mark)
        got = [f"SEND {sack}"]
        for opcode, fields in ((DEVICES, [to]), (BUNDLES, [to, []]),
                               (DSEND, [to, False, [[hdev, 404, b"c"]], []])):
            rid = new_id()
            mark = len(me.ops)
            me.send([opcode, rid, *fields])
            rep = await me.wait(lambda o, rid=rid: o[0] == REPLY and o[1] == rid,
                                s.t.timeout, after=mark)
            # the whole op but its id: "the same bytes" (17.8)
            got.append(f"{opcode}: {'none' if rep is None else [rep[0], *rep[2:]]}")
        answers.append("; ".join(got))
    if answers[0] != answers[1]:
        return Outcome(FAIL, f"unknown: {answers[0]} | not opted in: {answers[1]}",
                       "the answers tell the two addresses apart")
    return expect(answers[0], "SEND 402; 1002: [2000, 300, True, None]; "
                  "1003: [2000, 300, True, None]; 1004: [2000, 300, True, None]")


@relay_check("limits.op-budget", "8.1 PING, 8.1 CONSENT, 11")
async def _op_budget(s: Subject) -> Outcome:
    """Past the op budget PINGs go unanswered with one ERROR 400 per frame and a CONSENT
    gets SACK 400; the link stays open and the same CONSENT id is taken later."""
    link = await s.connect(s.fresh("u"))
    cids = [new_id() for _ in range(max(1, s.t.ops_probe // 8000))]
    frames = [frame_of([*(pack([PING, k * 8000 + i]) for i in range(8000)),
                        pack([CONSENT, cid, s.other.name, True])])
              for k, cid in enumerate(cids)]
    # Packed first and sent back to back: a frame at a time, waiting for its SACK,
    # gave the budget this side's reading of 8000 PONGs to refill in, and on a slow
    # machine that refill kept pace with the probe.
    for plaintext in frames:
        link.send_plain(plaintext)
    sent = 8000 * len(cids)
    refused: int | None = 0
    for cid in cids:  # the first refused CONSENT, if any
        refused = await s.sack(link, cid)
        if refused != 0:
            break
    if refused == 0:
        return Outcome(NA, f"no refusal in {sent} PINGs", "the budget is above --ops-probe")
    errors = sorted({o[1] for o in link.ops if o[0] == ERROR})
    pongs = sum(1 for o in link.ops if o[0] == PONG)
    again = None
    # the budget refills: the same CONSENT id is taken.  A relay may first
    # work through the frames sent after the refused one at its budget's pace
    # (section 11: a frame with other ops is served a share at a time, each
    # share past the budget refused): a retry not answered yet is not an
    # answer, until a bound of ten timeouts
    deadline = time.monotonic() + 10 * s.t.timeout
    for _ in range(30):
        await asyncio.sleep(0.2)
        mark = len(link.ops)
        link.send([CONSENT, cid, s.other.name, True])
        again = await s.sack(link, cid, after=mark)
        if again is None and time.monotonic() < deadline:
            continue
        if again != 400:
            break
    link.send([PING, -1])
    pong = await link.op(PONG, -1, timeout=s.t.timeout)
    seen = (f"CONSENT {refused}; PING errors {errors}; "
            f"{'some PINGs unanswered' if pongs < sent else 'every PING answered'}; "
            f"later same CONSENT id: {again}; {'PONG' if pong else 'no PONG'}")
    return expect(seen, "CONSENT 400; PING errors [400]; some PINGs unanswered; "
                  "later same CONSENT id: 0; PONG")


# ------------------------------------------ feature "groups" (18), and more of 17
async def groups_link(s: Subject, address: str, reg_id: int, device: str = "d1", *,
                      features: tuple[str, ...] = ("e2ee", "groups"),
                      static: KeyPair | None = None) -> tuple[RawLink, int]:
    """A device with ``features`` (default "e2ee" and "groups") granted and its keys
    published: ``(link, device id)``."""
    link = await e2ee_link(s, address, device, features, static)
    dev, _ = await publish(s, link, reg_id)
    return link, dev


def _unpacked(data: Any) -> Any:
    try:
        return msgpack.unpackb(data, raw=False) if type(data) is bytes else data
    except Exception:  # noqa: BLE001 - an unreadable event is rendered as such
        return None


def _gevents(link: RawLink, gid: bytes, names: dict[str, str]) -> str:
    """A link's GEVENTs as ``kind v version (fields)``, addresses named by ``names``."""
    out = []
    seqs = []
    for o in link.ops:
        if o[0] != GEVENT or len(o) != 7:
            continue
        seqs.append(o[1])
        data = _unpacked(o[4])
        if not isinstance(data, list) or len(data) < 2:
            out.append(f"{o[2]}?{data!r:.30}")
            continue
        rest = ",".join(names.get(x, repr(x)) if isinstance(x, str) else str(x)
                        for x in data[2:])
        out.append(f"{o[2]}v{data[1]}({rest})" + ("" if data[0] == gid else "?group"))
    order = "" if seqs == sorted(seqs) else " (seqs out of order)"
    return " ".join(out) + order


async def _until_count(link: RawLink, opcode: int, n: int, timeout: float) -> None:
    await link.wait(lambda o: sum(1 for x in link.ops if x[0] == opcode) >= n, timeout)


async def _group_of(s: Subject, creator: RawLink) -> bytes:
    code, gid = await request(s, creator, GCREATE)
    if code != 0 or type(gid) is not bytes or len(gid) != 16:
        raise CheckFailed(f"GCREATE answered {code}, {gid!r:.40}")
    return gid


async def _add_own(s: Subject, admin: RawLink, gid: bytes, address: str) -> Outcome | None:
    """GADD of a user of the admin's provider: added (0), or n/a on a relay whose
    documented policy invites its own users (``group_invite_own_users``)."""
    code, res = await request(s, admin, GADD, gid, address)
    if (code, res) == (0, 1):
        return Outcome(NA, "own users are invited",
                       "the relay invites its own users (group_invite_own_users = true)")
    if (code, res) != (0, 0):
        return Outcome(FAIL, f"GADD of an own user: {code}/{res!r}", "expected 0/0 (added)")
    return None


@relay_check("groups.membership", "18.1, 18.2, 18.6")
async def _group_membership(s: Subject) -> Outcome:
    """Create, add, invite, accept, decline, re-add, remove, leave: each answered as 18.2
    says, and every member device gets the GEVENTs in the order of the changes."""
    addrs = {"a": s.fresh("ga"), "b": s.fresh("gb"), "c": s.fresh("gc", s.other.name),
             "d": s.fresh("gd", s.other.name)}
    names = {v: k for k, v in addrs.items()}
    links = {k: (await groups_link(s, addr, 600 + i))[0]
             for i, (k, addr) in enumerate(addrs.items())}
    a, b, c, d = (links[k] for k in "abcd")
    await consent(s, c, s.me.name)
    await consent(s, d, s.me.name)
    gid = await _group_of(s, a)
    refused = await _add_own(s, a, gid, addrs["b"])
    if refused is not None:
        return refused
    steps = ["add b 0/0"]
    for name, link, opcode, fields in (
            ("invite c", a, GADD, [addrs["c"]]), ("c accepts", c, GANSWER, [True]),
            ("invite d", a, GADD, [addrs["d"]]), ("d declines", d, GANSWER, [False]),
            ("add b again", a, GADD, [addrs["b"]]), ("remove b", a, GREMOVE, [addrs["b"]]),
            ("c leaves", c, GLEAVE, [])):
        code, res = await request(s, link, opcode, gid, *fields)
        steps.append(f"{name} {code}" + ("" if res is None else f"/{res!r:.20}"))
    code, res = await request(s, a, GMEMBERS, gid)
    if code == 0 and isinstance(res, list) and res:
        steps.append(f"members v{res[0]} " + " ".join(
            f"{names.get(m[0], '?')}{'*' if m[1] else ''}" for m in res[1:]
            if isinstance(m, list) and m))
    else:
        steps.append(f"GMEMBERS {code}")
    want = {"a": 8, "b": 6, "c": 6, "d": 2}
    for k, n in want.items():
        await _until_count(links[k], GEVENT, n, s.t.timeout)
    await asyncio.sleep(0.2)  # anything extra or late
    events = [f"{k}: {_gevents(links[k], gid, names)}" for k in "abcd"]
    return expect("; ".join(steps) + " | " + "; ".join(events), "; ".join([
        "add b 0/0", "invite c 0/1", "c accepts 0", "invite d 0/1", "d declines 0",
        "add b again 0/2", "remove b 0", "c leaves 0", "members v5 a*"]) + " | " + "; ".join([
        "a: 1v1(a) 5v2(a,b) 2v2(a,c) 3v3(c) 2v3(a,d) 4v3(d) 6v4(a,b) 7v5(c)",
        "b: 5v2(a,b) 2v2(a,c) 3v3(c) 2v3(a,d) 4v3(d) 6v4(a,b)",
        "c: 2v2(a,c) 3v3(c) 2v3(a,d) 4v3(d) 6v4(a,b) 7v5(c)",
        "d: 2v3(a,d) 4v3(d)"]))


@relay_check("groups.admin-rights", "18.2")
async def _group_admin(s: Subject) -> Outcome:
    """Only admins add, remove and promote (410 NOT_ADMIN otherwise); the last admin
    cannot demote itself (413); a promoted member may add; non-members get 308."""
    a_addr = s.fresh("ga")
    a, _ = await groups_link(s, a_addr, 701)
    b_addr, e_addr = s.fresh("gb"), s.fresh("ge")
    b, _ = await groups_link(s, b_addr, 702)
    await groups_link(s, e_addr, 703)
    x, _ = await groups_link(s, s.fresh("gx"), 704)
    gid = await _group_of(s, a)
    refused = await _add_own(s, a, gid, b_addr)
    if refused is not None:
        return refused
    seen = []
    for name, link, opcode, fields in (
            ("non-admin GADD", b, GADD, [e_addr]), ("GREMOVE", b, GREMOVE, [s.fresh("ga")]),
            ("GADMIN", b, GADMIN, [b_addr, True]),
            ("last admin demoting itself", a, GADMIN, [a_addr, False]),
            ("promote", a, GADMIN, [b_addr, True]), ("promoted GADD", b, GADD, [e_addr]),
            ("non-member GMEMBERS", x, GMEMBERS, [])):
        code, _res = await request(s, link, opcode, gid, *fields)
        seen.append(f"{name} {code}")
    return expect(", ".join(seen), "non-admin GADD 410, GREMOVE 410, GADMIN 410, "
                  "last admin demoting itself 413, promote 0, promoted GADD 0, "
                  "non-member GMEMBERS 308")


def _address_of(s: Subject, link: RawLink) -> str:
    """The address a link authenticated as (its WELCOME)."""
    w = next((o for o in link.ops if o[0] == WELCOME), None)
    if w is None:
        raise CheckFailed("no WELCOME on the link")
    return w[1]


@relay_check("groups.gsend", "18.4, 18.5, 9.2")
async def _group_send(s: Subject) -> Outcome:
    """A GSEND with another version is refused with 306 and the current version; the
    same id with it is stored once and delivered as GDELIVER to every other member
    device (not the sender's), and a resend of the id is not delivered twice."""
    a_addr = s.fresh("ga")
    a, adev = await groups_link(s, a_addr, 801)
    b_addr, c_addr = s.fresh("gb"), s.fresh("gc", s.other.name)
    b, _ = await groups_link(s, b_addr, 802)
    c, _ = await groups_link(s, c_addr, 803)
    await consent(s, c, s.me.name)
    gid = await _group_of(s, a)
    refused = await _add_own(s, a, gid, b_addr)
    if refused is not None:
        return refused
    await request(s, a, GADD, gid, c_addr)
    await request(s, c, GANSWER, gid, True)
    mid, body = new_id(), os.urandom(200)
    code, res = await request(s, a, GSEND, gid, 1, body, rid=mid)
    # the result starts with the current version (a relay may add lists after it)
    current = res[0] if isinstance(res, list) and res and type(res[0]) is int else None
    first = f"stale version: {code} current {current}"
    code2, _ = await request(s, a, GSEND, gid, current if current else 3, body, rid=mid)
    got = {}
    for k, link in (("b", b), ("c", c)):
        o = await link.op(GDELIVER, timeout=s.t.timeout)
        got[k] = "none" if o is None else "ok" if (
            len(o) == 9 and o[2] == gid and o[3] == a_addr and o[4] == adev and o[5] == mid
            and o[6] == body and o[8] == 0) else f"differs {o[2:7]!r:.60}"
    again, _ = await request(s, a, GSEND, gid, current if current else 3, body, rid=mid)
    await asyncio.sleep(0.3)
    copies = [sum(1 for o in link.ops if o[0] == GDELIVER) for link in (b, c)]
    own = sum(1 for o in a.ops if o[0] == GDELIVER)
    seen = (f"{first}; same id, current version: {code2}; GDELIVER b {got['b']}, "
            f"c {got['c']}; to the sender's device: {own}; resend: {again}, "
            f"delivered {copies}")
    return expect(seen, "stale version: 306 current 3; same id, current version: 0; "
                  "GDELIVER b ok, c ok; to the sender's device: 0; resend: 0, "
                  "delivered [1, 1]")


@relay_check("groups.gsend-refusals", "18.4, 18.2")
async def _group_send_refusals(s: Subject) -> Outcome:
    """GSEND from a non-member, a pending invitee (of the other provider) and a removed
    member is refused with 308, to an unknown group with 302; nothing is delivered."""
    a, _ = await groups_link(s, s.fresh("ga"), 901)
    b_addr, c_addr = s.fresh("gb"), s.fresh("gc", s.other.name)
    b, _ = await groups_link(s, b_addr, 902)
    c, _ = await groups_link(s, c_addr, 903)
    n, _ = await groups_link(s, s.fresh("gn"), 904)
    await consent(s, c, s.me.name)
    gid = await _group_of(s, a)
    refused = await _add_own(s, a, gid, b_addr)
    if refused is not None:
        return refused
    await request(s, a, GADD, gid, c_addr)
    await request(s, a, GREMOVE, gid, b_addr)
    seen = []
    for name, link, group in (("non-member", n, gid), ("invitee", c, gid),
                              ("removed member", b, gid), ("unknown group", a, new_id())):
        code, _ = await request(s, link, GSEND, group, 3, b"x")
        seen.append(f"{name} {code}")
    await asyncio.sleep(0.2)
    got = sum(1 for link in (a, b, c, n) for o in link.ops if o[0] == GDELIVER)
    return expect(", ".join(seen) + f"; delivered {got}",
                  "non-member 308, invitee 308, removed member 308, unknown group 302; "
                  "delivered 0")


@relay_check("e2ee.dsend-own-mismatch", "17.5")
async def _dsend_own(s: Subject) -> Outcome:
    """A DSEND whose ``own`` copies miss one of the sender's other devices, name an
    unknown one and an old registration id is refused with the own_* lists; resent
    with the same id and the right copies, each own device gets its copy."""
    peer_addr = s.fresh("peer", s.other.name)
    peer = await e2ee_link(s, peer_addr)
    pdev, _ = await publish(s, peer, 111)
    await consent(s, peer, s.me.name)
    me_addr = s.fresh("u")
    me = await e2ee_link(s, me_addr, "m1")
    await publish(s, me, 121)
    m2 = await e2ee_link(s, me_addr, "m2")
    d2, _ = await publish(s, m2, 122)
    m3 = await e2ee_link(s, me_addr, "m3")
    d3, _ = await publish(s, m3, 123)
    ghost = next(i for i in range(1, 128) if i not in (d2, d3, 1, 2, 3))
    names = {d2: "m2", d3: "m3", ghost: "x", pdev: "p"}
    mid = new_id()
    entries = [[pdev, 111, b"to peer"]]
    code, res = await request(s, me, DSEND, peer_addr, False, entries,
                              [[d2, 999, b"old"], [ghost, 5, b"ghost"]], rid=mid)
    if code == 306 and isinstance(res, list) and len(res) == 6:
        lists = " ".join("[" + ",".join(names.get(x, "?") for x in sorted(lst)) + "]"
                         for lst in res)
    else:
        lists = repr(res)[:80]
    code2, _ = await request(s, me, DSEND, peer_addr, False, entries,
                             [[d2, 122, b"to m2"], [d3, 123, b"to m3"]], rid=mid)
    got = []
    for link, want in ((peer, b"to peer"), (m2, b"to m2"), (m3, b"to m3")):
        o = await link.op(DDELIVER, timeout=s.t.timeout)
        got.append("ok" if o is not None and o[4] == mid and o[5] == want else
                   "none" if o is None else "differs")
    mine = sum(1 for o in me.ops if o[0] == DDELIVER)
    seen = f"{code} {lists}; same id resent: {code2}; copies {got}; to the sender: {mine}"
    return expect(seen, "306 [] [] [] [m3] [x] [m2]; same id resent: 0; "
                  "copies ['ok', 'ok', 'ok']; to the sender: 0")


def _events_of(link: RawLink) -> list[str]:
    return [f"{o[2]}:{_unpacked(o[4])}" for o in link.ops if o[0] == EVENT and len(o) == 7]


@relay_check("e2ee.event-device-joined", "17.7, 17.3, 17.1")
async def _event_joined(s: Subject) -> Outcome:
    """A device that joins its address's list, or comes back with a new registration
    id, is announced to the address's other devices with EVENT 2; a key update with the
    same registration id is not; the event is acked like a message."""
    addr = s.fresh("u")
    kp = KeyPair.generate()
    a = await e2ee_link(s, addr, "a", static=kp)
    adev, _ = await publish(s, a, 1201)
    b = await e2ee_link(s, addr, "b")
    bdev, _ = await publish(s, b, 1202)
    await _until_count(a, EVENT, 1, s.t.timeout)
    await publish(s, b, 1202)  # same registration id: an update, not news
    await publish(s, b, 1203)  # re-created
    await _until_count(a, EVENT, 2, s.t.timeout)
    await asyncio.sleep(0.2)
    events = [e.replace(f"[{bdev}, ", "[b, ") for e in _events_of(a)]
    last = max([o[1] for o in a.ops if o[0] == EVENT] or [0])
    a.send([DACK, last])
    await asyncio.sleep(0.1)
    await a.close()
    again = await e2ee_link(s, addr, "a", static=kp)
    await asyncio.sleep(0.3)
    redone = len(_events_of(again))
    seen = f"to a: {events}; to b: {_events_of(b)}; after DACK and reconnect: {redone}"
    return expect(seen, "to a: ['2:[b, 1202]', '2:[b, 1203]']; to b: []; "
                  "after DACK and reconnect: 0")


@relay_check("e2ee.event-device-left", "17.7, 17.1, 10.4", needs_registry=True)
async def _event_left(s: Subject) -> Outcome:
    """A revoked device leaves its address's list: the other devices get EVENT 3 with its
    id and DEVICES no longer lists it."""
    addr = s.fresh("u")
    a = await e2ee_link(s, addr, "a")
    await publish(s, a, 1301)
    b = await e2ee_link(s, addr, "b")
    bdev, _ = await publish(s, b, 1302)
    with s.registry() as reg:
        reg.revoke_device(addr, "b")
    await a.wait(lambda o: o[0] == EVENT and o[2] == 3, s.t.timeout + 2.0)  # a registry poll
    await asyncio.sleep(0.1)
    events = [e.replace(f"[{bdev}]", "[b]") for e in _events_of(a) if not e.startswith("2:")]
    code, devs = await request(s, a, DEVICES, addr)
    listed = "b listed" if isinstance(devs, list) and any(d[0] == bdev for d in devs) \
        else "b not listed"
    return expect(f"to a: {events}; DEVICES {code}, {listed}",
                  "to a: ['3:[b]']; DEVICES 0, b not listed")


@relay_check("e2ee.bundle-fetch-limit", "17.8, 17.4")
async def _bundle_limit(s: Subject) -> Outcome:
    """Bundle fetches are limited per requester: past the burst BUNDLES gets 400 and
    consumes nothing (another requester still gets the one-time key)."""
    t_addr = s.fresh("keys", s.other.name)
    t = await e2ee_link(s, t_addr)
    await publish(s, t, 1401)  # no one-time prekeys yet
    await consent(s, t, s.me.name)
    me = await e2ee_link(s, s.fresh("u"))
    rids = [new_id() for _ in range(s.t.bundle_probe)]
    for i in range(0, len(rids), 200):
        me.send(*[[BUNDLES, rid, t_addr, []] for rid in rids[i:i + 200]])
    # refusals are answered at once, fetches once committed: wait for every answer
    wanted = set(rids)
    await me.wait(lambda o: len(wanted.intersection(
        x[1] for x in me.ops if x[0] == REPLY and x[3] is True)) == len(wanted), 10.0)
    codes = {o[1]: o[2] for o in me.ops if o[0] == REPLY and o[3] is True}
    seq = [codes.get(rid, -1) for rid in rids]
    if -1 in seq:
        return Outcome(FAIL, "REPLYs missing", f"{seq.count(-1)} of {len(rids)}")
    if 400 not in seq:
        return Outcome(NA, f"no refusal in {len(rids)} fetches",
                       "the burst is above the probe (bundle_probe)")
    n_ok = seq.index(400)
    others = sorted({c for c in seq if c not in (0, 400)})
    code, size = await request(s, t, KEYS_ADD, 0, [[77, b"\x05" + os.urandom(32)]])
    again, _ = await request(s, me, BUNDLES, t_addr, [])
    other = await e2ee_link(s, s.fresh("u2"))
    code3, res = await request(s, other, BUNDLES, t_addr, [])
    ec = (res[0][4] if code3 == 0 and isinstance(res, list) and res and len(res[0]) == 7
          else "?")
    key = "present" if isinstance(ec, list) and ec and ec[0] == 77 else repr(ec)[:30]
    seen = (f"{'0 then ' if n_ok else ''}400{' and %s' % others if others else ''}; "
            f"while refused: {again}; another requester: {code3}, one-time key {key}")
    out = expect(seen, "0 then 400; while refused: 400; another requester: 0, "
                 "one-time key present")
    out.detail = (out.detail + f" ({n_ok} bundles before the first refusal)").strip()
    return out


async def _write_to_strangers(s: Subject, me: RawLink, strangers: list,
                              timeout: float | None = None) -> tuple[list, list]:
    """SEND "hi" from ``me`` to each of ``strangers`` (at most 500 per frame);
    the ids and the SACK code of each, in order (-1: no SACK)."""
    ids = [new_id() for _ in strangers]
    for i in range(0, len(ids), 500):
        me.send(*[[SEND, cid, to, b"hi", 0] for cid, to in zip(ids[i:i + 500],
                                                               strangers[i:i + 500])])
    await s.sack(me, ids[-1], timeout)
    got = {o[1]: o[2] for o in me.ops if o[0] == SACK}
    return ids, [got.get(cid, -1) for cid in ids]


@relay_check("abuse.new-sender", "11.1")
async def _new_sender(s: Subject) -> Outcome:
    """A new address may start only so many conversations with strangers (then 400);
    a conversation it already started and an answer to who wrote first still pass."""
    me_addr = s.fresh("new")
    me = await s.connect(me_addr)
    w = await s.connect(s.fresh("w"))
    first = new_id()
    w.send([SEND, first, me_addr, b"hello", 0])  # w writes first
    await s.sack(w, first)
    strangers = [s.fresh("s") for _ in range(s.t.sender_probe)]
    ids, codes = await _write_to_strangers(s, me, strangers)
    if 400 not in codes:
        return Outcome(NA, f"no refusal for {len(ids)} strangers",
                       "the new-sender rule is off (new_sender_age_s = 0) or above the probe")
    n_ok = codes.index(400)
    before = sorted({c for c in codes[:n_ok]})
    after = sorted({c for c in codes[n_ok:]})
    again, answer = new_id(), new_id()
    mark = len(me.ops)
    me.send([SEND, again, strangers[0], b"more", 0],
            [SEND, answer, _address_of(s, w), b"answer", 0])
    c1 = await s.sack(me, again, after=mark)
    c2 = await s.sack(me, answer, after=mark)
    seen = (f"strangers: {before} then {after}; started conversation: {c1}; "
            f"answer to who wrote first: {c2}")
    out = expect(seen, "strangers: [300] then [400]; started conversation: 300; "
                 "answer to who wrote first: 0")
    out.detail = (out.detail + f" ({n_ok} strangers before the first refusal)").strip()
    return out


@relay_check("abuse.quarantine", "11.1, 12")
async def _quarantine(s: Subject) -> Outcome:
    """A new address that keeps writing to strangers past its bucket is quarantined:
    then every SEND is refused with 405, until an operator lifts it (with --data-dir)."""
    me_addr = s.fresh("spam")
    me = await s.connect(me_addr)
    strangers = [s.fresh("s") for _ in range(s.t.quarantine_probe)]
    ids, burst = await _write_to_strangers(s, me, strangers, 10.0)
    # where in the burst the score crosses the threshold depends on how the relay
    # splits it into turns: only "refused from some point on" is compared
    refused = next((i for i, c in enumerate(burst) if c in (400, 405)), None)
    shape = ("no refusal" if refused is None else
             f"{sorted(set(burst[:refused]))} then refusals" + (
                 "" if set(burst[refused:]) <= {400, 405} else " mixed with others"))
    probes = []
    for to in (strangers[0], me_addr):
        cid = new_id()
        mark = len(me.ops)
        me.send([SEND, cid, to, b"again", 0])
        probes.append(await s.sack(me, cid, after=mark))
    if 405 not in probes and 405 not in burst:
        return Outcome(NA, f"not quarantined after {len(ids)} strangers ({shape})",
                       "the quarantine score is above the probe")
    seen = f"burst {shape}; then a started conversation: {probes[0]}, self: {probes[1]}"
    want = "burst [300] then refusals; then a started conversation: 405, self: 405"
    if s.t.registry_path is not None:
        recorded = False
        for _ in range(int(s.t.timeout * 10)):  # the relay records it, with its reason
            with s.registry() as reg:
                recorded = any(q[0] == me_addr for q in reg.quarantined())
            if recorded:
                break
            await asyncio.sleep(0.1)
        seen += "; recorded" if recorded else "; not recorded in the registry"
        want += "; recorded"
        with s.registry() as reg:
            reg.lift_quarantine(me_addr)
        lifted = None
        for _ in range(40):  # applied within registry_poll_s
            await asyncio.sleep(0.1)
            cid = new_id()
            mark = len(me.ops)
            me.send([SEND, cid, strangers[0], b"lifted", 0])
            lifted = await s.sack(me, cid, after=mark)
            if lifted != 405:
                break
        seen += f"; lifted: {lifted}"
        want += "; lifted: 300"
    return expect(seen, want)


@relay_check("header.ts-ms", "11.2, 8.2 DELIVER", policy=("withhold",))
async def _header_policy(s: Subject) -> Outcome:
    """DELIVER carries the relay's timestamp unless the recipient's provider policy
    withholds it: then 0, in the same position."""
    me_addr = s.fresh("u")
    me = await s.connect(me_addr)
    await consent(s, me, s.other.name)
    senders = [await s.connect(s.fresh("w")), await s.connect(s.fresh("w", s.other.name))]
    for link in senders:
        link.send([SEND, new_id(), me_addr, b"t", 0])
    await me.wait(lambda o: sum(1 for x in me.ops if x[0] == DELIVER) >= 2, s.t.timeout)
    now = int(time.time() * 1000)
    got = []
    for o in (o for o in me.ops if o[0] == DELIVER):
        ts = o[5]
        got.append("0" if ts == 0 else "now" if type(ts) is int and abs(ts - now) < 60000
                   else f"odd {ts!r}")
    withheld = "ts_ms" in (s.me.policy.get("withhold") or [])
    out = expect(f"ts_ms {got}", f"ts_ms {['0', '0'] if withheld else ['now', 'now']}")
    out.policy = {"withhold": s.me.policy.get("withhold")}
    return out


@relay_check("limits.buckets-per-device", "11", policy=("msgs_per_s", "bytes_per_s"))
async def _buckets_per_device(s: Subject) -> Outcome:
    """The message bucket belongs to the device, not the connection: after a burst
    spends it, a reconnection of the same device does not refill it."""
    addr = s.fresh("u")
    kp = KeyPair.generate()
    to = await s.known()
    policy = {k: s.me.policy.get(k) for k in ("msgs_per_s", "bytes_per_s")}

    async def burst(link: RawLink) -> int | None:
        ids = [new_id() for _ in range(s.t.rate_probe)]
        for i in range(0, len(ids), 500):
            link.send(*[[SEND, cid, to, b"r", 1] for cid in ids[i:i + 500]])
        await s.sack(link, ids[-1], 10.0)
        codes = {o[1]: o[2] for o in link.ops if o[0] == SACK}
        return sum(1 for cid in ids if codes.get(cid) == 0) if any(
            codes.get(cid) == 400 for cid in ids) else None
    first = await burst(await s.connect(addr, "d1", kp))
    if first is None:
        return Outcome(NA, f"no refusal in {s.t.rate_probe} sends",
                       "the burst is above --rate-probe", policy)
    await s.close_all()
    second = await burst(await s.connect(addr, "d1", kp))
    kept = second is not None and second < first / 2
    return Outcome(PASS if kept else FAIL, "not refilled by reconnecting" if kept else
                   "refilled by reconnecting", f"{first} taken, then {second} after "
                   "reconnecting", policy)


# ------------------------------- feature "safety" (19) and "group_lists" (18.4)
SAFETY = ("e2ee", "groups", "safety")


def _answer_bytes(link: RawLink, op: list | None, rid: bytes) -> str:
    """An answer's bytes as the relay encoded them, its request id zeroed: two answers
    print the same exactly when they are the same bytes but the id."""
    if op is None:
        return "none"
    raw = link.raw[next(i for i in range(len(link.ops) - 1, -1, -1) if link.ops[i] is op)]
    return raw.replace(rid, bytes(16)).hex()


async def _reach(s: Subject, link: RawLink, gid: bytes, to: str,
                 entries: list) -> list[str]:
    """What ``link`` gets for SEND, DEVICES, BUNDLES, DSEND and GADD naming ``to``:
    each answer's bytes (19.1 lists these five), then the SACK's code."""
    got = []
    cid = new_id()
    mark = len(link.ops)
    link.send([SEND, cid, to, b"x", 0])
    sack = await link.op(SACK, cid, timeout=s.t.timeout, after=mark)
    got.append(_answer_bytes(link, sack, cid))
    for opcode, fields in ((DEVICES, [to]), (BUNDLES, [to, []]),
                           (DSEND, [to, False, entries, []]), (GADD, [gid, to])):
        rid = new_id()
        mark = len(link.ops)
        link.send([opcode, rid, *fields])
        rep = await link.wait(lambda o, rid=rid: o[0] == REPLY and o[1] == rid,
                              s.t.timeout, after=mark)
        got.append(_answer_bytes(link, rep, rid))
    return got + [str(None if sack is None else sack[2])]


def _same(rows: dict[str, list[str]], ref: str) -> str:
    """``rows`` (name -> answers) rendered against ``rows[ref]``: "same" or the op that
    differs, so the observation names no address."""
    ops = ("SEND", "DEVICES", "BUNDLES", "DSEND", "GADD")
    out = []
    for name, answers in rows.items():
        if name == ref:
            continue
        diff = [op for op, a, b in zip(ops, answers, rows[ref]) if a != b]
        out.append(f"{name} {'same' if not diff else 'differs in ' + '/'.join(diff)}")
    return ", ".join(out)


@relay_check("safety.blocks", "19.1, 19.2, 14.3")
async def _blocks(s: Subject) -> Outcome:
    """A block of an address and of a provider, made from one device and listed from
    another, makes the blocker an address that does not exist to the blocked party,
    byte for byte; unblocking restores delivery; v1 links get UNKNOWN_OP."""
    b_addr = s.fresh("blocker")
    b1, bd1 = await groups_link(s, b_addr, 1501, "b1", features=SAFETY)
    b2, bd2 = await groups_link(s, b_addr, 1502, "b2", features=SAFETY)
    await consent(s, b1, s.other.name)
    x_addr, y_addr = s.fresh("x"), s.fresh("y", s.other.name)  # same provider, other one
    x, _ = await groups_link(s, x_addr, 1503)
    y, _ = await groups_link(s, y_addr, 1504)
    hidden = s.fresh("hidden")  # keys published, never opted in to the other provider
    await groups_link(s, hidden, 1505)
    entries = [[bd1, 1501, b"c"], [bd2, 1502, b"c"]]
    gx, gy = await _group_of(s, x), await _group_of(s, y)
    names = {x_addr: "x", "@" + s.other.name: "@other"}
    steps = []
    for target in (x_addr, "@" + s.other.name, x_addr, b_addr):
        code, res = await request(s, b1, BLOCK, target, True)
        steps.append(f"{code}/{res!r}")
    steps = [f"block x {steps[0]}, @other {steps[1]}, x again {steps[2]}, self {steps[3]}"]
    code, listed = await request(s, b2, BLOCKS)
    steps.append(f"BLOCKS from b2 {code} " + (
        str([names.get(t, "?") for t in listed]) if isinstance(listed, list) else repr(listed)))
    # the blocked party's view of the blocker, next to an address that never existed
    # and (across providers) one that exists but did not opt in
    rx = {"blocker": await _reach(s, x, gx, b_addr, entries),
          "unknown": await _reach(s, x, gx, s.fresh("nobody"), entries)}
    ry = {"blocker": await _reach(s, y, gy, b_addr, entries),
          "unknown": await _reach(s, y, gy, s.fresh("nobody"), entries),
          "not opted in": await _reach(s, y, gy, hidden, entries)}
    steps.append(f"to x the blocker: {_same(rx, 'blocker')}")
    steps.append(f"to y the blocker: {_same(ry, 'blocker')}")
    steps.append(f"SACKs x {rx['blocker'][-1]}, y {ry['blocker'][-1]}")
    await asyncio.sleep(0.2)
    stored = sum(1 for link in (b1, b2) for o in link.ops
                 if o[0] in (DELIVER, DDELIVER, GEVENT))
    steps.append(f"delivered while blocked: {stored}")
    for target in (x_addr, "@" + s.other.name):
        code, res = await request(s, b2, BLOCK, target, False)
        steps.append(f"unblock {code}/{res!r}")
    sent = []
    for link in (x, y):
        cid = new_id()
        mark = len(link.ops)
        link.send([SEND, cid, b_addr, b"after", 0])
        sent.append(await s.sack(link, cid, after=mark))
    await b1.wait(lambda o: sum(1 for q in b1.ops if q[0] == DELIVER) >= 2, s.t.timeout)
    got = sum(1 for o in b1.ops if o[0] == DELIVER and o[4] == b"after")
    code, devs = await request(s, x, DEVICES, b_addr)
    listed = sorted(d[0] for d in devs) == sorted((bd1, bd2)) if isinstance(devs, list) \
        else devs
    steps.append(f"after unblocking: SACK {sent}, delivered {got}, DEVICES {code} {listed}")
    v1 = await s.connect(s.fresh("v1"))
    e2 = await e2ee_link(s, s.fresh("e2"))
    seen_ops = []
    for link in (v1, e2):
        mark = len(link.ops)
        link.send([BLOCK, new_id(), x_addr, True], [BLOCKS, new_id()],
                  [REPORT, new_id(), x_addr])
        await link.wait(lambda o, link=link: sum(
            1 for q in link.ops[mark:] if q[0] in (ERROR, REPLY)) >= 3, s.t.timeout)
        seen_ops.append(sorted({f"ERROR {o[1]}" if o[0] == ERROR else f"REPLY {o[2]}"
                                for o in link.ops[mark:] if o[0] in (ERROR, REPLY)}))
    steps.append(f"v1 link: {seen_ops[0]}, e2ee-only link: {seen_ops[1]}")
    out = expect("; ".join(steps), "; ".join([
        "block x 0/0, @other 0/0, x again 0/2, self 102/None",
        "BLOCKS from b2 0 ['@other', 'x']",
        "to x the blocker: unknown same",
        "to y the blocker: unknown same, not opted in same",
        # 300 for y too on a relay with require_consent = false (the bytes compared above)
        f"SACKs x 300, y {ry['blocker'][-1] if ry['blocker'][-1] == '300' else 402}",
        "delivered while blocked: 0",
        "unblock 0/0", "unblock 0/0", "after unblocking: SACK [0, 0], delivered 2, DEVICES 0 True",
        "v1 link: ['ERROR 101'], e2ee-only link: ['ERROR 101']"]))
    # the bytes of the first answer that told the blocker apart (for the report)
    for rows in (rx, ry):
        for name, answers in rows.items():
            diff = [(a, b) for a, b in zip(rows["blocker"], answers) if a != b]
            if diff and out.status == FAIL:
                out.detail += f"; to the blocker {diff[0][0]}, to {name} {diff[0][1]}"
                break
    return out


@relay_check("safety.block-scope", "19.1, 17.8")
async def _block_scope(s: Subject) -> Outcome:
    """A block wins over shared group membership, never applies to the user's own
    address (even with its own provider blocked), and leaves messages accepted
    before it to be delivered."""
    b_addr, x_addr = s.fresh("blocker"), s.fresh("x", s.other.name)
    kp = KeyPair.generate()
    b1, bd1 = await groups_link(s, b_addr, 1511, "b1", features=SAFETY, static=kp)
    b2, bd2 = await groups_link(s, b_addr, 1512, "b2", features=SAFETY)
    x, _ = await groups_link(s, x_addr, 1513)
    await consent(s, x, s.me.name)
    gid = await _group_of(s, b1)  # x of the other provider joins the blocker's group:
    await request(s, b1, GADD, gid, x_addr)  # it may reach the blocker's devices (17.8)
    code, _ = await request(s, x, GANSWER, gid, True)  # without the blocker's consent
    entries = [[bd1, 1511, b"c"], [bd2, 1512, b"c"]]
    before = [code, (await request(s, x, DEVICES, b_addr))[0]]
    await b1.close()  # b1 offline: what x sends now waits in the store
    early = new_id()
    before.append((await request(s, x, DSEND, b_addr, False, entries, [], rid=early))[0])
    blocked = [await request(s, b2, BLOCK, target, True)
               for target in ("@" + s.other.name, "@" + s.me.name)]  # the own provider too
    steps = [f"group member before the block: joined {before[0]}, DEVICES {before[1]}, "
             f"DSEND {before[2]}; block both providers {blocked}"]
    rx = [(await request(s, x, opcode, *fields))[0] for opcode, fields in (
        (DEVICES, [b_addr]), (BUNDLES, [b_addr, []]), (DSEND, [b_addr, False, entries, []]))]
    steps.append(f"group member x: DEVICES/BUNDLES/DSEND {rx}")
    own = new_id()
    b2.send([SEND, own, b_addr, b"self", 0])
    own_sack = await s.sack(b2, own)
    own_dev = (await request(s, b2, DEVICES, b_addr))[0]
    steps.append(f"to its own address: SEND {own_sack}, DEVICES {own_dev}")
    again, _ = await groups_link(s, b_addr, 1511, "b1", features=SAFETY, static=kp)
    got = await again.wait(lambda o: o[0] == DDELIVER and o[4] == early, s.t.timeout)
    steps.append(f"accepted before the block: {'delivered' if got else 'not delivered'}")
    return expect("; ".join(steps), "; ".join([
        "group member before the block: joined 0, DEVICES 0, DSEND 0; "
        "block both providers [(0, 0), (0, 0)]",
        "group member x: DEVICES/BUNDLES/DSEND [300, 300, 300]",
        "to its own address: SEND 0, DEVICES 0",
        "accepted before the block: delivered"]))

@relay_check("safety.reports", "19.3")
async def _reports(s: Subject) -> Outcome:
    """A spam report counts only after the relay stored a persistent message from the
    sender to the reporter, once per pair, and for a few users of one provider only."""
    r = await e2ee_link(s, s.fresh("reporter"), features=("e2ee", "safety"))
    await publish(s, r, 1601)
    await consent(s, r, s.other.name)
    r_addr = _address_of(s, r)
    senders = {k: await e2ee_link(s, s.fresh(k, s.other.name))
               for k in ("send", "ephemeral", "dsend", "elsewhere")}
    addrs = {k: _address_of(s, link) for k, link in senders.items()}
    await publish(s, senders["dsend"], 1602)
    to_r = []

    async def report(link: RawLink, sender: str) -> str:
        code, res = await request(s, link, REPORT, sender)
        return f"{res!r}" if code == 0 else f"code {code}"

    steps = [f"no message yet {await report(r, addrs['send'])}"]
    for k, cls in (("send", 0), ("ephemeral", 1)):
        cid = new_id()
        senders[k].send([SEND, cid, r_addr, b"spam", cls])
        to_r.append(await s.sack(senders[k], cid))
    other_user = await s.connect(s.fresh("r2"))
    await consent(s, other_user, s.other.name)
    cid = new_id()
    senders["elsewhere"].send([SEND, cid, _address_of(s, other_user), b"spam", 0])
    to_r.append(await s.sack(senders["elsewhere"], cid))
    rdevs = await request(s, senders["dsend"], DEVICES, r_addr)
    entries = [[d, reg, b"spam"] for d, reg in (rdevs[1] or [])] if rdevs[0] == 0 else []
    to_r.append((await request(s, senders["dsend"], DSEND, r_addr, False, entries, []))[0])
    steps.append(f"sent {to_r}")
    steps.append(f"after a SEND {await report(r, addrs['send'])}")
    steps.append(f"again {await report(r, addrs['send'])}")
    steps.append(f"after an ephemeral SEND {await report(r, addrs['ephemeral'])}")
    steps.append(f"who wrote to another user {await report(r, addrs['elsewhere'])}")
    steps.append(f"after a DSEND {await report(r, addrs['dsend'])}")
    # the per-provider cap: one sender of the other provider writes to many users of
    # the subject's provider, who all report it; then one of the sender's own provider
    spammer = await s.connect(s.fresh("spammer", s.other.name))
    sp_addr = _address_of(s, spammer)
    reporters = []
    for i in range(s.t.report_probe + 1):
        provider = s.me.name if i < s.t.report_probe else s.other.name
        link = await e2ee_link(s, s.fresh("rep", provider), features=("e2ee", "safety"))
        if provider != s.other.name:
            await consent(s, link, s.other.name)
        reporters.append(link)
    # each writes first, so the spammer's messages are answers, not a new address's
    # writes to strangers (11.1), whatever the relay's new_sender_burst
    await consent(s, spammer, s.me.name)
    for link in reporters:
        link.send([SEND, new_id(), sp_addr, b"hi", 0])
    await asyncio.gather(*(link.op(SACK, timeout=s.t.timeout) for link in reporters))
    ids = [new_id() for _ in reporters]
    spammer.send(*[[SEND, cid, _address_of(s, link), b"spam", 0]
                   for cid, link in zip(ids, reporters)])
    await spammer.wait(lambda o: len(set(ids).intersection(
        q[1] for q in spammer.ops if q[0] == SACK)) == len(ids), 10.0)
    codes = sorted({c for c in (q[2] for q in spammer.ops if q[0] == SACK)})
    counted = [await report(link, sp_addr) for link in reporters]
    mine, theirs = counted[:-1], counted[-1]
    if "False" not in mine:
        cap = f"none of {len(mine)} refused"
    else:
        n = mine.index("False")
        cap = ("True then False" if n and set(mine[:n]) == {"True"}
               and set(mine[n:]) == {"False"} else f"{mine}")
    steps.append(f"spammer's SENDs {codes}; {s.t.report_probe} reporters of one provider: "
                 f"{cap}; one of another provider {theirs}")
    want = "; ".join([
        "no message yet False", "sent [0, 0, 0, 0]", "after a SEND True", "again False",
        "after an ephemeral SEND False", "who wrote to another user False",
        "after a DSEND True", f"spammer's SENDs [0]; {s.t.report_probe} reporters of one "
        "provider: True then False; one of another provider True"])
    seen = "; ".join(steps)
    if cap.startswith("none") and seen.replace(cap, "True then False") == want:
        return Outcome(NA, seen, "reports_per_provider is above --report-probe")
    out = expect(seen, want)
    if "False" in mine:
        out.detail = (out.detail + f" ({mine.index('False')} counted before the cap)").strip()
    return out


@relay_check("groups.mismatch-lists", "18.4, 14.2")
async def _mismatch_lists(s: Subject) -> Outcome:
    """With "group_lists" a stale GSEND's refusal lists the member devices missing,
    extra and stale relative to the version the sender named; without it only the
    current version."""
    lists = ("e2ee", "groups", "group_lists")
    a_addr, c_addr, b_addr = s.fresh("ga"), s.fresh("gc"), s.fresh("gb", s.other.name)
    a, _ = await groups_link(s, a_addr, 1701, "a1", features=lists)
    c, cdev = await groups_link(s, c_addr, 1702)  # no "group_lists"
    b1, bdev1 = await groups_link(s, b_addr, 1703, "b1")
    await consent(s, b1, s.me.name)
    gid = await _group_of(s, a)  # version 1: a
    refused = await _add_own(s, a, gid, c_addr)  # 2: a, c
    if refused is not None:
        return refused
    await request(s, a, GADD, gid, b_addr)
    await request(s, b1, GANSWER, gid, True)  # 3: a, c, b1
    b2 = await e2ee_link(s, b_addr, "b2", ("e2ee", "groups"))
    bdev2, _ = await publish(s, b2, 1704)  # 4: a device joins b's list
    await publish(s, b1, 1705)  # 5: b1 re-created (another registration id)
    names = {(b_addr, bdev1): "b1", (b_addr, bdev2): "b2", (c_addr, cdev): "c"}
    regs = {1702, 1703, 1704, 1705}

    def render(code: int, res: Any) -> str:
        if not isinstance(res, list) or not res:
            return f"{code} {res!r:.60}"
        parts = [str(res[0])]
        for lst in res[1:4]:
            if not isinstance(lst, list):
                parts.append(repr(lst)[:30])
                continue
            parts.append("[" + ",".join(
                names.get((e[0], e[1]), "?") + (f"/{e[2]}" if len(e) == 3 and e[2] in regs
                                                 else "" if len(e) == 2 else "/?")
                for e in lst if isinstance(e, list) and len(e) >= 2) + "]")
        parts += [repr(x) for x in res[4:]]
        return f"{code} " + " ".join(parts)

    seen = []
    for name, link, version in (("a at 4", a, 4), ("a at 3", a, 3), ("a at 2", a, 2),
                                ("a at 99", a, 99), ("c at 2", c, 2)):
        code, res = await request(s, link, GSEND, gid, version, b"k")
        seen.append(f"{name}: {render(code, res) if link is a else f'{code} {res!r}'}")
    await request(s, c, GLEAVE, gid)  # 6: c's device is extra to the sender at 5
    code, res = await request(s, a, GSEND, gid, 5, b"k")
    seen.append(f"a at 5 after c left: {render(code, res)}")
    code, res = await request(s, a, GSEND, gid, 6, b"k")
    seen.append(f"a at 6: {code} {res!r}")
    return expect("; ".join(seen), "; ".join([
        "a at 4: 306 5 [] [] [b1/1705] True",
        "a at 3: 306 5 [b2/1704] [] [b1/1705] True",
        "a at 2: 306 5 [b1/1705,b2/1704] [] [] True",
        "a at 99: 306 5 [b1/1705,b2/1704,c/1702] [] [] False",
        "c at 2: 306 [5]",
        "a at 5 after c left: 306 6 [] [c] [] True",
        "a at 6: 0 None"]))


@relay_check("groups.skipped-at-cap", "18.4, 11, 12")
async def _skipped_at_cap(s: Subject) -> Outcome:
    """Where the relay caps a recipient's stored backlog, a GSEND skips a member at
    the cap, names it on a "group_lists" link, still reaches the others, and is
    refused with RECIPIENT_FULL when no recipient could take it (n/a without a cap)."""
    lists = ("e2ee", "groups", "group_lists")
    a, _ = await groups_link(s, s.fresh("ga"), 1801, "a1", features=lists)
    c_addr, m_addr = s.fresh("gc"), s.fresh("gm", s.other.name)
    c, _ = await groups_link(s, c_addr, 1802)  # no "group_lists"
    m, _ = await groups_link(s, m_addr, 1803)
    await consent(s, m, s.me.name)
    g1, g2 = await _group_of(s, a), await _group_of(s, a)  # g2: a and m only
    refused = await _add_own(s, a, g1, c_addr)
    if refused is not None:
        return refused
    for gid in (g1, g2):
        await request(s, a, GADD, gid, m_addr)
        await request(s, m, GANSWER, gid, True)
    await m.close()  # what comes for m now is stored
    filler = await s.connect(s.fresh("f"))
    ids = [new_id() for _ in range(s.t.backlog_probe)]
    got_codes: dict[bytes, int] = {}
    for i in range(0, len(ids), 50):
        # a chunk at a time, every SACK awaited: the relay checks the cap per batch
        # (section 11 allows it to be close to the cap in between), so the chunk a
        # cap is reached in may be stored whole
        chunk = ids[i:i + 50]
        mark = len(filler.ops)
        filler.send(*[[SEND, cid, m_addr, b"fill", 0] for cid in chunk])
        await filler.wait(lambda o, chunk=chunk, mark=mark: set(chunk) <= {
            q[1] for q in filler.ops[mark:] if q[0] == SACK}, 10.0, after=mark)
        got_codes.update((o[1], o[2]) for o in filler.ops[mark:] if o[0] == SACK)
        if 408 in got_codes.values():
            break
    codes = [got_codes[cid] for cid in ids if cid in got_codes]  # in the order sent
    if 408 not in codes:
        return Outcome(NA, f"no RECIPIENT_FULL in {len(codes)} SENDs",
                       "the relay caps no backlog (max_stored_*), or above --backlog-probe")
    n_ok = codes.index(408)
    # 400 (the sender's own quota) says "later", not "full": left out of the shape
    fill = f"{sorted(set(codes[:n_ok]) - {400})} then 408"
    mid = new_id()
    code, res = await request(s, a, GSEND, g1, 3, b"k", rid=mid)
    named = [("m" if x == m_addr else "?") for x in res] if isinstance(res, list) else res
    got = await c.wait(lambda o: o[0] == GDELIVER and o[5] == mid, s.t.timeout)
    code2, res2 = await request(s, c, GSEND, g1, 3, b"k")
    code3, res3 = await request(s, a, GSEND, g2, 2, b"k")
    seen = (f"backlog {fill}; with lists: {code} {named}, the other member "
            f"{'got it' if got else 'did not'}; without lists: {code2} {res2!r}; "
            f"nobody could take it: {code3} {res3!r}")
    out = expect(seen, "backlog [0] then 408; with lists: 0 ['m'], the other member got it; "
                 "without lists: 0 None; nobody could take it: 408 None")
    out.detail = (out.detail + f" ({n_ok} stored before the cap)").strip()
    return out

# ------------------------------------------------------------------- runner
async def _run_one(check, subject: Subject, has_registry: bool) -> Outcome:
    if check.needs_registry and not has_registry:
        return Outcome(NA, "not run", "needs the relay's --data-dir")
    try:
        return await asyncio.wait_for(check.fn(subject), 30.0)
    except CheckFailed as exc:
        return Outcome(FAIL, f"failed: {exc}")
    except Exception as exc:  # a relay that breaks the kit's expectations fails the check
        return Outcome(FAIL, f"failed: {type(exc).__name__}: {exc}")
    finally:
        await subject.close_all()


def _compare(check, home: Outcome, third: Outcome, hp: ProviderSetup,
             tp: ProviderSetup) -> tuple[str, str]:
    """The row's verdict: ``(status, note)``."""
    if home.observed != third.observed:
        differing = [k for k in check.policy_keys if hp.policy.get(k) != tp.policy.get(k)]
        if differing and home.status != FAIL and third.status != FAIL:
            return "policy", "differs by enrolled policy: " + ", ".join(
                f"{k} {hp.policy.get(k)} vs {tp.policy.get(k)}" for k in differing)
        return FAIL, "the columns differ"
    if FAIL in (home.status, third.status):
        return FAIL, "fails the spec"
    if home.status == NA:
        return NA, home.detail
    return PASS, ""


async def run_relay_suite(target: RelayTarget, home: ProviderSetup, third: ProviderSetup,
                          only: list[str] | None = None) -> dict[str, Any]:
    """Run every registered relay check for both columns; the report as a dict."""
    rows = []
    has_reg = target.registry_path is not None
    for check in RELAY_CHECKS:
        if only and check.name not in only:
            continue
        h = await _run_one(check, Subject(target, home, third, "home"), has_reg)
        t = await _run_one(check, Subject(target, third, home, "third"), has_reg)
        status, note = _compare(check, h, t, home, third)
        rows.append({"check": check.name, "section": check.section, "summary": check.summary,
                     "status": status, "note": note,
                     "home": outcome_dict(h), "third_party": outcome_dict(t)})
    failed = [r["check"] for r in rows if r["status"] == FAIL]
    return {"direction": "relay", "target": f"{target.host}:{target.port}",
            "providers": {"home": {"name": home.name, "policy": home.policy},
                          "third_party": {"name": third.name, "policy": third.policy}},
            "checks": rows, "failed": failed, "passed": not failed}


def render_table(report: dict[str, Any]) -> str:
    """The side-by-side table of a relay report."""
    rows = report["checks"]
    w = max([len(r["check"]) for r in rows] + [5])
    out = [f"{'check':<{w}}  {'home':<6} {'third':<6} verdict"]
    for r in rows:
        verdict = r["status"].upper() + (f" ({r['note']})" if r["note"] else "")
        out.append(f"{r['check']:<{w}}  {r['home']['status']:<6} "
                   f"{r['third_party']['status']:<6} {verdict}")
        if r["status"] == FAIL:
            out.append(f"{'':<{w}}    home:  {r['home']['observed']} {r['home']['detail']}")
            out.append(f"{'':<{w}}    third: {r['third_party']['observed']} "
                       f"{r['third_party']['detail']}")
    n_fail = len(report["failed"])
    out.append(f"{len(rows)} checks, {n_fail} failed" + (
        ": " + ", ".join(report["failed"]) if n_fail else ""))
    return "\n".join(out)


def policy_of(registry_path: str | None, name: str) -> dict[str, Any]:
    """A provider's enrolled policy from the relay's registry (all None without one)."""
    keys = ("max_body", "msgs_per_s", "bytes_per_s")
    if registry_path is None:
        return dict.fromkeys((*keys, "withhold"))
    with Registry(registry_path) as reg:
        rec = reg.get_provider(name)
    return {**{k: getattr(rec, k) for k in keys}, "withhold": sorted(rec.withhold)}


__all__ += ["make_credential", "policy_of", "Subject", "RELAY_CHECKS", "expect", "new_id"]
