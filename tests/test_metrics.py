"""The admin listener of a real ``fastroute serve``: metrics move, nothing personal leaks.

One relay process, real clients of two providers exchanging messages, scrapes
of ``/metrics`` before and during the traffic; then a revocation confirmed
through the running relay, a SIGHUP reload that keeps the links, and the
JSON-lines log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request

import pytest

from cliutil import Served, fr
from fastroute import Client
from fastroute.errors import CredentialRevoked, FastrouteError, RateLimited
from fastroute.identity import ProviderKey, issue_credential
from fastroute.noise import KeyPair


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def check_format(text: str) -> None:
    """Prometheus text format: HELP and TYPE before each family, naming conventions."""
    typed = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            typed[name] = kind
            assert name.startswith("fastroute_")
            if kind == "counter":
                assert name.endswith("_total"), name
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            base = name
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and name[: -len(suffix)] in typed:
                    base = name[: -len(suffix)]
            assert base in typed, line


def test_metrics_during_traffic_have_no_personal_data(tmp_path):
    (tmp_path / "fastroute.toml").write_text("[relay]\nregistry_poll_s = 0.1\n"
                                             "[limits]\nmsgs_per_s = 5000.0\n")
    relay = Served(tmp_path, "--data-dir", "d", "--listen", "127.0.0.1:0", "--log-format",
                   "json")
    try:
        keys = {}
        for name in ("home", "acme"):
            fr("provider", "add", name, "--generate", "--key-out", f"{name}.key",
               "--data-dir", "d", cwd=tmp_path, ok=True)
            keys[name] = ProviderKey.load(tmp_path / f"{name}.key")
        status, text = get(relay.admin + "/healthz")
        assert (status, text) == (200, "ok\n")
        assert get(relay.admin + "/readyz")[0] == 200
        assert get(relay.admin + "/nothing")[0] == 404
        req = urllib.request.Request(relay.admin + "/metrics", method="POST", data=b"x")
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("POST accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 405  # reads only
        before = get(relay.admin + "/metrics")[1]
        check_format(before)
        b = samples(before)
        addresses = ["zoe.private@home", "quentin.secret@acme"]
        devices = ["zoes-pixel", "quentins-laptop"]
        bodies = [b"BODY-" + os.urandom(6).hex().encode() for _ in range(20)]
        ids: list[bytes] = []

        async def traffic() -> tuple[str, Client]:
            clients = []
            for address, device in zip(addresses, devices):
                provider = address.split("@")[1]
                kp = KeyPair.generate()
                cred = issue_credential(keys[provider], provider, address, device, kp.public)
                clients.append(await Client.connect(
                    "127.0.0.1", relay.port, credential=cred, static=kp,
                    server_key=bytes.fromhex(relay.server_key)))
            zoe, quentin = clients
            # before the opt-in: a refusal by code
            with pytest.raises(FastrouteError):
                await zoe.send("quentin.secret@acme", b"too early")
            await quentin.set_consent("home")
            for body in bodies:
                ids.append(await zoe.send("quentin.secret@acme", body))
            got = []
            while len(got) < len(bodies):
                got.extend(await asyncio.wait_for(quentin.recv_many(100), 10))
            assert sorted(m.body for m in got) == sorted(bodies)
            await asyncio.sleep(0.3)  # the delivery acks reach the relay
            during = get(relay.admin + "/metrics")[1]
            await zoe.close()
            return during, quentin

        async def main() -> None:
            during, quentin = await traffic()
            check_format(during)
            d = samples(during)
            assert d["fastroute_messages_accepted_total"] - \
                b["fastroute_messages_accepted_total"] == len(bodies)
            assert d["fastroute_messages_delivered_total"] >= len(bodies)
            assert d['fastroute_connections{state="open"}'] == 2
            assert d['fastroute_connections_authenticated{provider="home"}'] == 1
            assert d["fastroute_handshake_duration_seconds_count"] == 2
            assert d['fastroute_refusals_total{code="402",reason="CONSENT_REQUIRED"}'] == 1
            assert d["fastroute_mailbox_depth_messages_count"] == 2
            assert d["fastroute_store_commits_total"] > b["fastroute_store_commits_total"]
            # per-op counts, store commit and delivery latencies move with the traffic
            assert d['fastroute_ops_received_total{op="SEND"}'] >= len(bodies) + 1
            assert d['fastroute_ops_received_total{op="CONSENT"}'] == 1
            assert d['fastroute_ops_received_total{op="DACK"}'] >= 1
            assert (d["fastroute_store_commit_duration_seconds_count"]
                    > b["fastroute_store_commit_duration_seconds_count"])
            assert d["fastroute_store_commit_duration_seconds_sum"] > 0
            assert d["fastroute_delivery_latency_seconds_count"] >= 1
            assert (d['fastroute_delivery_latency_seconds_bucket{le="+Inf"}']
                    == d["fastroute_delivery_latency_seconds_count"])
            for secret in [*addresses, *devices, *(x.decode() for x in bodies),
                           *(i.hex() for i in ids), "zoe", "quentin"]:
                assert secret not in during, secret
            # a revocation is confirmed by the running relay, and the link is gone
            out = fr("device", "revoke", "quentin.secret@acme", "quentins-laptop",
                     "--data-dir", "d", cwd=tmp_path, ok=True).stdout
            assert "confirmed by the running relay" in out
            with pytest.raises(CredentialRevoked):
                await asyncio.wait_for(quentin.recv(), 5)
            await quentin.close()

        asyncio.run(main())

        # SIGHUP: a new limit is read, the relay keeps running and its links stay up
        async def reload_keeps_links() -> None:
            kp = KeyPair.generate()
            cred = issue_credential(keys["home"], "home", "ann@home", "tab", kp.public)
            ann = await Client.connect("127.0.0.1", relay.port, credential=cred, static=kp,
                                       server_key=bytes.fromhex(relay.server_key))
            # whole numbers for float keys, as people write them
            (tmp_path / "fastroute.toml").write_text("[relay]\nregistry_poll_s = 0.1\n"
                                                     "[limits]\nmsgs_per_s = 1\n"
                                                     "msgs_burst = 3\n")
            relay.proc.send_signal(signal.SIGHUP)
            for _ in range(50):
                if samples(get(relay.admin + "/metrics")[1])[
                        "fastroute_config_reloads_total"] == 1:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("no reload")
            await ann.ping()  # the link survived the reload
            # the new limit holds for the next connection: a burst of 3, then refusals
            kp2 = KeyPair.generate()
            cred2 = issue_credential(keys["home"], "home", "bea@home", "tab", kp2.public)
            bea = await Client.connect("127.0.0.1", relay.port, credential=cred2, static=kp2,
                                       server_key=bytes.fromhex(relay.server_key))
            for _ in range(3):
                await bea.send("ann@home", b"x")
            with pytest.raises(RateLimited):
                await bea.send("ann@home", b"x")
            await bea.close()
            await ann.close()

        asyncio.run(reload_keeps_links())
    finally:
        out = relay.stop()
    events = [json.loads(line)["event"] for line in "".join(relay.lines).splitlines()
              + out.splitlines() if line.startswith("{")]
    assert "relay.listening" in events and "relay.reloaded" in events
    log_text = "".join(relay.lines) + out
    for secret in addresses + devices:
        assert secret not in log_text


def test_garbage_collections_and_their_pauses_are_metrics(tmp_path):
    # the relay's figure for "no GC pause in the latency": how many
    # collections of each generation ran, and how long each held everything
    import gc

    from fastroute.relay.metrics import render_metrics
    from relayutil import run, world

    async def main():
        async with world(tmp_path) as w:
            before = samples(await render_metrics(w.relay))
            gc.collect()  # a full collection: generation 2
            gc.collect(0)
            after_text = await render_metrics(w.relay)
            check_format(after_text)
            after = samples(after_text)
        key2 = 'fastroute_gc_collections_total{generation="2"}'
        key0 = 'fastroute_gc_collections_total{generation="0"}'
        assert after[key2] >= before[key2] + 1
        assert after[key0] >= before[key0] + 1
        assert after["fastroute_gc_pause_seconds_count"] >= \
            before["fastroute_gc_pause_seconds_count"] + 2
        assert after["fastroute_gc_pause_seconds_sum"] > before["fastroute_gc_pause_seconds_sum"]
        assert after['fastroute_gc_pause_seconds_bucket{le="+Inf"}'] == \
            after["fastroute_gc_pause_seconds_count"]
    run("asyncio", main())


def test_a_scrape_of_many_links_lets_the_loop_run_between_slices(tmp_path):
    # a scrape walks every link and every online device (about a microsecond
    # each): with 100 k links that held every client for ~0.1 s.  It now lets
    # the loop run between slices; a device that goes offline meanwhile is
    # left out of the mailbox depths instead of failing the scrape.
    from fastroute.relay import metrics
    from fastroute.relay.link import LinkState
    from fastroute.relay.metrics import SCRAPE_SLICE, render_metrics
    from relayutil import run, world

    ticks = [0]

    class Seen:
        """A link or feed that notes the loop's tick each time the scrape reads it."""

        def __init__(self, log):
            self.log = log

    class FakeLink(Seen):
        provider = "home"

        @property
        def state(self):
            self.log.append(ticks[0])
            return LinkState.OPEN

    class FakeFeed(Seen):
        def __init__(self, log, link, dev):
            super().__init__(log)
            self.link, self._dev = link, dev

        @property
        def dev(self):
            self.log.append(ticks[0])
            return self._dev

    async def main():
        # (no upkeep pass meanwhile: it would walk the stand-in feeds too)
        async with world(tmp_path, registry_poll_s=1000) as w:
            relay, router = w.relay, w.relay.router
            n = 2 * SCRAPE_SLICE + 10
            link_log: list[int] = []
            feed_log: list[int] = []
            links = [FakeLink(link_log) for _ in range(n)]
            feeds = []
            for i, link in enumerate(links):
                link.feed = FakeFeed(feed_log, link, router.add_device(f"u{i}@home", "phone"))
                feeds.append(link.feed)
            real_feeds = relay.delivery.feeds
            relay.links.update(links)
            relay.delivery.feeds = lambda: feeds
            gone = feeds[-5:]

            async def ticker():
                while True:
                    ticks[0] += 1
                    if ticks[0] == 3:  # mid-scrape: five devices go offline
                        for feed in gone:
                            router.remove_device(feed._dev)
                            feed.link.feed = None
                    await asyncio.sleep(0)

            task = asyncio.ensure_future(ticker())
            try:
                text = await render_metrics(relay)
            finally:
                task.cancel()
                relay.links.difference_update(links)
                relay.delivery.feeds = real_feeds
            got = samples(text)
            # the walks were cut: the loop ran while each was under way
            assert len(set(link_log)) >= 3 and len(set(feed_log)) >= 2
            assert got['fastroute_connections{state="open"}'] >= n
            assert got["fastroute_mailbox_depth_messages_count"] == n - len(gone)
            assert metrics.SCRAPE_SLICE == SCRAPE_SLICE
    run("asyncio", main())


