"""``fastroute``: the command line, a thin wrapper over the library.

Subcommands::

    fastroute serve        run a relay (key generated on first start)
    fastroute provider     add | list | revoke   enrolled providers
    fastroute credential   issue                 device credentials
    fastroute device       revoke                one device
    fastroute sender       quarantined | lift    senders quarantined for abuse
    fastroute demo         a relay, two providers, messages, receipts, in one process
    fastroute bench        the routing core's summary benchmark
    fastroute replay       replay a trace against a relay (see docs/TRACES.md)
    fastroute record       write a metadata-only trace from a running relay
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from .config import RelayConfig, parse_hostport
from .errors import FastrouteError

__all__ = ["main"]


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="relay data directory (default: from --config, else ./fastroute-data)")
    p.add_argument("--config", default=None, help="TOML configuration file")


def _load_config(args: argparse.Namespace) -> RelayConfig:
    path = args.config
    if path is None and os.path.exists("fastroute.toml"):
        path = "fastroute.toml"
    cfg = RelayConfig.from_toml(path) if path else RelayConfig()
    over = {"data_dir": args.data_dir}
    if getattr(args, "listen", None):
        over["host"], over["port"] = parse_hostport(args.listen)
    for name in ("store", "mailbox_capacity", "admin_socket"):
        over[name] = getattr(args, name, None)
    return cfg.with_overrides(**over)


def _registry(args: argparse.Namespace):
    from .identity import Registry

    cfg = _load_config(args)
    os.makedirs(cfg.data_dir, exist_ok=True)
    return Registry(os.path.join(cfg.data_dir, "registry.db"))


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Unix
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# ------------------------------------------------------------------ commands
def cmd_serve(args: argparse.Namespace) -> int:
    from .relay import run_relay

    cfg = _load_config(args)
    _use_uvloop()
    asyncio.run(run_relay(cfg))
    return 0


def cmd_provider_add(args: argparse.Namespace) -> int:
    from .identity import ProviderKey, parse_public_key

    if args.generate:
        if not args.key_out:
            raise SystemExit("--generate needs --key-out FILE for the private key")
        key = ProviderKey.generate()
        key.save(args.key_out)
        public = key.public_key
        print(f"wrote provider private key to {args.key_out} (mode 0600)")
    elif args.public_key:
        public = parse_public_key(args.public_key)
    elif args.key_file:
        public = ProviderKey.load(args.key_file).public_key
    else:
        raise SystemExit("give --public-key HEX|PEM-FILE, --key-file FILE, or --generate")
    with _registry(args) as reg:
        withhold = None
        if args.withhold is not None:
            withhold = [f for f in args.withhold.split(",") if f.strip()]
        reg.add_provider(args.name, public, msgs_per_s=args.max_msgs_per_s,
                         bytes_per_s=args.max_bytes_per_s, max_body=args.max_body,
                         provider_msgs_per_s=args.provider_msgs_per_s,
                         provider_bytes_per_s=args.provider_bytes_per_s,
                         provider_ops_per_s=args.provider_ops_per_s, withhold=withhold)
        rec = reg.get_provider(args.name)
    print(f"enrolled provider {args.name}, key fingerprint {rec.fingerprint}")
    return 0


def cmd_provider_list(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        for rec in reg.list_providers():
            state = "revoked" if rec.revoked else "active"
            print(f"{rec.name}\t{state}\t{rec.fingerprint}")
    return 0


def cmd_provider_revoke(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        reg.revoke_provider(args.name)
    print(f"revoked provider {args.name}; its live connections close within the poll interval")
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        reg.revoke_device(args.address, args.device)
    print("revoked the device; its live connection closes within the poll interval")
    return 0


def cmd_sender_quarantined(args: argparse.Namespace) -> int:
    import time

    with _registry(args) as reg:
        rows = reg.quarantined()
    for address, since, reason in rows:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
        print(f"{address}\t{when}\t{reason}")
    if not rows:
        print("no quarantined senders")
    return 0


def cmd_sender_lift(args: argparse.Namespace) -> int:
    with _registry(args) as reg:
        lifted = reg.lift_quarantine(args.address)
    if not lifted:
        print(f"{args.address} was not quarantined")
        return 1
    print("lifted; a running relay applies it within the poll interval")
    return 0


def cmd_credential_issue(args: argparse.Namespace) -> int:
    from .identity import ProviderKey, issue_credential, parse_address
    from .noise import KeyPair

    pkey = ProviderKey.load(args.provider_key)
    _, provider = parse_address(args.address)
    if args.device_key_out:
        kp = KeyPair.generate()
        fd = os.open(args.device_key_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(kp.private)
        static = kp.public
        print(f"wrote device private key to {args.device_key_out} (mode 0600)")
    elif args.static_pub:
        static = bytes.fromhex(args.static_pub)
    else:
        raise SystemExit("give --static-pub HEX (the device's X25519 public key) "
                         "or --device-key-out FILE to generate one")
    cred = issue_credential(pkey, provider, args.address, args.device, static,
                            ttl_s=args.ttl)
    with open(args.out, "wb") as fh:
        fh.write(cred)
    print(f"wrote credential for {args.device} to {args.out} ({len(cred)} bytes, "
          f"valid {args.ttl} s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _use_uvloop()
    return asyncio.run(run_demo(messages=args.messages))


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchsummary import main as bench_main

    return bench_main(["--full"] if args.full else [])


def cmd_replay(args: argparse.Namespace) -> int:
    from .loadtest.replay import cli_replay

    _use_uvloop()
    return cli_replay(args)


def cmd_record(args: argparse.Namespace) -> int:
    from .loadtest.record import cli_record

    return cli_record(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    p = argparse.ArgumentParser(prog="fastroute", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-vv for debug; bodies and addresses are never logged)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a relay")
    s.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:7474)")
    s.add_argument("--store", choices=["sqlite", "memory"], default=None)
    s.add_argument("--mailbox-capacity", type=int, default=None)
    s.add_argument("--admin-socket", action="store_true", default=None,
                   help="listen on DATA_DIR/admin.sock for `fastroute record` (off by default)")
    _data_dir_arg(s)
    s.set_defaults(func=cmd_serve)

    prov = sub.add_parser("provider", help="enrol, list and revoke providers")
    psub = prov.add_subparsers(dest="action", required=True)
    a = psub.add_parser("add", help="enrol a provider by its Ed25519 public key")
    a.add_argument("name")
    a.add_argument("--public-key", help="hex, or a PEM file of the public key")
    a.add_argument("--key-file",
                   help="the provider's private key file (only its public half is used)")
    a.add_argument("--generate", action="store_true", help="generate the key pair too")
    a.add_argument("--key-out", help="with --generate: where to write the private key")
    a.add_argument("--max-msgs-per-s", type=float, default=None)
    a.add_argument("--max-bytes-per-s", type=float, default=None)
    a.add_argument("--max-body", type=int, default=None)
    a.add_argument("--provider-msgs-per-s", type=int, default=None,
                   help="messages per second of all its devices together (0: the default)")
    a.add_argument("--provider-bytes-per-s", type=int, default=None)
    a.add_argument("--provider-ops-per-s", type=int, default=None)
    a.add_argument("--withhold", default=None,
                   help="comma-separated DELIVER fields its devices do not receive "
                        "(ts_ms); '' clears the policy")
    _data_dir_arg(a)
    a.set_defaults(func=cmd_provider_add)
    ls = psub.add_parser("list", help="list enrolled providers")
    _data_dir_arg(ls)
    ls.set_defaults(func=cmd_provider_list)
    r = psub.add_parser("revoke", help="revoke a provider and every device it vouched for")
    r.add_argument("name")
    _data_dir_arg(r)
    r.set_defaults(func=cmd_provider_revoke)

    cred = sub.add_parser("credential", help="issue device credentials")
    csub = cred.add_subparsers(dest="action", required=True)
    i = csub.add_parser("issue", help="sign a device credential with a provider key")
    i.add_argument("--provider-key", required=True, help="provider private key file")
    i.add_argument("--address", required=True, help="user@provider")
    i.add_argument("--device", required=True, help="device name")
    i.add_argument("--static-pub", help="device X25519 public key, hex")
    i.add_argument("--device-key-out",
                   help="generate the device key pair, write the private key here")
    i.add_argument("--ttl", type=int, default=30 * 86400, help="validity in seconds")
    i.add_argument("--out", required=True, help="where to write the credential")
    i.set_defaults(func=cmd_credential_issue)

    dev = sub.add_parser("device", help="revoke a device")
    dsub = dev.add_subparsers(dest="action", required=True)
    dr = dsub.add_parser("revoke")
    dr.add_argument("address")
    dr.add_argument("device")
    _data_dir_arg(dr)
    dr.set_defaults(func=cmd_device_revoke)

    snd = sub.add_parser("sender", help="quarantined senders")
    ssub = snd.add_subparsers(dest="action", required=True)
    sq = ssub.add_parser("quarantined", help="list quarantined senders and why")
    _data_dir_arg(sq)
    sq.set_defaults(func=cmd_sender_quarantined)
    sl = ssub.add_parser("lift", help="lift a sender's quarantine")
    sl.add_argument("address")
    _data_dir_arg(sl)
    sl.set_defaults(func=cmd_sender_lift)

    d = sub.add_parser("demo", help="a relay, two providers and their users, in one process")
    d.add_argument("--messages", type=int, default=20000)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="the routing core's side-by-side summary")
    b.add_argument("--full", action="store_true",
                   help="also 10 million queued messages and 10**7 routed+acked (~1 min more)")
    b.set_defaults(func=cmd_bench)

    from .loadtest.cliargs import add_record_args, add_replay_args

    add_replay_args(sub.add_parser("replay", help="replay a trace against a relay"))
    sub.choices["replay"].set_defaults(func=cmd_replay)
    add_record_args(sub.add_parser("record", help="metadata-only trace from a running relay"))
    sub.choices["record"].set_defaults(func=cmd_record)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastroute`` command."""
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    if args.command == "serve":
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FastrouteError as exc:
        print(f"fastroute: error {int(exc.code)}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - interactive
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
