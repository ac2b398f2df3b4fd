"""``fastroute conformance``: the command line of the kit (docs/CONFORMANCE.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time

from ..config import parse_hostport
from ..identity import ProviderKey, Registry
from ..noise import KeyPair
from .framework import CLIENT_BEHAVIOURS, RELAY_CHECKS, write_json

__all__ = ["add_conformance_args", "cmd_conformance"]


def usage_error(message: str) -> SystemExit:
    """Print ``message`` and return the exit (status 2, as argparse uses) to raise."""
    print(f"fastroute conformance: {message}", file=sys.stderr)
    return SystemExit(2)


def add_conformance_args(p: argparse.ArgumentParser) -> None:
    """The verb's options: ``--target`` (check a relay) or ``--listen`` (grade a client)."""
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--target", metavar="HOST:PORT",
                      help="check the relay there, as a home and as a third-party client")
    mode.add_argument("--listen", metavar="HOST:PORT",
                      help="run a test relay there and grade the client that connects")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this check (relay) or scenario (client); repeatable")
    r = p.add_argument_group("against a relay (--target)")
    r.add_argument("--data-dir", help="the relay's data directory: enrol two test providers "
                                      "there, read its key, revoke test devices")
    r.add_argument("--server-key", metavar="HEX", help="the relay's public key to pin "
                                                       "(default: from --data-dir)")
    for col in ("home", "third"):
        r.add_argument(f"--{col}-provider", metavar="NAME",
                       help=f"the {col} test provider's enrolled name")
        r.add_argument(f"--{col}-key", metavar="FILE",
                       help=f"the {col} test provider's private key file")
    r.add_argument("--max-body", type=int, default=61440,
                   help="the relay's configured limits.max_body (default 61440)")
    r.add_argument("--rate-probe", type=int, default=25000,
                   help="SENDs fired to find the rate limit (above the relay's msgs_burst)")
    r.add_argument("--ops-probe", type=int, default=48000,
                   help="PINGs fired to find the op budget (above the relay's ops_burst)")
    r.add_argument("--bundle-probe", type=int, default=260,
                   help="BUNDLES fired to find the fetch limit (above prekey_fetch_burst)")
    r.add_argument("--sender-probe", type=int, default=60,
                   help="strangers a new address writes to (above new_sender_burst)")
    r.add_argument("--quarantine-probe", type=int, default=260,
                   help="strangers written to to be quarantined (well above "
                        "quarantine_score + new_sender_burst)")
    r.add_argument("--report-probe", type=int, default=20,
                   help="users of one provider who report one sender (above "
                        "limits.reports_per_provider)")
    r.add_argument("--backlog-probe", type=int, default=1000,
                   help="persistent SENDs to one address to reach the relay's backlog cap "
                        "(above max_stored_msgs_per_address/_device, if set)")
    c = p.add_argument_group("for a vendor's client (--listen)")
    c.add_argument("--client-cmd", help="command that starts the client's adapter (the "
                                        "paths are in FASTROUTE_CONFORMANCE_* variables)")
    c.add_argument("--out-dir", default="conformance-client",
                   help="where the credential and keys are written")
    c.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for the client's first connection")


def _providers(args: argparse.Namespace):
    from .relay import ProviderSetup, policy_of

    reg_path = os.path.join(args.data_dir, "registry.db") if args.data_dir else None
    setups = []
    for col in ("home", "third"):
        name, key_file = getattr(args, f"{col}_provider"), getattr(args, f"{col}_key")
        if key_file:
            if not name:
                raise usage_error(f"--{col}-key needs --{col}-provider NAME")
            try:
                key = ProviderKey.load(key_file)
            except (OSError, ValueError) as exc:
                raise usage_error(f"--{col}-key {key_file}: {exc}") from None
        elif reg_path:
            name = name or f"conformance-{col}-{os.urandom(3).hex()}"
            key = ProviderKey.generate()
            with Registry(reg_path) as reg:
                reg.add_provider(name, key.public_key)
            print(f"enrolled test provider {name}")
        else:
            raise usage_error(f"give --data-dir, or --{col}-provider and --{col}-key")
        setups.append(ProviderSetup(name, key, policy_of(reg_path, name)))
    return reg_path, setups


def _relay(args: argparse.Namespace) -> int:
    from .relay import RelayTarget, render_table, run_relay_suite

    host, port = parse_hostport(args.target)
    unknown = set(args.only or ()) - {c.name for c in RELAY_CHECKS}
    if unknown:
        raise usage_error(f"unknown check(s): {', '.join(sorted(unknown))}")
    if args.server_key:
        try:
            server_key = bytes.fromhex(args.server_key)
        except ValueError:
            server_key = b""
        if len(server_key) != 32:
            raise usage_error("--server-key must be 64 hex digits (the relay's X25519 key)")
    elif args.data_dir:
        try:
            with open(os.path.join(args.data_dir, "server.key"), "rb") as fh:
                server_key = KeyPair.from_private(fh.read()).public
        except (OSError, ValueError) as exc:
            raise usage_error(f"cannot read the relay key in {args.data_dir}: {exc}") from None
    else:
        raise usage_error("give --server-key HEX (printed by `fastroute serve`) or --data-dir")
    if args.data_dir and not os.path.exists(os.path.join(args.data_dir, "registry.db")):
        raise usage_error(f"no registry.db in {args.data_dir}: is it a relay's data directory?")
    try:
        socket.create_connection((host, port), 5.0).close()
    except OSError as exc:
        print(f"fastroute conformance: cannot reach the relay at {args.target}: {exc}",
              file=sys.stderr)
        return 2
    reg_path, (home, third) = _providers(args)
    if reg_path and not (args.home_key and args.third_key):
        # the relay sees the new providers at its next registry poll (0.5 s by default)
        time.sleep(1.0)
    target = RelayTarget(host, port, server_key, reg_path, relay_max_body=args.max_body,
                         rate_probe=args.rate_probe, ops_probe=args.ops_probe,
                         bundle_probe=args.bundle_probe, sender_probe=args.sender_probe,
                         quarantine_probe=args.quarantine_probe,
                         report_probe=args.report_probe, backlog_probe=args.backlog_probe)
    report = asyncio.run(run_relay_suite(target, home, third, args.only))
    print(render_table(report))
    if args.json:
        write_json(args.json, report)
    return 0 if report["passed"] else 1


def cmd_conformance(args: argparse.Namespace) -> int:
    """Run the kit in the direction the arguments ask for; 1 on any failure."""
    if args.target:
        return _relay(args)
    # the kit's scenarios register as vendor.py is imported; usage errors are
    # this module's, before the kit starts listening
    from .vendor import main_vendor
    unknown = set(args.only or ()) - {b.name for b in CLIENT_BEHAVIOURS}
    if unknown:
        raise usage_error(f"unknown scenario(s): {', '.join(sorted(unknown))}")

    rc = main_vendor(args)
    sys.stdout.flush()
    return rc
