"""``fastroute``: the command line, a thin wrapper over the library.

Subcommands::

    fastroute init         create a relay data directory (server key, registry)
    fastroute serve        run a relay (creates the data directory on first start)
    fastroute provider     add | list | revoke | restore | rotate   enrolled providers
    fastroute credential   issue                 device credentials
    fastroute device       revoke                one device
    fastroute sender       quarantined | lift    senders quarantined for abuse
    fastroute demo         a relay, two providers, messages, receipts, in one process
    fastroute bench        the routing core's summary benchmark
    fastroute replay       replay a trace against a relay (see docs/TRACES.md)
    fastroute record       write a metadata-only trace from a running relay
    fastroute conformance  check a relay (--target) or grade a client (--listen)

The admin verbs (provider, device) act on the data directory named by
``--data-dir``, else ``FASTROUTE_DATA_DIR``, else the ``data_dir`` of the
configuration file (``--config``, else ``./fastroute.toml``), else
``./fastroute-data``; they refuse a directory that is not an initialised relay
data directory and never create one.  When a relay runs on that directory,
they wait until it has applied the change and say so.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import sys
import time
import urllib.request

from . import __version__
from .config import DATA_DIR_ENV, RelayConfig, parse_hostport
from .errors import ErrorCode, FastrouteError, InvalidArgument

__all__ = ["main"]


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return action.help or ""
        return super()._get_help_string(action) or ""


def _positive_int(text: str) -> int:
    """An integer >= 1; ``2`` and ``2.0`` are both 2, ``2.5`` is refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 1")
    return int(value)


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help=f"relay data directory (default: ${DATA_DIR_ENV}, else data_dir of "
                        "--config or ./fastroute.toml, else ./fastroute-data)")
    p.add_argument("--config", default=None,
                   help="TOML configuration file (default: ./fastroute.toml if present)")


def _load_config(args: argparse.Namespace) -> RelayConfig:
    path = args.config
    if path is None and os.path.exists("fastroute.toml"):
        path = "fastroute.toml"
    cfg = RelayConfig.from_toml(path) if path else RelayConfig()
    data_dir, _ = _resolve_data_dir(args, cfg)
    over = {"data_dir": data_dir}
    if getattr(args, "listen", None):
        over["host"], over["port"] = parse_hostport(args.listen)
    for name in ("store", "mailbox_capacity", "admin_socket", "admin_listen", "log_format"):
        over[name] = getattr(args, name, None)
    return cfg.with_overrides(**over)


def _resolve_data_dir(args: argparse.Namespace, cfg: RelayConfig) -> tuple[str, str]:
    """The data directory and where its name came from."""
    if getattr(args, "data_dir", None):
        return args.data_dir, "from --data-dir"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env, f"from ${DATA_DIR_ENV}"
    if cfg.data_dir != RelayConfig.data_dir:
        return cfg.data_dir, "from the configuration file"
    return cfg.data_dir, "the default ./fastroute-data"


def _admin_data_dir(args: argparse.Namespace) -> str:
    from .datadir import require_initialised

    cfg = _load_config(args)
    data_dir, how = _resolve_data_dir(args, cfg)
    require_initialised(data_dir, how)
    return data_dir