def _histograms():
    """The histogram implementations: the specification, and its compiled twin."""
    from fastroute import _compiled
    from fastroute.histogram import PyHistogram

    impls = [PyHistogram]
    twin = _compiled.compiled_twin(PyHistogram)
    if twin is not None:
        impls.append(twin)
    return impls


def test_the_compiled_histogram_counts_as_its_specification():
    import math
    import random
    import time

    from fastroute import _compiled
    from fastroute.histogram import LATENCY_BUCKETS, LOOP_BUCKETS, PyHistogram

    if _compiled.compiled_twin(PyHistogram) is None:
        pytest.skip("the compiled core is switched off: no twin to compare")
    rng = random.Random(7)
    for bounds in (LATENCY_BUCKETS, LOOP_BUCKETS, (), (0.5,), (3.0, 1.0, 2.0)):
        # every bound itself, a hair either side, the ends, ints and bools,
        # a NaN (below no bound: the first bucket), and random values
        values: list = [b + d for b in bounds for d in (-1e-12, 0.0, 1e-12)]
        values += [0.0, -1.0, 1e300, -1e300, 3, True, False, math.nan]
        values += [rng.random() * 12.0 for _ in range(500)]
        values += [rng.expovariate(200.0) for _ in range(500)]
        hs = [impl(bounds) for impl in _histograms()]
        for v in values:
            for h in hs:
                h.observe(v)
        spec, comp = hs
        assert comp.bounds == spec.bounds == tuple(bounds)
        assert list(comp.counts) == spec.counts and sum(spec.counts) == len(values)
        assert comp.count == spec.count == len(values)
        assert math.isnan(comp.total) and math.isnan(spec.total)
        assert comp.lines("x") == spec.lines("x")
    # without NaN the sums are the same float: the same adds in the same order
    hs = [impl() for impl in _histograms()]
    for v in [v for v in values if not math.isnan(v)]:
        for h in hs:
            h.observe(v)
    assert hs[0].total == hs[1].total and hs[0].lines("y") == hs[1].lines("y")
    assert hs[0].bounds == hs[1].bounds == LATENCY_BUCKETS  # the default bounds
    # since a stamp: 3 s ago lands in (2.5, 5], a stamp ahead of the clock at 0
    hs = [impl() for impl in _histograms()]
    now_ms = int(time.time() * 1000)
    for h in hs:
        h.observe_since_ms(now_ms - 3000)
        h.observe_since_ms(now_ms + 60_000)
    at = LATENCY_BUCKETS.index(5.0)
    for h in hs:
        assert list(h.counts)[0] == 1 and list(h.counts)[at] == 1 and h.count == 2
        assert 3.0 <= h.total < 4.0


def test_a_histogram_made_without_its_init_counts_nowhere_out_of_bounds():
    # a subclass that skips __init__ (or __new__ alone) still has its one
    # bucket: an observation goes there, never through a NULL
    from fastroute import _compiled
    from fastroute.histogram import PyHistogram

    twin = _compiled.compiled_twin(PyHistogram)
    if twin is None:
        pytest.skip("the compiled core is switched off")
    h = twin.__new__(twin)
    h.observe(1.0)
    assert list(h.counts) == [1] and h.count == 1 and h.bounds == ()
