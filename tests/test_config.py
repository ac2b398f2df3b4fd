"""Relay configuration: TOML file, flags over file, and refusal of bad values."""

from __future__ import annotations

import pytest

from fastroute.config import RelayConfig, parse_hostport
from fastroute.errors import InvalidArgument


def test_toml_then_flags(tmp_path):
    path = tmp_path / "fastroute.toml"
    path.write_text('[relay]\nlisten = "127.0.0.2:9000"\nstore = "memory"\n'
                    'mailbox_capacity = 16\nrequire_consent = false\n'
                    '[limits]\nmsgs_per_s = 10\nmax_body = 1000\n')
    cfg = RelayConfig.from_toml(path)
    assert (cfg.host, cfg.port, cfg.store, cfg.mailbox_capacity) == \
        ("127.0.0.2", 9000, "memory", 16)
    assert cfg.require_consent is False
    assert cfg.limits.msgs_per_s == 10.0 and cfg.limits.max_body == 1000
    over = cfg.with_overrides(store="sqlite", mailbox_capacity=None)
    assert over.store == "sqlite" and over.mailbox_capacity == 16
    assert cfg.store == "memory"  # the original is untouched


@pytest.mark.parametrize("text", [
    '[relay]\nnope = 1\n',                 # unknown key
    '[other]\n',                           # unknown table
    '[relay]\nstore = "tape"\n',           # bad value
    '[relay]\nmailbox_capacity = "big"\n', # wrong type
    '[limits]\nmax_body = 100000\n',       # over one frame
    '[relay\n',                            # not TOML
    '[relay]\nrequire_consent = "no"\n',   # not a bool
    '[relay]\nmailbox_capacity = 16.5\n',  # not a whole number
    '[relay]\nlog_format = "xml"\n',
    '[relay]\nadmin_listen = "h:99999"\n',
])
def test_bad_files_are_refused_clearly(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument):
        RelayConfig.from_toml(path)


def test_hostport_forms():
    assert parse_hostport("127.0.0.1:1") == ("127.0.0.1", 1)
    assert parse_hostport("[::1]:7") == ("::1", 7)
    assert parse_hostport("localhost") == ("localhost", 7474)
    with pytest.raises(InvalidArgument):
        parse_hostport("h:99999")


def test_numbers_as_people_write_them(tmp_path):
    """The README's own file writes 33554432.0 for a float and 4096 for an int; both load,
    and a whole float for an int key (4096.0) means that int."""
    path = tmp_path / "f.toml"
    path.write_text("[relay]\nmailbox_capacity = 4096.0\n"
                    "[limits]\nbytes_per_s = 33554432.0\nbytes_burst = 67108864\n")
    cfg = RelayConfig.from_toml(path)
    assert cfg.mailbox_capacity == 4096 and type(cfg.mailbox_capacity) is int
    assert cfg.limits.bytes_per_s == 33554432.0 and type(cfg.limits.bytes_burst) is float


def test_the_admin_listener_is_loopback_by_default():
    assert RelayConfig().admin_address(7474) == ("127.0.0.1", 7475)
    assert RelayConfig(port=0).admin_address(40000) == ("127.0.0.1", 0)  # ephemeral
    assert RelayConfig(admin_listen="off").admin_address(7474) is None
    assert RelayConfig(admin_listen="10.0.0.1:9100").admin_address(7474) == ("10.0.0.1", 9100)


def test_mailbox_queue_capacity_bounds_the_engine_by_store_kind(tmp_path):
    from fastroute._model import MAX_MAILBOX_CAPACITY

    cfg = RelayConfig(mailbox_capacity=16)
    # unset: the window with a store on disk, the memory budget alone in RAM
    assert cfg.queue_capacity(in_memory=False) == 16
    assert cfg.queue_capacity(in_memory=True) == MAX_MAILBOX_CAPACITY
    cfg = RelayConfig(mailbox_capacity=16, mailbox_queue_capacity=100)
    assert cfg.queue_capacity(False) == cfg.queue_capacity(True) == 100
    for bad in (15, -1, MAX_MAILBOX_CAPACITY + 1):
        with pytest.raises(InvalidArgument, match="mailbox_queue_capacity"):
            RelayConfig(mailbox_capacity=16, mailbox_queue_capacity=bad).validate()
    with pytest.raises(InvalidArgument, match="mailbox_capacity"):
        RelayConfig(mailbox_capacity=0).validate()
    path = tmp_path / "fastroute.toml"
    path.write_text("[relay]\nmailbox_capacity = 16\nmailbox_queue_capacity = 8\n")
    with pytest.raises(InvalidArgument, match="mailbox_queue_capacity"):
        RelayConfig.from_toml(path)


def test_the_relays_engine_takes_the_bound_of_its_store(tmp_path):
    from fastroute import Relay
    from fastroute._model import MAX_MAILBOX_CAPACITY

    def engine_cap(**kw):
        return Relay(RelayConfig(data_dir=str(tmp_path), mailbox_capacity=16, **kw)) \
            .router.mailbox_capacity

    assert engine_cap(store="sqlite") == 16
    assert engine_cap(store="memory") == MAX_MAILBOX_CAPACITY
    assert engine_cap(store="memory", mailbox_queue_capacity=32) == 32

    class Kept:  # an embedder's store that says it keeps everything in RAM
        in_memory = True
    assert Relay(RelayConfig(data_dir=str(tmp_path), mailbox_capacity=16),
                 store=Kept()).router.mailbox_capacity == MAX_MAILBOX_CAPACITY


def test_group_commit_is_bounded_and_reaches_the_sqlite_store(tmp_path):
    import asyncio

    from fastroute import Relay

    for bad in (-0.001, 0.2):
        with pytest.raises(InvalidArgument, match="group_commit_s"):
            RelayConfig(group_commit_s=bad).validate()
    path = tmp_path / "fastroute.toml"
    path.write_text("[relay]\ngroup_commit_s = 0\n")
    assert RelayConfig.from_toml(path).group_commit_s == 0

    async def main():
        relay = Relay(RelayConfig(port=0, data_dir=str(tmp_path), group_commit_s=0.004,
                                  admin_listen="off"))
        await relay.start()
        try:
            return relay.store._group_s
        finally:
            await relay.close()
    assert asyncio.run(main()) == 0.004
    assert RelayConfig().group_commit_s == 0.001  # the default the benches measured