def _registry(data_dir: str):
    from .identity import Registry

    return Registry(os.path.join(data_dir, "registry.db"))


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Unix
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _confirm(data_dir: str, generation: int, effect: str) -> int:
    """Tell whether the relay running on ``data_dir`` applied registry ``generation``.

    The relay's admin listener reports the registry generation whose changes
    reached its live links (``fastroute_registry_generation``); ``effect``
    says what that means for this change.
    """
    from .datadir import running_relay

    info = running_relay(data_dir)
    deadline = time.monotonic() + 10.0
    while info == {} and time.monotonic() < deadline:
        time.sleep(0.1)  # a relay that is starting: locked, not yet listening
        info = running_relay(data_dir)
    if info is None:
        print(f"no relay is running on {data_dir}; the change applies when one starts")
        return 0
    pid = info.get("pid", "?")
    admin = info.get("admin")
    if not admin:
        print(f"a relay (pid {pid}) runs on {data_dir}: it applies the change within its "
              f"poll interval (not confirmed: its admin listener is off)")
        return 0
    host, port = parse_hostport(admin)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                text = resp.read().decode()
            for line in text.splitlines():
                if line.startswith("fastroute_registry_generation "):
                    if int(float(line.split()[1])) >= generation:
                        print(f"confirmed by the running relay (pid {pid}): {effect}")
                        return 0
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    print(f"fastroute: the running relay (pid {pid}) did not confirm the change within 10 s "
          f"(its admin listener: {url})", file=sys.stderr)
    return 3


