"""``fastroute conformance``: both directions, against real relays and real clients.

Direction 1 runs against a real ``fastroute serve`` process (through the CLI)
and against in-process relays on port 0: one treating the third party
through a lower enrolled quota (a documented policy: not a failure), one
patched to refuse the third party's SENDs with another code (a failure,
named).  Direction 2 grades ``fastroute.Client`` through the reference
adapter, and deliberately broken clients built here, each of which must
fail the behaviour it breaks and only be caught there.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import msgpack
import pytest

from fastroute import Client, Relay, RelayConfig, wire
from fastroute.cli import main as cli_main
from fastroute.client import DeviceMessage, Event, GroupEvent, GroupMessage
from fastroute.config import Limits
from fastroute.dedup import DedupTable
from fastroute.conformance.adapter import run_adapter
from fastroute.conformance.framework import RELAY_CHECKS, Check, Outcome
from fastroute.conformance.link import RawLink, split_ops
from fastroute.conformance.relay import (ProviderSetup, RelayTarget, _compare, policy_of,
                                         run_relay_suite)
from fastroute.conformance.vendor import CLIENT_BEHAVIOURS, VendorKit
from fastroute.identity import ProviderKey, Registry
from fastroute.noise import KeyPair
from fastroute.relay import gate as gate_mod
from fastroute.relay import groups as groups_mod
from fastroute.relay import keys as keys_mod
from fastroute.relay import link as link_mod
from fastroute.relay import safety as safety_mod

from cliutil import ENV, listen_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, 60)
    return asyncio.run(bounded())


# ------------------------------------------------------------- direction 1
def test_relay_direction_passes_against_fastroute_serve_with_identical_columns(tmp_path):
    data = tmp_path / "data"
    cfg = tmp_path / "fastroute.toml"
    # a low message burst, so the rate-limit check needs a few hundred SENDs, not 25000
    # and a backlog cap, so that groups.skipped-at-cap has one to meet
    cfg.write_text(f'[relay]\ndata_dir = "{data}"\nregistry_poll_s = 0.05\n'
                   "prekey_fetch_burst = 20.0\nmax_stored_msgs_per_address = 30\n"
                   "[limits]\nmsgs_burst = 200.0\nmsgs_per_s = 400.0\n")
    port = listen_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastroute.cli", "serve", "--config", str(cfg),
                             "--listen", f"127.0.0.1:{port}"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not (data / "server.key").exists() or not _listening(port):
            if proc.poll() is not None:  # say why (e.g. the port was taken meanwhile)
                raise AssertionError(f"relay exited: {proc.stdout.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "relay did not start"
            time.sleep(0.05)
        out = tmp_path / "report.json"
        rc = cli_main(["conformance", "--target", f"127.0.0.1:{port}", "--data-dir", str(data),
                       "--rate-probe", "500", "--json", str(out)])
        report = json.loads(out.read_text())
        # the other way in: two providers enrolled beforehand, their key files, the relay key
        keys = {}
        for name in ("keyhome", "keythird"):
            keys[name] = str(tmp_path / f"{name}.key")
            assert cli_main(["provider", "add", name, "--generate", "--key-out", keys[name],
                             "--data-dir", str(data)]) == 0
        time.sleep(0.3)  # the relay polls its registry every 0.05 s here
        server_key = KeyPair.from_private((data / "server.key").read_bytes()).public.hex()
        out2 = tmp_path / "report2.json"
        rc2 = cli_main(["conformance", "--target", f"127.0.0.1:{port}", "--server-key",
                        server_key, "--home-provider", "keyhome", "--home-key", keys["keyhome"],
                        "--third-provider", "keythird", "--third-key", keys["keythird"],
                        "--only", "consent", "--only", "credential.revoked-device",
                        "--json", str(out2)])
        report2 = json.loads(out2.read_text())
    finally:
        proc.terminate()
        proc.wait(10)
    statuses = {r["check"]: r["status"] for r in report2["checks"]}
    assert rc2 == 0 and statuses == {"consent": "pass", "credential.revoked-device": "n/a"}
    assert rc == 0, [r for r in report["checks"] if r["status"] != "pass"]
    assert report["passed"] and not report["failed"]
    assert {r["check"] for r in report["checks"]} == {c.name for c in RELAY_CHECKS}
    for row in report["checks"]:
        assert row["status"] == "pass", row
        assert row["home"]["observed"] == row["third_party"]["observed"], row
    # the rate check really saw the limit (it would be n/a above the probe)
    rate = next(r for r in report["checks"] if r["check"] == "limits.rate")
    assert rate["home"]["observed"].startswith("refused 400")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return False
    return True


async def _suite(tmp_path, only, *, third_quota=None, timeout=3.0, **cfg):
    data = str(tmp_path / "relay")
    os.makedirs(data, exist_ok=True)
    reg = os.path.join(data, "registry.db")
    keys = {"home": ProviderKey.generate(), "acme": ProviderKey.generate()}
    with Registry(reg) as r:
        r.add_provider("home", keys["home"].public_key)
        r.add_provider("acme", keys["acme"].public_key, **(third_quota or {}))
    relay = Relay(RelayConfig(port=0, data_dir=data, registry_poll_s=0.05, **cfg))
    await relay.start()
    try:
        target = RelayTarget("127.0.0.1", relay.port, relay.server_key.public, reg,
                             rate_probe=500, timeout=timeout)
        return await run_relay_suite(
            target, ProviderSetup("home", keys["home"], policy_of(reg, "home")),
            ProviderSetup("acme", keys["acme"], policy_of(reg, "acme")), only)
    finally:
        await relay.close()


def test_a_lower_enrolled_quota_shows_as_policy_not_as_a_failure(tmp_path):
    report = _run(_suite(tmp_path, ["limits.max-body", "limits.rate", "send.bad-cls"],
                         third_quota={"max_body": 1000},
                         limits=Limits(msgs_burst=200.0, msgs_per_s=400.0)))
    rows = {r["check"]: r for r in report["checks"]}
    body = rows["limits.max-body"]
    assert body["status"] == "policy", body
    assert "max_body None vs 1000" in body["note"]
    assert body["home"]["observed"] == "limit 61440: 0, 401"
    assert body["third_party"]["observed"] == "limit 1000: 0, 401"
    assert rows["send.bad-cls"]["status"] == "pass"
    assert report["passed"], report["failed"]


def test_a_relay_refusing_the_third_partys_sends_fails_naming_the_checks(tmp_path, monkeypatch):
    original = gate_mod.Gate.accept

    def biased(self, link, sends):
        if link.address.endswith("@acme"):
            # the integrity gate treats one provider's clients differently
            for cid in sends[0::4]:  # flat: id, to, body, cls a SEND
                link.out.append(wire.sack_op(cid, 403))
            self.delivery.mark(link)
            return None
        return original(self, link, sends)

    monkeypatch.setattr(gate_mod.Gate, "accept", biased)
    only = ["route.unknown-recipient", "dedup.resend", "send.wrong-arity", "ping.pong"]
    report = _run(_suite(tmp_path, only))
    rows = {r["check"]: r for r in report["checks"]}
    assert not report["passed"]
    assert set(report["failed"]) == {"route.unknown-recipient", "dedup.resend"}
    row = rows["route.unknown-recipient"]
    assert row["home"]["observed"] == "300, 402"
    assert row["third_party"]["observed"] == "403, 403"
    assert row["note"] == "the columns differ"
    # what the patch does not touch stays identical and passes
    assert rows["send.wrong-arity"]["status"] == rows["ping.pong"]["status"] == "pass"


_NEW_CHECKS = ["features.negotiation", "features.ops-need-negotiation", "e2ee.keys-roundtrip",
               "e2ee.dsend", "e2ee.dsend-mismatch", "enumeration.no-directory",
               "limits.op-budget"]


def _grant_everything_to_acme(monkeypatch):
    original = link_mod.Link._features

    def biased(self, cid, names):
        original(self, cid, names)
        if self.address.endswith("@acme"):  # also "grants" names it does not support
            self.out[-1] = wire.features_ok_op(cid, sorted(set(names)))
    monkeypatch.setattr(link_mod.Link, "_features", biased)


def _wrong_reg_ids_for_acme(monkeypatch):
    original = keys_mod.Keys.devices

    def biased(self, link, cid, address):
        if link.address.endswith("@acme") and self.may_reach(link, address):
            devs = self.dir.lists[address]  # the third party is served other bytes
            self.replies.reply(link, cid, 0, [[d, devs[d].reg_id ^ 1] for d in sorted(devs)])
            return
        original(self, link, cid, address)
    monkeypatch.setattr(keys_mod.Keys, "devices", biased)


def _stale_reported_as_missing(monkeypatch):
    original = keys_mod._mismatch

    def merged(current, entries, skip):
        missing, extra, stale = original(current, entries, skip)
        return sorted(missing + stale), extra, []
    monkeypatch.setattr(keys_mod, "_mismatch", merged)


def _devices_tell_existing_addresses_apart(monkeypatch):
    original = keys_mod.Keys.devices

    def leaky(self, link, cid, address):
        if not self.may_reach(link, address) and address in self.dir.lists:
            self.replies.reply(link, cid, 402)  # "exists, but has not opted in": a directory
            return
        original(self, link, cid, address)
    monkeypatch.setattr(keys_mod.Keys, "devices", leaky)


def _dropped_pings_reported_as_503(monkeypatch):
    original = wire.error_op

    def wrong(code, reason=""):
        return original(503 if code == 400 else code, reason)
    monkeypatch.setattr(wire, "error_op", wrong)


@pytest.mark.parametrize("patch, failed, differ", [
    (_grant_everything_to_acme, "features.negotiation", True),
    (_wrong_reg_ids_for_acme, "e2ee.keys-roundtrip", True),
    (_stale_reported_as_missing, "e2ee.dsend-mismatch", False),
    (_devices_tell_existing_addresses_apart, "enumeration.no-directory", False),
    (_dropped_pings_reported_as_503, "limits.op-budget", False),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_broken_relays_fail_the_new_checks_by_name(tmp_path, monkeypatch, patch, failed, differ):
    patch(monkeypatch)
    report = _run(_suite(tmp_path, _NEW_CHECKS, limits=Limits(ops_burst=2000.0,
                                                               ops_per_s=2000.0)))
    rows = {r["check"]: r for r in report["checks"]}
    assert report["failed"] == [failed], {k: (r["status"], r["home"]["observed"],
                                             r["third_party"]["observed"])
                                         for k, r in rows.items()}
    row = rows[failed]
    assert row["note"] == ("the columns differ" if differ else "fails the spec"), row
    if differ:  # only the third party is treated differently
        assert row["home"]["status"] == "pass" and row["third_party"]["status"] == "fail", row
    for name in _NEW_CHECKS:
        if name != failed:
            assert rows[name]["status"] == "pass", rows[name]


def test_the_op_budget_probe_sends_every_frame_before_it_waits(tmp_path, monkeypatch):
    # A probe that waited for each frame's SACK gave the budget its own reading of 8000
    # PONGs to refill in; on a slow CI machine the refill kept pace and no CONSENT was
    # refused. Sent back to back, the refill has only the relay's work on them.
    sizes: list[int] = []
    sent_at_wait: list[int] = []
    send_plain, wait = RawLink.send_plain, RawLink.wait

    def counting_send(self, plaintext):
        sizes.append(len(plaintext))
        return send_plain(self, plaintext)

    async def noting_wait(self, *args, **kw):
        sent_at_wait.append(len(sizes))
        return await wait(self, *args, **kw)
    monkeypatch.setattr(RawLink, "send_plain", counting_send)
    monkeypatch.setattr(RawLink, "wait", noting_wait)
    report = _run(_suite(tmp_path, ["limits.op-budget"]))  # the default 20000 and 10000/s
    row = report["checks"][0]
    assert row["status"] == "pass", row
    probes = [i for i, n in enumerate(sizes) if n > 8000 * 3]  # 8000 PINGs, 3+ bytes each
    assert len(probes) == 2 * 6, sizes  # 48000 PINGs for each column
    for column in (probes[:6], probes[6:]):
        first, last = column[0], column[-1]
        assert last - first == 5, probes
        later = [n for n in sent_at_wait if n > first]
        assert later[0] > last, (first, last, sent_at_wait)


def test_the_new_checks_pass_against_a_relay_with_identical_columns(tmp_path):
    report = _run(_suite(tmp_path, _NEW_CHECKS, limits=Limits(ops_burst=2000.0,
                                                               ops_per_s=2000.0)))
    assert [r["check"] for r in report["checks"]] == _NEW_CHECKS
    for row in report["checks"]:
        assert row["status"] == "pass", row
        assert row["home"]["observed"] == row["third_party"]["observed"], row
    rows = {r["check"]: r for r in report["checks"]}
    assert rows["limits.op-budget"]["home"]["observed"].startswith("CONSENT 400")
    assert rows["e2ee.dsend-mismatch"]["home"]["observed"].startswith("306 [b] [x] [a]")


_GROUP_CHECKS = ["groups.membership", "groups.admin-rights", "groups.gsend",
                 "groups.gsend-refusals"]
_MORE_CHECKS = ["e2ee.dsend-own-mismatch", "e2ee.event-device-joined", "e2ee.event-device-left",
                "e2ee.bundle-fetch-limit", "abuse.new-sender", "abuse.quarantine",
                "header.ts-ms", "limits.buckets-per-device"]
_SAFETY_CHECKS = ["safety.blocks", "safety.block-scope", "safety.reports",
                  "groups.mismatch-lists", "groups.skipped-at-cap"]
_SMALL = dict(limits=Limits(msgs_burst=200.0, msgs_per_s=400.0, ops_burst=2000.0,
                            ops_per_s=2000.0), prekey_fetch_burst=20.0,
              max_stored_msgs_per_address=30)


def _acme(link) -> bool:
    return link.address.endswith("@acme")


def _no_group_events_for_acme(monkeypatch):
    original = groups_mod.Groups._event

    def biased(self, g, addresses, kind, data):
        original(self, g, [a for a in addresses if not a.endswith("@acme")], kind, data)
    monkeypatch.setattr(groups_mod.Groups, "_event", biased)


def _acme_members_act_as_admins(monkeypatch):
    original = groups_mod.Groups._member_group

    def biased(self, link, cid, gid, admin=False):
        return original(self, link, cid, gid, admin and not _acme(link))
    monkeypatch.setattr(groups_mod.Groups, "_member_group", biased)


def _bias_gsends(monkeypatch, version_of):
    """GSENDs whose version ``version_of(groups, link, group, version)`` rewrites."""
    original = groups_mod.Groups.gsend_many

    def biased(self, link, ops):
        original(self, link, [(op[0], op[1], op[2], version_of(self, link, op[2], op[3]),
                               op[4]) for op in ops])
    monkeypatch.setattr(groups_mod.Groups, "gsend_many", biased)


def _acme_gsend_ignores_the_version(monkeypatch):
    def version_of(self, link, gid, version):
        g = self.groups.get(gid)
        return g.version if _acme(link) and g is not None else version
    _bias_gsends(monkeypatch, version_of)


def _acme_non_members_told_unknown_group(monkeypatch):
    original = groups_mod.Groups._member_group

    def biased(self, link, cid, gid, admin=False):
        g = self.groups.get(gid)
        if _acme(link) and g is not None and link.address not in g.members:
            self._reply(link, cid, 302)
            return None
        return original(self, link, cid, gid, admin)
    monkeypatch.setattr(groups_mod.Groups, "_member_group", biased)


def _acme_own_copies_unchecked(monkeypatch):
    original = keys_mod.Keys.dsend_many

    def biased(self, link, ops):
        original(self, link, [op[:5] + ((),) for op in ops] if _acme(link) else ops)
    monkeypatch.setattr(keys_mod.Keys, "dsend_many", biased)


def _no_device_events_for_acme(monkeypatch):
    original = keys_mod.Keys._event_to_others

    def biased(self, address, device_id, kind, data):
        if not address.endswith("@acme"):
            original(self, address, device_id, kind, data)
    monkeypatch.setattr(keys_mod.Keys, "_event_to_others", biased)


def _acme_fetches_unlimited(monkeypatch):
    original = keys_mod.Keys._fetch_bucket

    def biased(self, link):
        bucket = original(self, link)
        if _acme(link):
            bucket.tokens = bucket.burst = 1e9
        return bucket
    monkeypatch.setattr(keys_mod.Keys, "_fetch_bucket", biased)


def _acme_never_new(monkeypatch):
    original = gate_mod.Gate._screen

    def biased(self, link, budgets, sends):
        return sends if _acme(link) else original(self, link, budgets, sends)
    monkeypatch.setattr(gate_mod.Gate, "_screen", biased)


def _acme_scores_nothing(monkeypatch):
    original = gate_mod.Gate.score

    def biased(self, sender, points):
        original(self, sender, 0.0 if sender.address.endswith("@acme") else points)
    monkeypatch.setattr(gate_mod.Gate, "score", biased)


def _acme_timestamps_withheld_unasked(monkeypatch):
    original = gate_mod.Gate.withholds_ts

    def biased(self, provider):
        return provider == "acme" or original(self, provider)
    monkeypatch.setattr(gate_mod.Gate, "withholds_ts", biased)


def _acme_buckets_per_connection(monkeypatch):
    original = gate_mod.Gate.budgets

    def biased(self, cred):
        if cred.provider == "acme":
            self._buckets.pop((cred.address, cred.device), None)  # full again
        return original(self, cred)
    monkeypatch.setattr(gate_mod.Gate, "budgets", biased)


def _acme_blocks_ignored_by_key_ops(monkeypatch):
    original = safety_mod.Safety.hides

    def biased(self, recipient, sender):
        # an acme user's blocks stop SENDs but its keys and groups still answer
        return not recipient.endswith("@acme") and original(self, recipient, sender)
    monkeypatch.setattr(safety_mod.Safety, "hides", biased)


def _acme_blocks_apply_to_themselves(monkeypatch):
    original = safety_mod.Safety.hides

    def biased(self, recipient, sender):
        if recipient == sender and recipient.endswith("@acme"):  # "@acme" hides them too
            return "@acme" in self.blocks.get(recipient, ())
        return original(self, recipient, sender)
    monkeypatch.setattr(safety_mod.Safety, "hides", biased)


def _acme_reports_always_count(monkeypatch):
    original = safety_mod.Safety.report

    def biased(self, link, cid, sender):
        if _acme(link):  # no delivery needed: a weapon for one provider's users
            self.replies.reply(link, cid, 0, True)
            return
        original(self, link, cid, sender)
    monkeypatch.setattr(safety_mod.Safety, "report", biased)


def _acme_lists_against_nothing(monkeypatch):
    def version_of(self, link, gid, version):
        g = self.groups.get(gid)
        # lists as if the sender had distributed to no one
        return 0 if _acme(link) and g is not None and version != g.version else version
    _bias_gsends(monkeypatch, version_of)


def _acme_gsend_stopped_by_a_full_member(monkeypatch):
    original = groups_mod.Groups.gsend_many

    def biased(self, link, ops):
        for op in ops:
            _, cid, gid, version, _ = op
            g = self.groups.get(gid)
            full = self.delivery.caps.full
            if _acme(link) and g is not None and version == g.version and full & set(g.members):
                self._reply(link, cid, 408)  # one full member stops acme's group sends
                continue
            original(self, link, [op])
    monkeypatch.setattr(groups_mod.Groups, "gsend_many", biased)


@pytest.mark.parametrize("patch, failed", [
    (_acme_gsend_stopped_by_a_full_member, ["groups.skipped-at-cap"]),
    (_acme_blocks_ignored_by_key_ops, ["safety.blocks", "safety.block-scope"]),
    (_acme_blocks_apply_to_themselves, ["safety.block-scope"]),
    (_acme_reports_always_count, ["safety.reports"]),
    (_acme_lists_against_nothing, ["groups.mismatch-lists"]),
    (_no_group_events_for_acme, ["groups.membership"]),
    (_acme_members_act_as_admins, ["groups.admin-rights"]),
    (_acme_gsend_ignores_the_version, ["groups.gsend"]),
    # the same refusal guards GMEMBERS: both checks see it
    (_acme_non_members_told_unknown_group, ["groups.admin-rights", "groups.gsend-refusals"]),
    (_acme_own_copies_unchecked, ["e2ee.dsend-own-mismatch"]),
    (_no_device_events_for_acme, ["e2ee.event-device-joined", "e2ee.event-device-left"]),
    (_acme_fetches_unlimited, ["e2ee.bundle-fetch-limit"]),
    (_acme_never_new, ["abuse.new-sender", "abuse.quarantine"]),
    (_acme_scores_nothing, ["abuse.quarantine"]),
    (_acme_timestamps_withheld_unasked, ["header.ts-ms"]),
    (_acme_buckets_per_connection, ["limits.buckets-per-device"]),
], ids=lambda v: getattr(v, "__name__", "-"))
def test_relays_treating_one_provider_differently_fail_the_check_by_name(
        tmp_path, monkeypatch, patch, failed):
    patch(monkeypatch)
    # the checks the patch is about, and one of each family it must leave alone
    only = [*failed, *(c for c in ("groups.admin-rights", "e2ee.dsend-own-mismatch")
                       if c not in failed)]
    # a broken relay leaves the checks waiting for what never comes: wait less
    report = _run(_suite(tmp_path, only, timeout=1.0, **_SMALL))
    rows = {r["check"]: r for r in report["checks"]}
    assert report["failed"] == failed, {k: (r["status"], r["home"]["observed"],
                                           r["third_party"]["observed"])
                                       for k, r in rows.items()}
    for name in failed:
        row = rows[name]
        assert row["note"] == "the columns differ", row
        assert row["third_party"]["status"] != "pass", row
    for name in only:
        if name not in failed:
            assert rows[name]["status"] == "pass", rows[name]


def test_the_group_abuse_and_safety_checks_pass_with_identical_columns(tmp_path):
    names = _GROUP_CHECKS + _MORE_CHECKS + _SAFETY_CHECKS
    report = _run(_suite(tmp_path, names, **_SMALL))
    assert [r["check"] for r in report["checks"]] == names
    for row in report["checks"]:
        assert row["status"] == "pass", row
        assert row["home"]["observed"] == row["third_party"]["observed"], row
    rows = {r["check"]: r for r in report["checks"]}
    # what the checks really saw (each would be n/a, or fail, otherwise)
    assert rows["abuse.quarantine"]["home"]["observed"].endswith("recorded; lifted: 300")
    assert rows["e2ee.bundle-fetch-limit"]["home"]["observed"].startswith("0 then 400")
    assert rows["limits.buckets-per-device"]["home"]["observed"] == \
        "not refilled by reconnecting"
    # the report cap was reached (n/a otherwise), the lists were compared
    assert "True then False; one of another provider True" in \
        rows["safety.reports"]["home"]["observed"]
    assert "a at 3: 306 5 [b2/1704] [] [b1/1705] True" in \
        rows["groups.mismatch-lists"]["home"]["observed"]


def test_a_withheld_timestamp_shows_as_policy_not_as_a_failure(tmp_path):
    report = _run(_suite(tmp_path, ["header.ts-ms"], third_quota={"withhold": ["ts_ms"]}))
    row = report["checks"][0]
    assert row["status"] == "policy", row
    assert "withhold [] vs ['ts_ms']" in row["note"]
    assert row["home"]["observed"] == "ts_ms ['now', 'now']"
    assert row["third_party"]["observed"] == "ts_ms ['0', '0']"
    assert report["passed"]


def test_the_kit_keeps_each_ops_bytes_as_the_relay_encoded_them():
    # 300 packed wide is the same value but not the same bytes: safety.blocks compares
    # the blocker's answers with an unknown address's by these bytes, not by value
    narrow = msgpack.packb([2000, b"i" * 16, 300, True, None])
    wide = b"\x95\xcd\x07\xd0\xc4\x10" + b"i" * 16 + b"\xce\x00\x00\x01\x2c\xc3\xc0"
    got = split_ops(b"\x92" + narrow + wide)
    assert [op for op, _ in got] == [msgpack.unpackb(narrow), msgpack.unpackb(wide)]
    assert got[0][0] == got[1][0] and [raw for _, raw in got] == [narrow, wide]
    with pytest.raises(msgpack.ExtraData):
        split_ops(b"\x91" + narrow + b"\xc1")  # a trailing byte, as decode_ops refuses
    assert split_ops(b"\x07") == [(7, b"\x07")]  # not an array: as decode_ops has it


def test_columns_that_differ_fail_even_when_both_pass():
    check = Check("x", "1", "", None, policy_keys=("max_body",))  # type: ignore[arg-type]
    a = ProviderSetup("a", None, {"max_body": None})  # type: ignore[arg-type]
    b = ProviderSetup("b", None, {"max_body": None})  # type: ignore[arg-type]
    assert _compare(check, Outcome("pass", "1"), Outcome("pass", "2"), a, b) == \
        ("fail", "the columns differ")
    # the same difference explained by a differing enrolled value of a declared key
    b.policy["max_body"] = 10
    assert _compare(check, Outcome("pass", "1"), Outcome("pass", "2"), a, b)[0] == "policy"
    # but never when one column fails on its own
    assert _compare(check, Outcome("pass", "1"), Outcome("fail", "2"), a, b)[0] == "fail"


# ------------------------------------------------------------- direction 2
def _kit(tmp_path, name="kit") -> VendorKit:
    return VendorKit(out_dir=str(tmp_path / name), pause_s=0.5, refuse_s=0.5, shutdown_s=0.8,
                     timeout=2.5, connect_timeout=10.0)


def _grades(report) -> dict[str, str]:
    return {b["name"]: b["status"] for b in report["behaviours"]}


def test_fastroute_client_passes_every_behaviour(tmp_path):
    only = [b.name for b in CLIENT_BEHAVIOURS]
    report = _run(_kit(tmp_path).run(client=run_adapter, only=only, print_fn=lambda *a: None))
    grades = _grades(report)
    assert report["passed"], report["behaviours"]
    assert set(grades) >= {"pinning", "handshake", "dedup", "acks-only-taken", "resend-same-id",
                           "resend-in-order", "backoff-rate-limited", "backoff-store-failed",
                           "error-op-and-encodings", "no-ops-after-bye", "well-formed-ops"}
    # the reference adapter negotiates "e2ee", so these are graded, not n/a
    for name in ("unknown-relay-op", "key-publishing", "pool-top-up", "mismatch-refresh-resend",
                 "group-events", "feature-acks-only-taken", "feature-dedup"):
        assert grades[name] == "pass", report["behaviours"]
    assert report["client_exit_status"] == 0


def test_fastroute_client_acks_only_taken_across_a_reconnect(tmp_path):
    report = _run(_kit(tmp_path).run(client=run_adapter, only=["adapter", "acks-reconnect"],
                                     print_fn=lambda *a: None))
    assert report["passed"], report["behaviours"]


def test_fastroute_client_backs_off_while_the_relay_shuts_down(tmp_path):
    report = _run(_kit(tmp_path).run(client=run_adapter, only=["adapter", "shutdown"],
                                     print_fn=lambda *a: None))
    assert report["passed"], report["behaviours"]


class _NoResend(Client):
    def _unacked_ops(self):
        return []


class _ReordersResends(Client):
    def _unacked_ops(self):
        return super()._unacked_ops()[::-1]


class _AcksOnReceipt(Client):
    def _on_frame(self, msg):
        super()._on_frame(msg)
        if self._inbox:
            # before the application took anything; on the wire, since the
            # client's own ack() refuses to cover what was not taken
            self._write([wire.dack_op(self._inbox[-1].seq)])


class _SendsAfterBye(Client):
    def _write(self, ops):
        super()._write(ops)
        if wire.bye_op() in ops:
            super()._write([wire.ping_op(7)])


class _TrustsAnyRelayKey(Client):
    def __init__(self, *args, **kw):
        kw["server_key"] = None  # trust on first use: the impostor key gets msg3
        super().__init__(*args, **kw)


class _NoDedup(Client):
    def _on_frame(self, msg):
        self._seen = DedupTable(float("inf"), 65536)  # forgets every frame what it had
        super()._on_frame(msg)


class _BadDack(Client):
    def _write(self, ops):
        super()._write([*ops, msgpack.packb([2, -1])])  # DACK needs an int >= 0 (8.1)


class _DropsOnUnknownOps(Client):
    def _on_frame(self, msg):
        rx = self._rx
        plaintext = rx.decrypt(msg)
        if any(isinstance(op, list) and op and op[0] == 2099 for op in msgpack.unpackb(plaintext)):
            self._proto.transport.abort()  # takes an op it cannot read for a broken link
            return

        class _Decrypted:  # the frame is already decrypted: hand its plaintext on
            @staticmethod
            def decrypt(_msg):
                return plaintext
        self._rx = _Decrypted
        try:
            super()._on_frame(msg)
        finally:
            self._rx = rx


class _IgnoresPoolLow(Client):
    async def recv(self):
        while True:  # takes (and so acks) a pool-low EVENT, but never hands it on
            msg = await super().recv()
            if not (isinstance(msg, Event) and msg.kind == 1):
                return msg


class _NewIdAfterMismatch(Client):
    async def send_to_devices(self, to, entries, own=(), *, id=None):  # noqa: A002
        return await super().send_to_devices(to, entries, own)  # a fresh id every time


class _ReordersGroupEvents(Client):
    def _on_frame(self, msg):
        n = len(self._inbox)
        super()._on_frame(msg)
        new = list(self._inbox)[n:]
        at = [i for i, m in enumerate(new) if isinstance(m, GroupEvent)]
        for i, m in zip(at, [new[i] for i in reversed(at)]):  # a frame's events backwards
            self._inbox[n + i] = m


class _AcksFeatureDeliveriesOnReceipt(Client):
    def _on_frame(self, msg):
        super()._on_frame(msg)
        taken = [m for m in self._inbox if isinstance(m, (DeviceMessage, GroupMessage))]
        if taken:  # a per-device or group copy acked before the application took it
            self._write([wire.dack_op(taken[-1].seq)])


def _broken(cls=Client, **kw):
    return lambda env: run_adapter(env, client_cls=cls, **kw)


@pytest.mark.parametrize("client, scenario, behaviour", [
    (_broken(_NoResend), "resend", "resend-same-id"),
    (_broken(_ReordersResends), "resend", "resend-in-order"),
    (_broken(_AcksOnReceipt), "acks", "acks-only-taken"),
    (_broken(first_retry_s=0.0), "rate-limited", "backoff-rate-limited"),
    (_broken(_SendsAfterBye), "bye", "no-ops-after-bye"),
    (_broken(_TrustsAnyRelayKey), "adapter", "pinning"),
    (_broken(_NoDedup), "dedup", "dedup"),
    (_broken(first_retry_s=0.0), "store-failed", "backoff-store-failed"),
    (_broken(_BadDack), "wire", "well-formed-ops"),
    (_broken(_DropsOnUnknownOps), "unknown-op", "unknown-relay-op"),
    (_broken(_IgnoresPoolLow), "keys", "pool-top-up"),
    (_broken(_NewIdAfterMismatch), "mismatch", "mismatch-refresh-resend"),
    (_broken(_ReordersGroupEvents), "group-events", "group-events"),
    (_broken(_AcksFeatureDeliveriesOnReceipt), "feature-deliveries", "feature-acks-only-taken"),
    (_broken(_NoDedup), "feature-deliveries", "feature-dedup"),
], ids=["no-resend", "reordered-resend", "ack-before-take", "ignores-rate-limits",
        "sends-after-bye", "no-pinning", "no-dedup", "retries-store-failed-at-once",
        "malformed-op", "drops-link-on-unknown-op", "no-pool-top-up",
        "new-id-after-mismatch", "group-events-out-of-order", "feature-ack-before-take",
        "no-feature-dedup"])
def test_broken_clients_fail_the_behaviour_they_break(tmp_path, client, scenario, behaviour):
    report = _run(_kit(tmp_path).run(client=client, only=["adapter", scenario],
                                     print_fn=lambda *a: None))
    grades = _grades(report)
    assert not report["passed"]
    assert grades[behaviour] == "fail", report["behaviours"]
    # the kit names what is broken, not everything
    failed = [name for name, status in grades.items() if status == "fail"]
    # without resends there is no order to grade either
    assert failed == [behaviour] + (["resend-in-order"] if behaviour == "resend-same-id" else [])


def test_client_direction_runs_a_client_command_and_writes_json(tmp_path):
    out = tmp_path / "client.json"
    cmd = [sys.executable, "-m", "fastroute.cli", "conformance", "--listen", "127.0.0.1:0",
           "--client-cmd", f"{sys.executable} -m fastroute.conformance.adapter",
           "--out-dir", str(tmp_path / "files"), "--only", "adapter", "--only", "bye",
           "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.read_text())
    assert _grades(report) == {"pinning": "pass", "handshake": "pass", "adapter-echo": "pass",
                               "no-ops-after-bye": "pass"}
    assert report["client_exit_status"] == 0
    assert "FASTROUTE_CONFORMANCE_CREDENTIAL=" in res.stdout
    for f in ("device.cred", "device.key", "relay.pub"):
        assert (tmp_path / "files" / f).exists()


# ------------------------------------------------------------------ the doc
DOC = os.path.join(ROOT, "docs", "CONFORMANCE.md")


def test_the_doc_lists_every_check_and_behaviour():
    with open(DOC, encoding="utf-8") as fh:
        doc = fh.read()
    names = [c.name for c in RELAY_CHECKS]
    names += [name for b in CLIENT_BEHAVIOURS for name, _ in b.grades]
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, f"docs/CONFORMANCE.md does not describe {missing}"


def test_the_docs_example_check_runs(tmp_path):
    with open(DOC, encoding="utf-8") as fh:
        doc = fh.read()
    example = doc.split("## Adding a check", 1)[1].split("```python\n", 1)[1].split("```")[0]
    before = list(RELAY_CHECKS)
    try:
        exec(compile(example, DOC, "exec"), {})
        added = [c for c in RELAY_CHECKS if c not in before]
        assert [c.name for c in added] == ["send.to-self"]
        report = _run(_suite(tmp_path, ["send.to-self"]))
    finally:
        RELAY_CHECKS[:] = before
    assert report["checks"][0]["status"] == "pass", report["checks"]
    assert report["checks"][0]["home"]["observed"] == "SACK 0"


def test_a_client_command_that_dies_fails_at_once(tmp_path):
    cmd = [sys.executable, "-m", "fastroute.cli", "conformance", "--listen", "127.0.0.1:0",
           "--client-cmd", f"{sys.executable} -c 'raise SystemExit(3)'",
           "--out-dir", str(tmp_path / "files"), "--json", str(tmp_path / "r.json")]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=ENV)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["client_exit_status"] == 3
    assert _grades(report)["pinning"] == "fail"
    assert "never connected" in report["behaviours"][0]["detail"]
    assert time.monotonic() - t0 < 30  # not the 120 s --wait


def test_usage_errors_exit_2_before_touching_the_relay(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["conformance", "--target", "127.0.0.1:1"])
    assert exc.value.code == 2 and "--server-key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["conformance", "--target", "127.0.0.1:1", "--data-dir", str(tmp_path),
                  "--only", "no.such-check"])
    assert exc.value.code == 2 and "no.such-check" in capsys.readouterr().err
    # the client kit's scenarios: refused before it listens
    with pytest.raises(SystemExit) as exc:
        cli_main(["conformance", "--listen", f"127.0.0.1:{listen_port()}",
                  "--only", "no.such-scenario"])
    assert exc.value.code == 2 and "unknown scenario(s): no.such-scenario" in \
        capsys.readouterr().err
    # nothing listens on port 1: said once, not 45 failed checks
    assert cli_main(["conformance", "--target", f"127.0.0.1:{listen_port()}", "--server-key",
                     "00" * 32, "--home-provider", "a", "--home-key", __file__,
                     "--third-provider", "b", "--third-key", __file__]) == 2
    assert "cannot reach the relay" in capsys.readouterr().err