# ------------------------------------------------------------------ commands
def cmd_status(args: argparse.Namespace) -> int:
    """Say whether a relay runs on the data directory; ``--wait`` until it listens."""
    from .datadir import running_relay

    data_dir = _admin_data_dir(args)
    deadline = time.monotonic() + args.wait
    info = running_relay(data_dir)
    # {} is a relay that holds the lock but does not listen yet
    while not info and time.monotonic() < deadline:
        time.sleep(0.1)
        info = running_relay(data_dir)
    if not info:
        state = "starting, not listening yet" if info == {} else "no relay is running"
        print(f"{state} on {data_dir}")
        return 1
    admin = info.get("admin") or "off"
    print(f"relay running (pid {info.get('pid', '?')}), listening on {info.get('listen')}, "
          f"admin listener {admin}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from .datadir import is_initialised, prepare
    from .relay.server import fingerprint, load_or_create_server_key

    cfg = _load_config(args)
    data_dir = cfg.data_dir
    existed = is_initialised(data_dir)
    prepare(data_dir)
    kp, _ = load_or_create_server_key(data_dir)
    _registry(data_dir).close()
    if existed:
        print(f"{data_dir} is already a relay data directory; nothing changed")
    else:
        print(f"initialised relay data directory {data_dir} (server.key, registry.db)")
    print(f"server key fingerprint: {fingerprint(kp.public)}")
    print(f"server public key (for clients to pin): {kp.public.hex()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .relay import run_relay

    cfg = _load_config(args)
    setup_logging(_level(args, floor=logging.INFO), cfg.log_format)
    _use_uvloop()
    asyncio.run(run_relay(cfg, reload_config=lambda: _load_config(args)))
    return 0


def _key_source(args: argparse.Namespace) -> tuple[bytes, object | None]:
    """The provider public key the flags name, and a generated key still to write."""
    from .identity import ProviderKey, parse_public_key

    if args.generate:
        if not args.key_out:
            raise InvalidArgument("--generate needs --key-out FILE for the private key")
        if os.path.exists(args.key_out):
            raise InvalidArgument(f"{args.key_out} exists; refusing to overwrite a key file")
        key = ProviderKey.generate()
        return key.public_key, key
    if args.public_key:
        return parse_public_key(args.public_key), None
    if args.key_file:
        return ProviderKey.load(args.key_file).public_key, None
    raise InvalidArgument("give --public-key HEX|PEM-FILE, --key-file FILE, or --generate")


def _write_key(key, path: str):
    key.save(path)
    print(f"wrote provider private key to {path} (mode 0600)")


def cmd_provider_add(args: argparse.Namespace) -> int:
    from .errors import PolicyError, UnknownProvider
    from .identity import is_valid_provider

    if not is_valid_provider(args.name):
        raise InvalidArgument(f"{args.name!r} is not a valid provider name "
                              "(lowercase letters, digits, '.', '-')")
    data_dir = _admin_data_dir(args)
    public, new_key = _key_source(args)
    with _registry(data_dir) as reg:
        # every refusal comes before a key file is written
        try:
            rec = reg.get_provider(args.name)
        except UnknownProvider:
            rec = None
        if rec is not None and rec.revoked:
            raise PolicyError(f"provider {args.name!r} is revoked; lift it with "
                              f"`fastroute provider restore {args.name}` first")
        if rec is not None and rec.public_key != public:
            raise InvalidArgument(f"provider {args.name!r} is already enrolled with another "
                                  f"key; to replace it: fastroute provider rotate {args.name}")
        if new_key is not None:
            _write_key(new_key, args.key_out)
        try:
            withhold = None
            if args.withhold is not None:
                withhold = [f for f in args.withhold.split(",") if f.strip()]
            reg.add_provider(args.name, public, msgs_per_s=args.max_msgs_per_s,
                             bytes_per_s=args.max_bytes_per_s, max_body=args.max_body,
                             provider_msgs_per_s=args.provider_msgs_per_s,
                             provider_bytes_per_s=args.provider_bytes_per_s,
                             provider_ops_per_s=args.provider_ops_per_s, withhold=withhold)
        except BaseException:
            if new_key is not None:
                os.unlink(args.key_out)
            raise
        rec = reg.get_provider(args.name)
        gen = reg.version()[0]
    print(f"enrolled provider {args.name}, key fingerprint {rec.fingerprint}")
    return _confirm(data_dir, gen, "its devices can connect")


def cmd_provider_list(args: argparse.Namespace) -> int:
    data_dir = _admin_data_dir(args)
    with _registry(data_dir) as reg:
        for rec in reg.list_providers():
            state = "revoked" if rec.revoked else "active"
            print(f"{rec.name}\t{state}\t{rec.fingerprint}")
    return 0


def cmd_provider_revoke(args: argparse.Namespace) -> int:
    data_dir = _admin_data_dir(args)
    with _registry(data_dir) as reg:
        changed = reg.revoke_provider(args.name)
        gen = reg.version()[0]
    if not changed:
        print(f"provider {args.name} was already revoked")
        return 0
    print(f"revoked provider {args.name}")
    return _confirm(data_dir, gen, "its devices' live connections are closed")


def cmd_provider_restore(args: argparse.Namespace) -> int:
    data_dir = _admin_data_dir(args)
    with _registry(data_dir) as reg:
        changed = reg.restore_provider(args.name)
        gen = reg.version()[0]
    if not changed:
        print(f"provider {args.name} is not revoked; nothing changed")
        return 0
    print(f"restored provider {args.name}: its unexpired credentials verify again "
          f"(devices revoked one by one stay revoked)")
    return _confirm(data_dir, gen, "its devices can connect again")


def cmd_provider_rotate(args: argparse.Namespace) -> int:
    data_dir = _admin_data_dir(args)
    public, new_key = _key_source(args)
    with _registry(data_dir) as reg:
        old = reg.get_provider(args.name)
        if old.public_key == public:
            raise InvalidArgument(f"provider {args.name!r} already has that key")
        if new_key is not None:
            _write_key(new_key, args.key_out)
        try:
            rec = reg.rotate_provider_key(args.name, public)
        except BaseException:
            if new_key is not None:
                os.unlink(args.key_out)
            raise
        gen = reg.version()[0]
    print(f"rotated the key of provider {args.name}: fingerprint {old.fingerprint} -> "
          f"{rec.fingerprint}; credentials signed by the old key no longer verify, "
          f"re-issue them with the new key")
    return _confirm(data_dir, gen, "connections with credentials of the old key are closed")


def _device_seen(data_dir: str, address: str, device: str) -> bool | None:
    """Whether the store knows the device (it connected once); None if it cannot be read."""
    path = os.path.join(data_dir, "store.db")
    if not os.path.exists(path):
        return False  # no relay ever served here with a SQLite store
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            row = db.execute("SELECT 1 FROM devices WHERE address = ? AND device = ?",
                             (address, device)).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return row is not None


def cmd_device_revoke(args: argparse.Namespace) -> int:
    from .errors import UnknownDevice
    from .identity import parse_address

    data_dir = _admin_data_dir(args)
    _, provider = parse_address(args.address)
    with _registry(data_dir) as reg:
        reg.get_provider(provider)  # UnknownProvider: a typo, not a revocation
        if reg.device_revoked_at(args.address, args.device) is not None:
            print(f"device {args.device} of {args.address} was already revoked")
            return 0
        seen = _device_seen(data_dir, args.address, args.device)
        if not args.unseen and seen is None:
            raise UnknownDevice(
                f"cannot tell whether device {args.device!r} of {args.address} exists "
                f"({data_dir}/store.db cannot be read); check the names and pass --unseen")
        if not args.unseen and not seen:
            raise UnknownDevice(
                f"device {args.device!r} of {args.address} never connected to this relay "
                f"(its store has no such device); check the names, or pass --unseen to "
                f"revoke it before it first connects")
        reg.revoke_device(args.address, args.device)
        gen = reg.version()[0]
    print(f"revoked device {args.device} of {args.address}")
    return _confirm(data_dir, gen, "the device's live connection, if any, is closed")


def cmd_address_erase(args: argparse.Namespace) -> int:
    from .datadir import DataDirLock
    from .erase import erase_address

    data_dir = _admin_data_dir(args)
    # the relay must be stopped: holding its lock proves it is, and keeps
    # one from starting on the directory while rows are being removed
    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        removed = erase_address(data_dir, args.address)
    finally:
        lock.release()
    print("erased the address from the relay's data directory:")
    for what, n in removed.items():
        print(f"  {what}: {n}")
    print("  attachments: not attributable (the media store records no uploader); "
          "they expire after media_ttl_s")
    return 0


def cmd_sender_quarantined(args: argparse.Namespace) -> int:
    import time

    with _registry(_admin_data_dir(args)) as reg:
        rows = reg.quarantined()
    for address, since, reason in rows:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
        print(f"{address}\t{when}\t{reason}")
    if not rows:
        print("no quarantined senders")
    return 0


def cmd_sender_lift(args: argparse.Namespace) -> int:
    data_dir = _admin_data_dir(args)
    with _registry(data_dir) as reg:
        lifted = reg.lift_quarantine(args.address)
        gen = reg.version()[0]
    if not lifted:
        print(f"{args.address} was not quarantined")
        return 1
    print(f"lifted the quarantine of {args.address}")
    return _confirm(data_dir, gen, "its sends are accepted again")


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


def _needs_extra(command: str) -> None:
    try:
        import hdrh  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"fastroute: `fastroute {command}` needs the [replay] extra "
                         f"(missing module {exc.name}): pip install 'fastroute[replay]', "
                         f"or from a clone: pip install '.[replay]'") from None


def cmd_replay(args: argparse.Namespace) -> int:
    _needs_extra("replay")
    from .loadtest.replay import cli_replay

    _use_uvloop()
    return cli_replay(args)


def cmd_record(args: argparse.Namespace) -> int:
    from .loadtest.record import cli_record

    return cli_record(args)


def cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance.cli import cmd_conformance as run

    return run(args)


def _level(args: argparse.Namespace, floor: int = logging.WARNING) -> int:
    level = {0: logging.WARNING, 1: logging.INFO}.get(getattr(args, "verbose", 0),
                                                      logging.DEBUG)
    return min(level, floor)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    # -v is accepted before the verb and after it (fastroute -v serve, fastroute serve -v)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-vv for debug; bodies and addresses are never "
                             "logged)")
    p = argparse.ArgumentParser(prog="fastroute",
                                description="fastroute: the relay and its admin tools.",
                                formatter_class=_Help, parents=[common])
    p.add_argument("--version", action="version", version=f"fastroute {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(parent, name: str, help_: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_, description=help_, formatter_class=_Help,
                                 parents=[common])

    n = verb(sub, "init", "create a relay data directory (server key and registry); "
                          "serve does it too on first start")
    _data_dir_arg(n)
    n.set_defaults(func=cmd_init)

    s = verb(sub, "serve", "run a relay")
    s.add_argument("--listen", help="HOST:PORT (default: listen of the configuration, "
                                    "else 127.0.0.1:7474)")
    s.add_argument("--store", choices=["sqlite", "memory"], default=None,
                   help="message store (default: sqlite)")
    s.add_argument("--mailbox-capacity", type=int, default=None,
                   help="messages per online device held in RAM (default: 4096)")
    s.add_argument("--admin-socket", action="store_true", default=None,
                   help="listen on DATA_DIR/admin.sock for `fastroute record` (off by default)")
    s.add_argument("--admin-listen", default=None,
                   help="read-only HTTP listener for /metrics, /healthz, /readyz: HOST:PORT, "
                        "'auto' (127.0.0.1 on the relay's port + 1, the default) or 'off'")
    s.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="log lines as text (default) or JSON lines with an event name")
    _data_dir_arg(s)
    s.set_defaults(func=cmd_serve)

    st = verb(sub, "status", "tell whether a relay runs on the data directory and where it "
                             "listens (exit 0), or not (exit 1)")
    st.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to SECONDS for a starting relay to listen (for scripts)")
    _data_dir_arg(st)
    st.set_defaults(func=cmd_status)

    prov = verb(sub, "provider", "enrol, list, revoke, restore providers and rotate their keys")
    psub = prov.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = verb(psub, "add", "enrol a provider by its Ed25519 public key")
    a.add_argument("name")
    _key_args(a)
    a.add_argument("--max-msgs-per-s", type=_positive_int, default=None,
                   help="lower the per-device message rate for this provider's devices")
    a.add_argument("--max-bytes-per-s", type=_positive_int, default=None,
                   help="lower the per-device byte rate for this provider's devices")
    a.add_argument("--max-body", type=_positive_int, default=None,
                   help="lower the largest body for this provider's devices")
    a.add_argument("--provider-msgs-per-s", type=int, default=None,
                   help="messages per second of all its devices together (0: the default)")
    a.add_argument("--provider-bytes-per-s", type=int, default=None,
                   help="bytes per second of all its devices together (0: the default)")
    a.add_argument("--provider-ops-per-s", type=int, default=None,
                   help="ops per second of all its devices together (0: the default)")
    a.add_argument("--withhold", default=None,
                   help="comma-separated DELIVER fields its devices do not receive "
                        "(ts_ms); '' clears the policy")
    _data_dir_arg(a)
    a.set_defaults(func=cmd_provider_add)
    ls = verb(psub, "list", "list enrolled providers: name, state, key fingerprint")
    _data_dir_arg(ls)
    ls.set_defaults(func=cmd_provider_list)
    r = verb(psub, "revoke", "revoke a provider and every device it vouched for")
    r.add_argument("name")
    _data_dir_arg(r)
    r.set_defaults(func=cmd_provider_revoke)
    rs = verb(psub, "restore", "lift a provider's revocation")
    rs.add_argument("name")
    _data_dir_arg(rs)
    rs.set_defaults(func=cmd_provider_restore)
    ro = verb(psub, "rotate", "replace a provider's signing key (old credentials stop "
                              "verifying)")
    ro.add_argument("name")
    _key_args(ro)
    _data_dir_arg(ro)
    ro.set_defaults(func=cmd_provider_rotate)

    cred = verb(sub, "credential", "issue device credentials")
    csub = cred.add_subparsers(dest="action", required=True, metavar="ACTION")
    i = verb(csub, "issue", "sign a device credential with a provider key")
    i.add_argument("--provider-key", required=True, help="provider private key file")
    i.add_argument("--address", required=True, help="user@provider")
    i.add_argument("--device", required=True, help="device name")
    i.add_argument("--static-pub", help="device X25519 public key, hex")
    i.add_argument("--device-key-out",
                   help="generate the device key pair, write the private key here")
    i.add_argument("--ttl", type=_positive_int, default=30 * 86400,
                   help="validity in seconds")
    i.add_argument("--out", required=True, help="where to write the credential")
    i.set_defaults(func=cmd_credential_issue)

    dev = verb(sub, "device", "revoke a device")
    dsub = dev.add_subparsers(dest="action", required=True, metavar="ACTION")
    dr = verb(dsub, "revoke", "revoke one device of an address (a lost phone)")
    dr.add_argument("address")
    dr.add_argument("device")
    dr.add_argument("--unseen", action="store_true",
                    help="revoke a device that never connected to this relay")
    _data_dir_arg(dr)
    dr.set_defaults(func=cmd_device_revoke)

    ad = verb(sub, "address", "erase an address from a stopped relay's data")
    asub = ad.add_subparsers(dest="action", required=True)
    ae = verb(asub, "erase", "remove its devices, stored messages to and from it, and its "
                             "consent choices and blocks; say what was removed")
    ae.add_argument("address")
    _data_dir_arg(ae)
    ae.set_defaults(func=cmd_address_erase)

    snd = verb(sub, "sender", "quarantined senders")
    ssub = snd.add_subparsers(dest="action", required=True)
    sq = verb(ssub, "quarantined", "list quarantined senders and why")
    _data_dir_arg(sq)
    sq.set_defaults(func=cmd_sender_quarantined)
    sl = verb(ssub, "lift", "lift a sender's quarantine")
    sl.add_argument("address")
    _data_dir_arg(sl)
    sl.set_defaults(func=cmd_sender_lift)

    d = verb(sub, "demo", "a relay, two providers and their users, in one process")
    d.add_argument("--messages", type=int, default=20000, help="messages in the timed burst")
    d.set_defaults(func=cmd_demo)

    b = verb(sub, "bench", "the routing core's side-by-side summary")
    b.add_argument("--full", action="store_true",
                   help="also 10 million queued messages and 10**7 routed+acked (~1 min more)")
    b.set_defaults(func=cmd_bench)

    from .loadtest.cliargs import add_record_args, add_replay_args

    add_replay_args(verb(sub, "replay", "replay a trace against a relay (needs the [replay] "
                                        "extra: pip install 'fastroute[replay]')"))
    sub.choices["replay"].set_defaults(func=cmd_replay)
    add_record_args(verb(sub, "record", "metadata-only trace from a running relay"))
    sub.choices["record"].set_defaults(func=cmd_record)

    from .conformance.cli import add_conformance_args

    conf = verb(sub, "conformance", "check a relay treats every provider's clients alike, "
                                    "or grade a vendor's client")
    add_conformance_args(conf)
    conf.set_defaults(func=cmd_conformance)
    return p


def _key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--public-key", help="hex, or a PEM file of the public key")
    p.add_argument("--key-file",
                   help="the provider's private key file (only its public half is used)")
    p.add_argument("--generate", action="store_true", help="generate the key pair too")
    p.add_argument("--key-out", help="with --generate: where to write the private key "
                                     "(PEM, mode 0600; never overwritten)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastroute`` command.

    Ordinary mistakes (a missing file, a port in use, an unknown provider)
    are reported in one line, ``fastroute: <what went wrong> [<code> <NAME>]``,
    with exit status 2 (1 for a file-system error); never a traceback.
    """
    args = build_parser().parse_args(argv)
    if not hasattr(args, "verbose"):
        args.verbose = 0
    if args.command != "serve":
        from .logs import setup_logging

        setup_logging(_level(args))
    try:
        return args.func(args)
    except FastrouteError as exc:
        try:
            name = ErrorCode(int(exc.code)).name
        except ValueError:
            name = "ERROR"
        print(f"fastroute: {exc} [{int(exc.code)} {name}]", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"fastroute: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - interactive
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
